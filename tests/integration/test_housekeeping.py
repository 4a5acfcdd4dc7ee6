"""Retention of ended sessions, the concurrent-session limit, and JSON logs that carry
the session id."""

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


def test_ended_sessions_are_forgotten_after_retention(tmp_path: Path, image) -> None:
    img = image(1 * MiB)
    a = LocalAgent(tmp_path, "ret", [img.parent], extra=["--retention-s", "0.5"]).start()
    try:
        s = a.request(
            "POST", "/v1/sessions", json={"source": {"path": str(img)}, "attach_timeout_s": 0.2}
        ).json()
        deadline = time.monotonic() + 15
        while a.request("GET", f"/v1/sessions/{s['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the ended session was never forgotten"
            time.sleep(0.1)
        assert not (tmp_path / "ret" / "state" / "sessions" / f"{s['id']}.json").exists()
    finally:
        a.stop()


def test_session_limit_gives_a_clear_error(tmp_path: Path, image) -> None:
    img = image(1 * MiB)
    a = LocalAgent(tmp_path, "lim", [img.parent], extra=["--max-sessions", "1"]).start()
    try:
        body = {"source": {"path": str(img)}}
        assert a.request("POST", "/v1/sessions", json=body).status_code == 201
        r = a.request("POST", "/v1/sessions", json=body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
    finally:
        a.stop()


def test_json_logs_carry_the_session_id(tmp_path: Path, image) -> None:
    img = image(2 * MiB)
    a = LocalAgent(tmp_path, "logs", [img.parent], extra=["--log-json"]).start()
    try:
        s = a.request("POST", "/v1/sessions", json={"source": {"path": str(img)}}).json()
        subprocess.run(
            workload_command(s["socket"], 2 * MiB),
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30  # the "session completed" line is written by then
        while a.request("GET", f"/v1/sessions/{s['id']}").json()["state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        a.stop()
    lines = [
        json.loads(line) for line in a.log_path.read_text().splitlines() if line.startswith("{")
    ]
    mine = [e for e in lines if e.get("session") == s["id"]]
    assert {e["msg"] for e in mine} >= {"session created", "workload attached", "session completed"}
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in lines)
