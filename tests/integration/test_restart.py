"""kill -9 of the agent in the middle of a restore: a new agent takes the workload's uffd
back (pidfd_getfd), reconciles from pagemap, and finishes byte-exact."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from pagewire.tools.localagents import LocalAgent
from pagewire.tools.workload import command as workload_command

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def wait_for(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def blocked_in_userfault(pid: int) -> bool:
    """Is a thread of pid asleep on a page fault nobody has answered?"""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() == "handle_userfault":
                return True
        except OSError:
            continue
    return False


def status(agent: LocalAgent, sid: str) -> dict:
    result: dict = agent.request("GET", f"/v1/sessions/{sid}").json()
    return result


def test_kill_9_agent_then_restart_takes_the_session_back(tmp_path: Path, image) -> None:
    img = image(16 * MiB)
    agent = LocalAgent(tmp_path, "agent", [img.parent]).start()
    ready, go = tmp_path / "ready", tmp_path / "go"
    try:
        s = agent.request(
            "POST", "/v1/sessions", json={"source": {"path": str(img)}, "background": False}
        ).json()
        proc = subprocess.Popen(
            workload_command(
                s["socket"],
                16 * MiB,
                "--threads",
                "2",
                "--ready-file",
                str(ready),
                "--go-file",
                str(go),
                "--verify",
                str(img),
            ),
            stdout=subprocess.PIPE,
        )
        wait_for(ready.exists)
        before = status(agent, s["id"])
        assert before["state"] == "running" and 0 < before["pages_present"] < before["pages_total"]
        agent.kill()  # SIGKILL: no goodbye, the workload still holds its uffd
        go.touch()  # the workload faults on with nobody serving: its threads block
        wait_for(lambda: blocked_in_userfault(proc.pid))
        assert proc.poll() is None
        agent = LocalAgent(tmp_path, "agent", [img.parent])
        agent.start()
        out, _ = proc.communicate(timeout=60)
        seen = json.loads(out.decode().splitlines()[-1])
        assert seen["verified"], seen
        wait_for(lambda: status(agent, s["id"])["state"] == "completed")
        after = status(agent, s["id"])
        assert after["pages_present"] == after["pages_total"]
    finally:
        agent.kill()


def test_restart_with_the_workload_gone_fails_the_session(tmp_path: Path, image) -> None:
    img = image(16 * MiB)
    agent = LocalAgent(tmp_path, "agent", [img.parent]).start()
    ready = tmp_path / "ready"
    try:
        s = agent.request(
            "POST",
            "/v1/sessions",
            json={"source": {"path": str(img)}, "background": False, "prefetch": "none"},
        ).json()
        proc = subprocess.Popen(
            workload_command(
                s["socket"],
                16 * MiB,
                "--ready-file",
                str(ready),
                "--go-file",
                str(tmp_path / "never"),
            )
        )
        wait_for(ready.exists)
        agent.kill()
        proc.kill()
        proc.wait()
        agent = LocalAgent(tmp_path, "agent", [img.parent])
        agent.start()
        after = status(agent, s["id"])
        assert after["state"] == "failed"
        assert after["error"]["code"] == "workload_exited"
    finally:
        agent.kill()


def test_sigterm_handover_lets_the_next_agent_finish(tmp_path: Path, image) -> None:
    img = image(16 * MiB)
    extra = ["--shutdown-policy", "handover", "--shutdown-grace-s", "0.2"]
    agent = LocalAgent(tmp_path, "agent", [img.parent], extra=extra).start()
    ready, go = tmp_path / "ready", tmp_path / "go"
    try:
        s = agent.request(
            "POST", "/v1/sessions", json={"source": {"path": str(img)}, "background": False}
        ).json()
        proc = subprocess.Popen(
            workload_command(
                s["socket"],
                16 * MiB,
                "--ready-file",
                str(ready),
                "--go-file",
                str(go),
                "--verify",
                str(img),
            ),
            stdout=subprocess.PIPE,
        )
        wait_for(ready.exists)
        assert agent.stop() == 0
        go.touch()
        agent = LocalAgent(tmp_path, "agent", [img.parent], extra=extra).start()
        out, _ = proc.communicate(timeout=60)
        assert json.loads(out.decode().splitlines()[-1])["verified"]
        wait_for(lambda: status(agent, s["id"])["state"] == "completed")
    finally:
        agent.kill()


def test_drain_refuses_new_sessions(tmp_path: Path, image) -> None:
    img = image(1 * MiB)
    agent = LocalAgent(tmp_path, "agent", [img.parent]).start()
    try:
        assert agent.request("POST", "/v1/admin/drain").json()["draining"] is True
        r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        agent.request("DELETE", "/v1/admin/drain")
        r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
        assert r.status_code == 201
    finally:
        agent.kill()
