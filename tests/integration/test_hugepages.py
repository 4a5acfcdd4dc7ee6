"""2 MiB hugetlbfs regions (Firecracker's "huge_pages": "2M"): whole huge pages installed,
zero huge pages by COPY from a zeroed huge page, REMOVE at that size; local and remote."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.tools.images import data_bytes
from pagewire.tools.localagents import LocalAgent
from pagewire.tools.workload import command as workload_command

from tests.conftest import need
from tests.peers import (
    publish,
    record_working_set,
    restore,
    staged,
    start_pair,
    stop_pair,
)

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
PAGE = 4096
HUGE = 2 * MiB
NR = Path("/proc/sys/vm/nr_hugepages")


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """Reserve 2 MiB huge pages for the test, and give them back afterwards."""
    need(
        NR.exists() and Path("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(),
        "the kernel offers no 2 MiB huge pages",
    )
    before = int(NR.read_text())
    try:
        NR.write_text(str(before + 96))
    except OSError:
        need(False, "reserving huge pages needs root (/proc/sys/vm/nr_hugepages)")
    need(int(NR.read_text()) >= before + 64, "the kernel could not reserve 64 huge pages")
    yield
    NR.write_text(str(before))


def huge_image(image, size: int) -> Path:  # type: ignore[no-untyped-def]
    """An image with whole zero huge pages in it as well as data."""
    img: Path = image(size, seed=11)
    with open(img, "r+b") as f:
        f.seek(4 * HUGE)
        f.write(bytes(2 * HUGE))  # two zero huge pages
    return img


def run(sock: str, size: int, img: Path, *args: str) -> dict:
    cmd = workload_command(sock, size, "--page-size", str(HUGE), "--verify", str(img), *args)
    out = subprocess.run(cmd, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    result: dict = json.loads(out.stdout.decode().splitlines()[-1])
    return result


@pytest.mark.usefixtures("huge_pages")
def test_local_restore_of_huge_pages(tmp_path: Path, image) -> None:
    size = 32 * MiB
    img = huge_image(image, size)
    agent = LocalAgent(tmp_path, "agent", [img.parent]).start()
    try:
        s = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}}).json()
        seen = run(s["socket"], size, img, "--threads", "2", "--remove", f"{6 * HUGE}:{HUGE}")
        assert seen["verified"], seen
        status = agent.request("GET", f"/v1/sessions/{s['id']}").json()
        assert status["page_size"] == HUGE
        assert status["pages_total"] == size // HUGE
        assert status["pages_zero"] >= 2
    finally:
        agent.stop()


@pytest.mark.usefixtures("huge_pages")
@pytest.mark.parametrize(
    "tls, background, kind",
    [(False, True, "client"), (False, False, "firecracker"), (True, True, "firecracker")],
    ids=["plain", "demand", "tls"],
)
def test_remote_restore_of_huge_pages(
    tmp_path: Path, image, tls: bool, background: bool, kind: str
) -> None:
    """Over the native channel (TLS under mTLS): each huge page is gathered from its
    chunks in the engine and installed whole, by bulk fill or on demand alone, for
    pagewire.client and a Firecracker-shaped workload with a balloon madvise."""
    size = 32 * MiB
    img = huge_image(image, size)
    p = start_pair(tmp_path, tls=tls)
    try:
        publish(p, img)
        seen, status = restore(
            p, img, "--page-size", str(HUGE), "--threads", "2", "--order", "random",
            "--remove", f"{2 * HUGE}:{HUGE}", background=background, kind=kind,
        )  # fmt: skip
        assert seen["verified"], seen
        assert status["state"] == "completed" and status["page_size"] == HUGE, status
        channel_log = [x for x in p.dest.log_path.read_text().splitlines() if "native" in x]
        assert status["transport"] == "native", (channel_log, status)
        assert status["pages_zero"] >= 2
        # zero pages never cross the wire, and a chunk crosses twice only when a fault asked
        # for it urgently while the source had already sent it on a bulk connection: on 14
        # data pages that is at most a bulk queue's worth (bench/hugepages.py measures 512 MiB)
        data = data_bytes(img)
        assert status["bytes_received"] <= 1.10 * data, (status["bytes_received"], data)
        if not background:
            assert status["pages_background"] == 0 and status["faults"]["remote"] > 0, status
    finally:
        stop_pair(p)


@pytest.mark.usefixtures("huge_pages")
def test_a_staged_working_set_goes_in_as_whole_huge_pages(tmp_path: Path, image) -> None:
    """A recorded working set staged before attach (its chunks on the native channel's
    stage connection) is installed huge page by huge page, gathered from its chunks: a
    Firecracker-shaped workload restored again, demand only, faults on none."""
    size = 32 * MiB
    img = huge_image(image, size)
    p = start_pair(tmp_path)
    try:
        publish(p, img)
        touch = ("--page-size", str(HUGE), "--threads", "2", "--order", "random")
        first = record_working_set(p, img, *touch, background=False, kind="firecracker")
        seen, second = restore(
            p, img, *touch, background=False, prefetch="working_set", kind="firecracker",
            ready=staged(p),  # the race with the workload's start is bench/working_set.py's
        )  # fmt: skip
        assert seen["verified"] and second["state"] == "completed", (seen, second)
        assert second["transport"] == "native" and second["page_size"] == HUGE
        assert first["faults"]["remote"] > 0 and second["faults"]["remote"] == 0, (
            first["faults"],
            second["faults"],
        )
    finally:
        stop_pair(p)


@pytest.mark.parametrize("layout", ["mixed", "1g"])
def test_the_channel_refuses_pages_it_cannot_gather(layout: str) -> None:
    """Regions of different page sizes (a gather would span pages of another size) and
    pages of more than 64 chunks (1 GiB) are refused at attach: gRPC brings them."""
    chunk = 64 << 10
    if layout == "mixed":
        size, span = 4 * HUGE, 4 * HUGE
        base = _uffd.mmap_anon(span)
        regions = [(base, HUGE, 0, PAGE), (base + 2 * HUGE, 2 * HUGE, 2 * HUGE, HUGE)]
    else:
        size, span = 1 << 30, 2 << 30
        base = _uffd.mmap_anon(span)
        regions = [(base - base % size + size, size, 0, size)]  # 1 GiB aligned
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    eng = _uffd.Engine(uffd, regions, efd, background=False)
    try:
        with pytest.raises(ValueError, match="cannot gather"):
            eng.attach_channel(
                "127.0.0.1", 1, b"t" * 16, chunk, size, PAGE, bytes(size // PAGE),
                bytes(32 * (size // chunk)), background=False,
            )  # fmt: skip
    finally:
        eng.close()
        os.close(efd)
        os.close(uffd)
        _uffd.munmap(base, span)
