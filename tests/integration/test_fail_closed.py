"""Fail closed for Firecracker's own uffd (issue 13): every ending a workload can meet is
SIGBUS or byte-exact data, with a Firecracker-shaped workload (EVENT_REMOVE only, uffd and
socket held open, two regions) as well as with pagewire.client. Also: a bad handoff does
not end its session (issue 14, item 20), and no session exists without its record."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.fc_workload import DEFECTS, FC_DEFECT_CODES
from tests.workloads import FC_WORKLOAD, KINDS, SIGBUS_EXIT, workload_command

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    tmp = tmp_path_factory.mktemp("failclosed")
    roots = tmp / "roots"
    roots.mkdir()
    a = LocalAgent(tmp, "agent", [roots], extra=["--shutdown-grace-s", "1"]).start()
    yield a
    a.stop()


@pytest.fixture
def img(agent: LocalAgent) -> Path:
    from pagewire.tools.images import make_image

    path = agent.export_roots[0] / "image.bin"
    if not path.exists():
        make_image(path, 4 * MiB, 3)
    return path


def create(agent: LocalAgent, body: dict[str, Any]) -> dict[str, Any]:
    r = agent.request("POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def status_of(agent: LocalAgent, sid: str) -> dict[str, Any]:
    result: dict[str, Any] = agent.request("GET", f"/v1/sessions/{sid}").json()
    return result


def wait_state(agent: LocalAgent, sid: str, states: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(agent, sid)
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def agent_uffds(agent: LocalAgent) -> int:
    assert agent.proc is not None
    fd_dir = Path(f"/proc/{agent.proc.pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += "userfaultfd" in os.readlink(fd)
        except OSError:
            pass
    return count


def rejections(agent: LocalAgent, code: str) -> float:
    for line in agent.request("GET", "/metrics").text.splitlines():
        if line.startswith(f'pagewire_handoff_rejections_total{{reason="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_until(check: Any, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("features", ["firecracker", "client"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_refused_handoff_gives_sigbus(agent: LocalAgent, img: Path, defect: str, features: str):
    """Each refusal after a uffd arrived poisons what it registered (SIGBUS, not zeros,
    not a hang), closes the uffd in the agent, and answers with a verdict line."""
    s = create(agent, {"source": {"path": str(img)}, "attach_timeout_s": 120})
    code = FC_DEFECT_CODES[defect]
    before = rejections(agent, code)
    cmd = [
        sys.executable,
        str(FC_WORKLOAD),
        "--socket",
        s["socket"],
        "--size",
        str(img.stat().st_size),
        "--defect",
        defect,
        "--features",
        features,
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    out = proc.stdout.decode()
    reads = [json.loads(line) for line in out.splitlines() if '"read"' in line]
    if defect == "not_registered":
        # refused once the engine already served: a page it served is the image's own
        with open(img, "rb") as f:
            for r in reads:
                f.seek(r["offset"])
                assert bytes.fromhex(r["read"]) == f.read(8), (reads, "a wrong byte was read")
        assert proc.returncode in (SIGBUS_EXIT, 2), (proc.returncode, proc.stderr[-2000:])
    else:
        assert not reads, out  # no byte was read: neither zeros nor anything else
        assert proc.returncode == SIGBUS_EXIT, (proc.returncode, out, proc.stderr[-2000:])
    if features == "client":
        verdict = json.loads(json.loads(out.splitlines()[0])["verdict"])
        assert verdict["error"]["code"] == code, verdict
    wait_until(lambda: rejections(agent, code) > before, what=f"{code} not counted")
    wait_until(lambda: agent_uffds(agent) == 0, what="the agent still holds a uffd")
    status = status_of(agent, s["id"])
    if defect == "not_registered":  # found after the engine started: the session ends
        assert status["state"] == "failed" and status["error"]["code"] == "not_registered"
    else:  # the socket keeps listening for the real workload
        assert status["state"] == "awaiting_attach", status
        assert Path(s["socket"]).exists()
        agent.request("DELETE", f"/v1/sessions/{s['id']}")


def test_attach_larger_than_the_image_raises(agent: LocalAgent, img: Path) -> None:
    s = create(agent, {"source": {"path": str(img)}, "attach_timeout_s": 60})
    cmd = workload_command("client", s["socket"], 2 * img.stat().st_size, "--verify", str(img))
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    assert proc.returncode == 4 and report["refused"] == "beyond_image", report
    agent.request("DELETE", f"/v1/sessions/{s['id']}")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_connections_do_not_end_the_session(agent: LocalAgent, img: Path, kind: str) -> None:
    """One connect-and-close and one silent connection are refused and logged; the real
    workload that comes next restores byte-exact."""
    s = create(agent, {"source": {"path": str(img)}, "attach_timeout_s": 60})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(s["socket"])
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(s["socket"])
    try:
        cmd = workload_command(kind, s["socket"], img.stat().st_size, "--verify", str(img))
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
    finally:
        silent.close()
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    assert json.loads(proc.stdout.decode().splitlines()[-1])["verified"] is True
    assert wait_state(agent, s["id"], ("completed",))["error"] is None


def sigbus_run(agent: LocalAgent, img: Path, kind: str, tmp: Path, inject: Any) -> int:
    """Touch half, inject the fault, touch the rest: the rest must raise SIGBUS."""
    s = create(agent, {"source": {"path": str(img)}, "background": False, "prefetch": "none"})
    ready, go = tmp / f"{kind}.ready", tmp / f"{kind}.go"
    cmd = workload_command(
        kind,
        s["socket"],
        img.stat().st_size,
        "--order",
        "sequential",
        "--ready-file",
        str(ready),
        "--go-file",
        str(go),
        "--verify",
        str(img),
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(ready.exists, what="the workload never touched its first half")
    inject(s)
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == SIGBUS_EXIT, (proc.returncode, out, err[-2000:])
    return proc.returncode


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_gives_sigbus(agent: LocalAgent, img: Path, kind: str, tmp_path: Path) -> None:
    def inject(s: dict[str, Any]) -> None:
        r = agent.request("DELETE", f"/v1/sessions/{s['id']}")
        assert r.json()["state"] == "cancelled"
        assert r.json()["error"]["code"] == "cancelled"

    sigbus_run(agent, img, kind, tmp_path, inject)


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_policy_fail_gives_sigbus(tmp_path: Path, image, kind: str) -> None:
    src = image(4 * MiB)
    a = LocalAgent(
        tmp_path,
        "shut",
        [src.parent],
        extra=["--shutdown-grace-s", "0.2", "--shutdown-policy", "fail"],
    ).start()
    try:

        def inject(s: dict[str, Any]) -> None:
            a.signal(signal.SIGTERM)
            assert a.proc is not None and a.proc.wait(30) == 0

        sigbus_run(a, src, kind, tmp_path, inject)
    finally:
        a.kill()


@pytest.mark.parametrize("kind", KINDS)
def test_exit_right_after_the_last_page_completes(agent: LocalAgent, img: Path, kind: str) -> None:
    """A workload that verifies every byte and exits at once restored fine: the session
    ends completed, never failed/workload_exited (the ending race of issue 13, item 6)."""
    runs = 10
    for _ in range(runs):
        s = create(agent, {"source": {"path": str(img)}})
        cmd = workload_command(kind, s["socket"], img.stat().st_size, "--verify", str(img))
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        status = wait_state(agent, s["id"], ("completed", "failed"))
        assert status["state"] == "completed", status
        assert status["pages_present"] == status["pages_total"]
