"""The per-host chunk cache: concurrent sessions of one image fetch each chunk once; it
stays within its bounds and refills after eviction; a corrupted entry is caught by its
digest and fetched again, never installed."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.core.layout import SYSTEM_PAGE_SIZE as PAGE
from pagewire.tools.workload import command as workload_command

from tests.integration.test_native_channel import CHUNK, fake_channel_server
from tests.native_hooks import build_hooks_module
from tests.peers import Peers, publish, restore, start_pair, stop_pair

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name))


def restore_together(p: Peers, img: Path, n: int) -> list[dict]:
    sessions = []
    for _ in range(n):
        body = {"source": {"peer": p.source.grpc, "export": "img"}}
        sessions.append(p.dest.request("POST", "/v1/sessions", json=body).json())
    procs = [
        subprocess.Popen(
            workload_command(s["socket"], img.stat().st_size, "--order", "none", "--hold", "60")
        )
        for s in sessions
    ]
    try:
        deadline = time.monotonic() + 60
        for s in sessions:
            while p.dest.request("GET", f"/v1/sessions/{s['id']}").json()["state"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return [p.dest.request("GET", f"/v1/sessions/{s['id']}").json() for s in sessions]


@pytest.mark.parametrize("native", [True, False], ids=["native", "grpc"])
def test_concurrent_sessions_fetch_each_chunk_once(tmp_path: Path, image, native: bool) -> None:
    p = start_pair(tmp_path, extra_src=[] if native else ["--no-native-channel"])
    try:
        img = image(16 * MiB)
        export = publish(p, img)
        data_bytes = (export["pages"] - export["zero_pages"]) * PAGE
        statuses = restore_together(p, img, 4)
        assert all(s["state"] == "completed" for s in statuses)
        sent = metric(p.source.request("GET", "/metrics").text, "pagewire_bytes_sent_total")
        hits = metric(p.dest.request("GET", "/metrics").text, "pagewire_cache_hits_total")
        # about one image over the network for four restores, not four
        assert sent < 1.6 * data_bytes, (sent, data_bytes)
        assert hits > 0
        seen, status = restore(p, img, "--threads", "2")  # and every byte is right
        assert seen["verified"] and status["state"] == "completed"
    finally:
        stop_pair(p)


def test_cache_stays_bounded_and_refills(tmp_path: Path, image) -> None:
    p = start_pair(tmp_path, extra_dst=["--cache-bytes", str(2 * MiB)])
    try:
        img = image(8 * MiB)
        publish(p, img)
        sessions = [
            p.dest.request(
                "POST", "/v1/sessions", json={"source": {"peer": p.source.grpc, "export": "img"}}
            ).json()
            for _ in range(3)
        ]
        procs = [
            subprocess.Popen(
                workload_command(s["socket"], 8 * MiB, "--threads", "2", "--verify", str(img)),
                stdout=subprocess.PIPE,
            )
            for s in sessions
        ]
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert b'"verified": true' in out
        text = p.dest.request("GET", "/metrics").text
        assert metric(text, "pagewire_cache_evictions_total") > 0
        assert metric(text, "pagewire_cache_bytes") <= 2 * MiB
    finally:
        stop_pair(p)


def test_corrupted_cache_entry_is_caught_by_its_digest(image) -> None:
    """A cached chunk damaged in memory is caught when it is used, refetched and cached
    again. The damage comes from ChunkCache.corrupt, a hook that only the test build of
    the extension has (tests/native_hooks.py), so that build runs the whole test."""
    hooks = build_hooks_module()
    img: Path = image(1 * MiB, seed=4)
    data = img.read_bytes()
    size = len(data)
    fd = os.open(img, os.O_RDONLY)
    zero = hooks.zero_map(fd, size, PAGE)
    os.close(fd)
    digests = [hooks.sha256(data[i : i + CHUNK]) for i in range(0, size, CHUNK)]
    cache = hooks.ChunkCache(64 * MiB)
    victim = next(i for i in range(size // CHUNK) if zero[i * (CHUNK // PAGE)] == 0)
    cache.put(digests[victim], data[victim * CHUNK : (victim + 1) * CHUNK])
    assert cache.corrupt(digests[victim])
    base = hooks.mmap_anon(size)
    uffd = hooks.uffd_create(hooks.FEATURE_EVENT_REMOVE)
    hooks.uffd_register(uffd, base, size)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    eng = hooks.Engine(
        uffd, [(base, size, 0, PAGE)], efd, background=False, zero_map=zero, zero_map_page_size=PAGE
    )
    port, _ = fake_channel_server(data, zero, corrupt=0)
    eng.attach_channel(
        "127.0.0.1",
        port,
        b"t" * 16,
        CHUNK,
        size,
        PAGE,
        zero,
        b"".join(digests),
        background=False,
        cache=cache,
    )
    eng.start()
    seen: list[bytes] = []
    t = threading.Thread(
        target=lambda: seen.append(hooks.read_memory(base + victim * CHUNK, CHUNK))
    )
    t.start()
    t.join(10)
    assert seen == [data[victim * CHUNK : (victim + 1) * CHUNK]]
    deadline = time.monotonic() + 10  # the refetched chunk is cached after it is installed
    while cache.stats()["fills"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    stats = cache.stats()
    assert stats["corrupt"] == 1 and stats["fills"] >= 2  # refetched and cached again
    eng.close()
    os.close(efd)
    os.close(uffd)
    hooks.munmap(base, size)


def test_a_chunk_enters_the_cache_only_under_its_own_sha256() -> None:
    """Sessions check wire data with their export's fast digest; the cache is keyed by
    SHA-256 across exports, so a fill is checked against its key before it is kept."""
    cache = _uffd.ChunkCache(4 * MiB)
    good = bytes(range(256)) * (CHUNK // 256)
    bad = b"\x01" + good[1:]
    key = _uffd.sha256(good)
    cache.put(key, bad)
    assert cache.get(key, CHUNK) is None and cache.stats()["corrupt"] == 1
    cache.put(key, good)
    assert cache.get(key, CHUNK) == good
