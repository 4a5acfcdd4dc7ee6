"""A recorded working set staged over the native channel's stage connection before the
workload attaches (issue 15: over gRPC the set took longer than a workload takes to start,
so the second restore still faulted on a fifth of it): the grant admits one stage
connection beside the engine's, the chunks come verified, a corrupted one is refused, a
Firecracker-shaped workload restored with the replay faults on none of the set, and
one whose source went bad gets SIGBUS, never a staged wrong byte."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.tools.images import data_bytes

from tests.faults.test_scenarios import corrupt_in_place
from tests.integration.test_native_channel import (
    CHUNK,
    PAGE,
    chunk_answer,
    image_facts,
    local_listener,
)
from tests.peers import (
    publish,
    record_working_set,
    restore,
    staged,
    start_pair,
    stop_pair,
)
from tests.security.peer_attacks import CHAN_OK, grant, hello
from tests.workloads import SIGBUS_EXIT, workload_command

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
STAGE = 3  # the hello kind of the stage connection


def stage(port: int, token: bytes, img: Path, chunks: list[int]) -> tuple[list[int], bytes, str]:
    data, zero, digests = image_facts(img)
    got, body, error, _ = _uffd.stage_chunks(
        "127.0.0.1", port, token, CHUNK, len(data), PAGE, zero, digests,
        struct.pack(f"<{len(chunks)}Q", *chunks),
    )  # fmt: skip
    return list(struct.unpack(f"<{len(got) // 8}Q", got)), body, error or ""


def test_the_grant_admits_one_stage_connection_beside_the_engines(tmp_path: Path, image) -> None:
    p = start_pair(tmp_path, isolated=False)
    try:
        img = image(4 * MiB, seed=31)
        publish(p, img)
        data = img.read_bytes()
        port, token = grant(p.source.grpc)
        wanted = [3, 9, 1]  # in the order asked, whatever their place in the image
        got, body, error = stage(port, token, img, wanted)
        assert (got, error) == (wanted, "")
        assert body == b"".join(data[k * CHUNK : (k + 1) * CHUNK] for k in wanted)
        for kind in (1, 2, 2):  # the engine's connections are all still admitted
            sock, status = hello(port, token, kind)
            assert status == CHAN_OK, kind
            sock.close()
        got, body, error = stage(port, token, img, [2])  # the grant is used up
        assert got == [] and "refused the token" in error
        port, token = grant(p.source.grpc)  # a second stage connection: refused, and the
        assert stage(port, token, img, [2])[2] == ""  # token revoked (as for any misuse)
        assert "refused the token" in stage(port, token, img, [2])[2]
        assert hello(port, token, 1)[1] != CHAN_OK
        with pytest.raises(ValueError, match="out of range"):  # refused before connecting
            stage(port, token, img, [len(data) // CHUNK])
        with pytest.raises(ValueError, match="at most 4096 chunks"):  # one request's worth
            stage(port, token, img, [0] * 4097)
        assert stage(port, token, img, []) == ([], b"", "")  # nothing asked: no connection
    finally:
        stop_pair(p)


def test_a_corrupted_chunk_is_refused_and_what_came_before_is_kept(image) -> None:
    img: Path = image(1 * MiB, seed=32)
    data, zero, _ = image_facts(img)
    listener = local_listener()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(32, socket.MSG_WAITALL)
        conn.sendall(b"PWOK" + struct.pack("<I", 0))
        count = struct.unpack("<II", conn.recv(8, socket.MSG_WAITALL))[0]
        conn.recv(8 * count, socket.MSG_WAITALL)
        conn.sendall(chunk_answer(data, zero, 0))
        bad = bytearray(chunk_answer(data, zero, 1))
        bad[-1] ^= 0xFF
        with contextlib.suppress(OSError):  # the stager hangs up on the bad chunk
            conn.sendall(bytes(bad) + chunk_answer(data, zero, 2))
            conn.recv(1)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        got, body, error = stage(listener.getsockname()[1], b"t" * 16, img, [0, 1, 2])
        assert (got, error) == ([0], "digest mismatch")
        assert body == data[:CHUNK]
    finally:
        listener.close()


def test_a_firecracker_workload_replays_its_working_set_without_faults(
    tmp_path: Path, image
) -> None:
    """Demand only (no bulk fill), so every chunk the replay did not bring is a fault; the
    first restore touches the whole image, so its record is every data chunk, and the
    workload starts once it is staged (as a VM starts a while after its session)."""
    p = start_pair(tmp_path)
    try:
        img = image(32 * MiB, seed=33)
        publish(p, img)
        touch = ("--threads", "2", "--order", "random")
        first = record_working_set(p, img, *touch, background=False, kind="firecracker")
        seen, second = restore(
            p, img, *touch, background=False, prefetch="working_set", kind="firecracker",
            ready=staged(p),  # the race with the workload's start is bench/working_set.py's
        )  # fmt: skip
        assert seen["verified"] and second["state"] == "completed"
        assert second["transport"] == "native"
        # every data chunk was recorded and staged before the workload started
        assert first["faults"]["remote"] > 0 and second["faults"]["remote"] == 0, (
            first["faults"],
            second["faults"],
        )
        # what the stage connection carried counts: each data page once (zero pages never)
        assert second["bytes_received"] == data_bytes(img), second["bytes_received"]
    finally:
        stop_pair(p)


def test_a_corrupt_sources_working_set_is_never_staged(tmp_path: Path, image) -> None:
    """The source's file goes bad in place (size and mtime kept) after its working set was
    recorded: the stage refuses the first bad chunk, the channel and gRPC refuse the rest,
    and the Firecracker-shaped workload gets SIGBUS by policy, never a wrong byte."""
    p = start_pair(tmp_path)
    try:
        img = image(8 * MiB, seed=34)
        publish(p, img)
        touch = ("--threads", "2", "--order", "random")
        record_working_set(p, img, *touch, background=False, kind="firecracker")
        corrupt_in_place(img)
        body = {
            "source": {"peer": p.source.grpc, "export": "img"}, "prefetch": "working_set",
            "background": False, "on_source_lost": "sigbus", "pause_timeout_s": 1.0,
        }  # fmt: skip
        session = p.dest.request("POST", "/v1/sessions", json=body).json()
        cmd = workload_command("firecracker", session["socket"], img.stat().st_size, *touch)
        done = subprocess.run([*cmd, "--verify", str(img)], capture_output=True, timeout=60)
        assert done.returncode == SIGBUS_EXIT, (done.returncode, done.stdout, done.stderr)
        deadline = time.monotonic() + 30
        while (status := p.dest.request("GET", f"/v1/sessions/{session['id']}").json())[
            "state"
        ] not in ("failed", "completed", "cancelled"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["state"] == "failed" and status["error"]["code"] == "source_lost", status
        log = p.dest.log_path.read_text()
        assert "working set staged in part (0 of" in log and "digest mismatch" in log, log[-3000:]
    finally:
        stop_pair(p)
