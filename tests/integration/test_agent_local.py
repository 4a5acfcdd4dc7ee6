"""A real agent process restoring local images over REST, with real workload processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pagewire import _uffd
from pagewire.tools.localagents import LocalAgent

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


@pytest.fixture
def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    a = LocalAgent(tmp_path, "agent", [roots], extra=["--shutdown-grace-s", "2"]).start()
    yield a
    a.stop()


def workload(sock: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pagewire.tools.workload", "--socket", sock, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def create(agent: LocalAgent, body: dict[str, Any]) -> dict[str, Any]:
    r = agent.request("POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def wait_state(agent: LocalAgent, sid: str, states: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = agent.request("GET", f"/v1/sessions/{sid}").json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


@pytest.mark.parametrize("touch", ["read", "write"])
def test_local_restore_over_rest(agent: LocalAgent, image, touch: str) -> None:
    img = image(32 * MiB)
    # no background fill: it could finish before the workload's first touch, and this
    # test counts the faults
    s = create(agent, {"source": {"path": str(img)}, "background": False})
    assert s["state"] == "awaiting_attach" and Path(s["socket"]).exists()
    writes = ["--write"] if touch == "write" else []
    proc = workload(
        s["socket"], "--size", str(32 * MiB), "--threads", "2", "--verify", str(img), *writes
    )
    out, err = proc.communicate(timeout=60)
    import json

    seen = json.loads(out.decode().splitlines()[-1])
    assert seen["verified"], seen
    status = wait_state(agent, s["id"], ("completed",))
    assert status["pages_total"] == 32 * MiB // 4096 == seen["pages"]
    assert status["pages_present"] == status["pages_total"]
    fd = os.open(img, os.O_RDONLY)
    zeros = _uffd.zero_map(fd, 32 * MiB, 4096).count(1)
    os.close(fd)
    assert status["pages_zero"] == zeros
    faults = status["faults"]
    assert faults["remote"] == 0 and 1 <= faults["local"] + faults["zero"] <= seen["touched"]
    assert status["fault_latency_seconds"]["p50"] is not None
    assert status["workload_pid"] == seen["pid"]
    assert status["attached_at"] >= status["created_at"]
    assert status["completed_at"] >= status["attached_at"]
    listed = agent.request("GET", "/v1/sessions?state=completed").json()["sessions"]
    assert [x["id"] for x in listed] == [s["id"]]
    assert agent.request("GET", "/v1/sessions?state=running").json()["sessions"] == []
    # forgetting an ended session
    assert agent.request("DELETE", f"/v1/sessions/{s['id']}").status_code == 200
    assert agent.request("GET", f"/v1/sessions/{s['id']}").status_code == 404


def test_background_fill_alone_completes(agent: LocalAgent, image) -> None:
    img = image(16 * MiB)
    s = create(agent, {"source": {"path": str(img)}, "prefetch": "none"})
    proc = workload(
        s["socket"], "--size", str(16 * MiB), "--order", "none", "--hold", "1", "--verify", str(img)
    )
    status = wait_state(agent, s["id"], ("completed",))
    out, _ = proc.communicate(timeout=60)
    assert b'"verified": true' in out
    assert status["faults"] == {"local": 0, "remote": 0, "zero": 0}
    assert status["pages_background"] == status["pages_total"]


def test_attach_timeout(agent: LocalAgent, image) -> None:
    img = image(1 * MiB)
    s = create(agent, {"source": {"path": str(img)}, "attach_timeout_s": 0.3})
    status = wait_state(agent, s["id"], ("failed",), timeout=10)
    assert status["error"]["code"] == "attach_timeout"
    assert not Path(s["socket"]).exists()


def test_bad_handoff_does_not_end_its_session(agent: LocalAgent, image) -> None:
    """A refused handoff is logged and counted; the socket keeps listening, so the real
    workload that comes next still restores (issue 14, item 20)."""
    img = image(8 * MiB)
    s = create(agent, {"source": {"path": str(img)}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(s["socket"])
        c.sendall(b"[{definitely not json")
        verdict = c.recv(4096)
    assert b'"no_fd"' in verdict  # the first defect found is named
    assert agent.request("GET", f"/v1/sessions/{s['id']}").json()["state"] == "awaiting_attach"
    proc = workload(s["socket"], "--size", str(8 * MiB), "--verify", str(img))
    out, _ = proc.communicate(timeout=60)
    assert b'"verified": true' in out and proc.returncode == 0
    assert wait_state(agent, s["id"], ("completed",))["error"] is None


def test_sigterm_lets_a_running_restore_finish(tmp_path: Path, image) -> None:
    img = image(16 * MiB)
    a = LocalAgent(tmp_path, "drain", [img.parent], extra=["--shutdown-grace-s", "20"]).start()
    try:
        s = create(a, {"source": {"path": str(img)}})
        proc = workload(
            s["socket"], "--size", str(16 * MiB), "--threads", "2", "--verify", str(img)
        )
        wait_state(a, s["id"], ("running", "completed"))
        a.signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert b'"verified": true' in out
        assert a.proc is not None and a.proc.wait(30) == 0
    finally:
        a.kill()


def test_sigterm_never_leaves_a_workload_blocked(tmp_path: Path, image) -> None:
    """A session that cannot finish within the grace period is failed by policy: the
    workload gets SIGBUS for missing pages, never zeros, never a hang."""
    img = image(16 * MiB)
    a = LocalAgent(tmp_path, "grace", [img.parent], extra=["--shutdown-grace-s", "0.5"]).start()
    try:
        s = create(a, {"source": {"path": str(img)}, "background": False})
        proc = workload(
            s["socket"],
            "--size",
            str(16 * MiB),
            "--order",
            "none",
            "--hold",
            "2",
            "--verify",
            str(img),
        )
        wait_state(a, s["id"], ("running",))
        a.signal(signal.SIGTERM)
        assert a.proc is not None and a.proc.wait(30) == 0
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGBUS
    finally:
        a.kill()


def test_handoff_from_a_uid_not_allowed_is_refused(tmp_path: Path, image) -> None:
    img = image(1 * MiB)
    a = LocalAgent(tmp_path, "uids", [img.parent], extra=["--allowed-uid", "12345"]).start()
    try:
        s = create(a, {"source": {"path": str(img)}, "attach_timeout_s": 30})
        proc = workload(s["socket"], "--size", str(1 * MiB), "--order", "none")
        deadline = time.monotonic() + 20
        metric = ""
        while time.monotonic() < deadline and "peer_not_allowed" not in metric:
            metric = a.request("GET", "/metrics").text
            time.sleep(0.1)
        assert 'pagewire_handoff_rejections_total{reason="peer_not_allowed"} 1.0' in metric
        assert a.request("GET", f"/v1/sessions/{s['id']}").json()["state"] == "awaiting_attach"
        proc.kill()
    finally:
        a.stop()


def test_layout_the_uffd_does_not_cover_is_refused(agent: LocalAgent, image) -> None:
    """A hostile handoff naming a range the uffd does not cover fails its session, and the
    ranges that were registered are poisoned, never unregistered with pages missing (the
    SIGBUS itself is asserted in a separate process by test_fail_closed.py)."""
    from pagewire.client import map_regions, send_handoff

    img = image(1 * MiB)
    s = create(agent, {"source": {"path": str(img)}, "background": False})
    regions = map_regions([(512 << 10, 0), (512 << 10, 512 << 10)])
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    _uffd.uffd_register(uffd, regions[0].base, regions[0].size)  # the second is not
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(s["socket"])
        send_handoff(c, regions, uffd)
        status = wait_state(agent, s["id"], ("failed",), timeout=10)
        assert b'"not_registered"' in c.recv(4096)
    assert status["error"]["code"] == "not_registered"
    with pytest.raises(OSError):  # poisoned: a read through the kernel fails, never zeros
        _uffd.process_read(os.getpid(), regions[0].base, 16)
    _uffd.munmap(regions[0].base, regions[0].size)  # poisoned: never touched here
    _uffd.munmap(regions[1].base, regions[1].size)
    os.close(uffd)
