"""No session without its record (issue 13, item 4): with the state dir read-only or full,
creates answer 503 state_unwritable and leave nothing behind, /readyz says not ready until
a write succeeds, and a failed export publish removes its temp file and closes its fd."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def agent(tmp_path: Path, image) -> Iterator[LocalAgent]:  # type: ignore[no-untyped-def]
    need(os.geteuid() == 0, "needs root to mount a small tmpfs as the state dir")
    image(1 * MiB)
    a = LocalAgent(tmp_path, "agent", [tmp_path / "roots"])
    state = a.workdir / "state"
    state.mkdir(parents=True)
    mount("-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state))
    try:
        yield a.start()
    finally:
        a.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)


def ready(a: LocalAgent) -> bool:
    return a.request("GET", "/readyz").status_code == 200


def wait_for(check, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def fds_on(a: LocalAgent, path: Path) -> list[str]:
    """The agent's fds open on path (a count of all fds would include HTTP connections
    the server has not closed yet)."""
    assert a.proc is not None
    fd_dir = f"/proc/{a.proc.pid}/fd"
    found = []
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") == str(path):
                found.append(fd)
        except FileNotFoundError:  # closed meanwhile
            pass
    return found


def leftovers(a: LocalAgent) -> list[str]:
    state = a.workdir / "state"
    return [p.name for p in state.rglob("*") if p.name.endswith(".tmp")]


def test_read_only_state_dir_refuses_creates(agent: LocalAgent, tmp_path: Path) -> None:
    img = tmp_path / "roots" / "image.bin"
    state = agent.workdir / "state"
    assert ready(agent)
    mount("-o", "remount,ro", str(state))
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "state_unwritable"
    assert agent.request("GET", "/v1/sessions").json()["sessions"] == []
    assert list((agent.workdir / "sockets").iterdir()) == []  # no socket left behind
    assert not ready(agent)
    assert agent.request("GET", "/readyz").json()["checks"]["state_dir"] is False
    mount("-o", "remount,rw", str(state))
    wait_for(lambda: ready(agent))  # the probe sees the dir writable again
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
    assert r.status_code == 201, r.text


def test_full_state_dir_refuses_creates_and_publishes(agent: LocalAgent, tmp_path: Path) -> None:
    img = tmp_path / "roots" / "image.bin"
    filler = agent.workdir / "state" / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unwritable", r.text
    r = agent.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unwritable", r.text
    assert agent.request("GET", "/v1/exports/img").status_code == 404
    assert leftovers(agent) == []
    assert fds_on(agent, img.resolve()) == []  # the image fds were closed
    assert not ready(agent)
    filler.unlink()
    wait_for(lambda: ready(agent))
    r = agent.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
    assert r.status_code == 201, r.text
