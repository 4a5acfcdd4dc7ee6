"""Live snapshot by write-protect: a writer keeps modifying memory throughout; the snapshot
file is a consistent image of one instant (checked against the writer's own log of
writes), the writer's final memory is its own, and the file becomes an export."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pagewire import _uffd
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need

pytestmark = pytest.mark.usefixtures("require_uffd")
WRITER = Path(__file__).with_name("snapshot_writer.py")
STAMP = struct.Struct("<QQ")
PAGE = 4096
PAGES = 8192


def wait_ended(agent: LocalAgent, snap_id: str) -> dict[str, Any]:
    """The snapshot's status once it has left awaiting_attach and running."""
    deadline = time.monotonic() + 60
    while (status := agent.request("GET", f"/v1/snapshots/{snap_id}").json())["state"] in (
        "awaiting_attach",
        "running",
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def test_snapshot_of_a_running_writer(tmp_path: Path) -> None:
    need(
        bool(_uffd.API_FEATURES_SUPPORTED & _uffd.FEATURE_WP_UNPOPULATED),
        "the kernel lacks UFFD_FEATURE_WP_UNPOPULATED (6.4+)",
    )
    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    out = roots / "snap.img"
    log_path, go = tmp_path / "log.json", tmp_path / "go"
    try:
        r = agent.request("POST", "/v1/snapshots", json={"name": "snap1", "path": str(out)})
        assert r.status_code == 201, r.text
        snap = r.json()
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), snap["socket"], str(PAGES), str(log_path), str(go)],
            stdout=subprocess.PIPE,
        )
        status = wait_ended(agent, snap["id"])
        go.touch()
        report = json.loads(writer.communicate(timeout=60)[0].decode().splitlines()[-1])
        assert status["state"] == "completed", status
        assert status["pages_copied"] == PAGES
        assert status["write_faults"] > 0  # writes arrived while it copied
        assert report["final_memory_wrong_pages"] == 0  # the live memory is its own
        log = json.loads(log_path.read_text())
        data = out.read_bytes()
        stamps = [STAMP.unpack_from(data, p * PAGE) for p in range(PAGES)]
        instant = max(seq for _, seq in stamps)  # the last write the snapshot holds
        last: dict[int, int] = {}
        for seq, p in enumerate(log[:instant], 1):
            last[p] = seq
        wrong = [
            p
            for p in range(PAGES)
            if stamps[p]
            != ((p, last[p]) if p in last else ((p, 0) if p < PAGES - PAGES // 8 else (0, 0)))
        ]
        assert not wrong, f"{len(wrong)} pages are not the image of write {instant}"
        assert report["writes"] > instant  # the writer kept writing after the instant
        with httpx.stream("GET", f"{agent.url}/v1/snapshots/{snap['id']}/events") as ev:
            lines = [line for line in ev.iter_lines() if line.startswith("event: ")]
        assert lines == ["event: end"]  # it had ended: the stream says so at once
        export = agent.request("GET", "/v1/exports/snap1").json()
        assert export["size"] == PAGES * PAGE and export["state"] == "ready"
    finally:
        agent.stop()


TRACED_WORKLOAD = """
import os, sys, time
from pagewire import _uffd
from pagewire.client import attach_for_snapshot
base = _uffd.mmap_anon(64 * 4096)
_uffd.write_memory(base, b"x" * 4096)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
att = attach_for_snapshot(sys.argv[1], base, 64 * 4096)
time.sleep(60)
"""


def test_snapshot_of_a_process_that_does_not_stop(tmp_path: Path) -> None:
    """A traced process does not reach the stopped state on SIGSTOP: the snapshot fails
    with process_not_stopped, removes its partial file, and never write-protects it."""
    import ctypes
    import os

    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    out = roots / "snap.img"
    go = tmp_path / "go"
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        r = agent.request("POST", "/v1/snapshots", json={"name": "s", "path": str(out)})
        assert r.status_code == 201, r.text
        snap = r.json()
        proc = subprocess.Popen([sys.executable, "-c", TRACED_WORKLOAD, snap["socket"], str(go)])
        ptrace_seize = 0x4206
        assert libc.ptrace(ptrace_seize, proc.pid, None, None) == 0, ctypes.get_errno()
        go.touch()
        status = wait_ended(agent, snap["id"])
        assert status["state"] == "failed", status
        assert status["error"]["code"] == "process_not_stopped", status
        assert not out.exists()
        ptrace_detach = 17
        libc.ptrace(ptrace_detach, proc.pid, None, None)
        proc.kill()
        while True:  # the first reports may be ptrace stops
            _, st = os.waitpid(proc.pid, 0)
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                break
        proc.returncode = -9
    finally:
        agent.stop()


REFUSED_WORKLOAD = """
import sys
from pagewire import _uffd
from pagewire.client import attach_for_snapshot
base = _uffd.mmap_anon(64 * 4096)
_uffd.write_memory(base, b"x" * 4096)
att = attach_for_snapshot(sys.argv[1], base, 64 * 4096)
att.conn.recv(1)  # the agent's refusal closes the socket
_uffd.write_memory(base, b"y" * 4096)  # would wait forever had the agent write-protected it
print("wrote", flush=True)
"""


def test_snapshot_handoffs_are_checked_like_sessions(tmp_path: Path) -> None:
    """--allowed-uid holds for snapshot sockets too: junk, and a handoff from a uid not
    allowed, are refused with a reason (and counted) while the snapshot keeps waiting;
    nothing is write-protected; when nobody allowed comes, it fails attach_timeout naming
    the last refusal, and leaves no file."""
    import socket

    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots], extra=["--allowed-uid", "12345"]).start()
    out = roots / "snap.img"
    try:
        body = {"name": "s", "path": str(out), "attach_timeout_s": 4}
        r = agent.request("POST", "/v1/snapshots", json=body)
        assert r.status_code == 201, r.text
        snap = r.json()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as junk:
            junk.connect(snap["socket"])
            junk.sendall(b"not a handoff" * 10)
        proc = subprocess.run(
            [sys.executable, "-c", REFUSED_WORKLOAD, snap["socket"]],
            capture_output=True,
            timeout=30,
        )
        assert proc.stdout == b"wrote\n", proc.stderr.decode()
        assert agent.request("GET", f"/v1/snapshots/{snap['id']}").json()["state"] == (
            "awaiting_attach"
        )
        status = wait_ended(agent, snap["id"])
        assert status["state"] == "failed", status
        assert status["error"]["code"] == "attach_timeout", status
        assert "handoff from uid 0 refused" in status["error"]["message"], status
        assert not out.exists()
        metrics = agent.request("GET", "/metrics").text  # counted as session refusals are
        assert 'pagewire_handoff_rejections_total{reason="peer_not_allowed"} 1.0' in metrics
    finally:
        agent.stop()
