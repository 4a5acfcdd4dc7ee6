"""Issue 14, item 18: the agent refuses to start unless its socket and state dirs belong
to its user and nobody else can write to them (or rename them away)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need

NOBODY = 65534


def agent_cmd(socket_dir: Path, state_dir: Path, *extra: str) -> list[str]:
    """An agent on ephemeral ports with these dirs (for start-up refusals)."""
    return [
        sys.executable,
        "-m",
        "pagewire.tools.cli",
        "agent",
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--socket-dir",
        str(socket_dir),
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def refused(socket_dir: Path, state_dir: Path) -> str:
    r = subprocess.run(agent_cmd(socket_dir, state_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "refusing to start" in r.stderr
    return r.stderr


@pytest.fixture
def root_only() -> None:
    need(os.geteuid() == 0, "chown to another uid needs root")


@pytest.mark.usefixtures("root_only")
@pytest.mark.parametrize("which", ["socket", "state"])
def test_a_dir_owned_by_another_user_is_refused(tmp_path: Path, which: str) -> None:
    socket_dir, state_dir = tmp_path / "sockets", tmp_path / "state"
    planted = socket_dir if which == "socket" else state_dir
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    (planted / "planted.json").write_text("{}")
    stderr = refused(socket_dir, state_dir)
    assert f"--{which}-dir {planted} is owned by uid {NOBODY}" in stderr, stderr
    # nothing was chmodded, chowned or created in it
    st = planted.stat()
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
    assert sorted(p.name for p in planted.iterdir()) == ["planted.json"]


@pytest.mark.usefixtures("root_only")
def test_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    (parent / "sockets").mkdir(mode=0o700)
    stderr = refused(parent / "sockets", tmp_path / "state")
    assert f"its parent {parent} is owned by uid {NOBODY}" in stderr, stderr


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, mode)
    stderr = refused(tmp_path / "sockets", state_dir)
    assert f"--state-dir {state_dir} is writable by group or others" in stderr, stderr


def test_a_symlinked_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    os.symlink(tmp_path / "real", tmp_path / "sockets")
    stderr = refused(tmp_path / "sockets", tmp_path / "state")
    assert "is not a directory (symlinks are refused)" in stderr, stderr


def test_missing_dirs_are_created_private(tmp_path: Path) -> None:
    agent = LocalAgent(tmp_path, "agent", []).start()
    try:
        for name in ("state", "sockets"):
            st = (agent.workdir / name).stat()
            assert st.st_uid == os.geteuid() and not st.st_mode & 0o022, oct(st.st_mode)
        assert agent.request("GET", "/healthz").status_code == 200
    finally:
        agent.stop()
