"""Issue 14, item 8: a live export (POST /v1/exports with "pid") freezes a process with
SIGSTOP. It is off unless the operator lists uids (--live-export-uid), and it never
freezes the agent, one of its threads, its ancestors or pid 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need
from tests.security.fs_watch import MiB, Watch

NOBODY = 65534
MAX_RSS = 256 * MiB


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def sleeper(uid: int | None = None) -> subprocess.Popen[bytes]:
    def drop() -> None:
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)

    return subprocess.Popen(["sleep", "600"], preexec_fn=drop)


def export(agent: LocalAgent, name: str, pid: int) -> tuple[int, str]:
    r = agent.request("POST", "/v1/exports", json={"name": name, "pid": pid})
    return r.status_code, r.json().get("error", {}).get("code", "")


def test_live_export_is_off_by_default(tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path, "agent", []).start()
    victim = sleeper()
    try:
        assert export(agent, "v", victim.pid) == (403, "live_export_disabled")
        assert state_of(victim.pid) != "T"
    finally:
        victim.kill()
        victim.wait()
        agent.stop()


def test_the_agent_its_ancestors_and_pid_1_are_never_frozen(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "a process of another uid needs root")
    uid = os.geteuid()
    agent = LocalAgent(tmp_path, "agent", [], extra=["--live-export-uid", str(uid)]).start()
    assert agent.proc is not None
    pid = agent.proc.pid
    threads = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    foreign = sleeper(NOBODY)
    allowed = sleeper()
    try:
        with Watch(agent) as watch:
            for target in (pid, os.getpid(), os.getppid(), 1, threads[0]):
                assert export(agent, "x", target) == (403, "live_export_forbidden"), target
                assert state_of(target) != "T"
            assert export(agent, "x", foreign.pid) == (403, "live_export_forbidden")
            assert state_of(foreign.pid) != "T"
            # an allowed uid's process is frozen, and runs again once withdrawn
            assert export(agent, "ok", allowed.pid) == (201, "")
            assert state_of(allowed.pid) == "T"
            assert agent.request("DELETE", "/v1/exports/ok").status_code == 200
            assert state_of(allowed.pid) in ("S", "R")
        watch.assert_healthy(MAX_RSS)
    finally:
        for p in (foreign, allowed):
            p.kill()
            p.wait()
        agent.stop()


def test_uids_from_the_environment(tmp_path: Path) -> None:
    env = {"PAGEWIRE_LIVE_EXPORT_UIDS": f"{NOBODY},{os.geteuid()}"}
    agent = LocalAgent(tmp_path, "agent", [], env=env).start()
    allowed = sleeper()
    try:
        assert export(agent, "ok", allowed.pid) == (201, "")
        assert agent.request("DELETE", "/v1/exports/ok").status_code == 200
    finally:
        allowed.kill()
        allowed.wait()
        agent.stop()


@pytest.mark.usefixtures("require_uffd")
def test_a_refused_name_lets_the_process_run_again(tmp_path: Path) -> None:
    agent = LocalAgent(
        tmp_path, "agent", [], extra=["--live-export-uid", str(os.geteuid()), "--max-exports", "1"]
    ).start()
    first, second = sleeper(), sleeper()
    try:
        assert export(agent, "a", first.pid) == (201, "")
        assert export(agent, "b", second.pid) == (429, "too_many_exports")
        assert state_of(second.pid) != "T"
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
        agent.stop()
