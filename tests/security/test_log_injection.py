"""Issue 14 item 21: text-log injection. A file name, an export name sent to a peer and
a peer's error details carrying a newline and terminal escapes land in the text log as
escapes: every line of the log is a record the agent wrote, and no raw ESC reaches it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from tests.security.rest_util import AUTH, start_agent

FORGED = "00:00:00 error   pagewire.agent: FORGED"
EVIL = "\n" + FORGED + " \x1b[2J\x1b[31m\r\x07\u2028"
REPO = Path(__file__).resolve().parents[2]
RECORD = re.compile(r"^(\d\d:\d\d:\d\d (debug|info|warning|error|critical) |  \| )")


def assert_clean(log: str) -> None:
    assert "\x1b" not in log and "\x07" not in log and "\r" not in log and "\u2028" not in log
    for line in log.splitlines():
        assert RECORD.match(line), f"a line the agent did not write: {line!r}"
        assert not line.startswith(FORGED)


def test_file_names_and_peer_details_cannot_forge_log_lines(tmp_path: Path, image) -> None:  # type: ignore[no-untyped-def]
    source = start_agent(tmp_path, "src")
    dest = start_agent(tmp_path, "dst")
    try:
        evil_file = image(1 << 20, name="img" + EVIL)
        r = source.request(
            "POST", "/v1/exports", json={"name": "evil", "path": str(evil_file)}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        assert source.request("DELETE", "/v1/exports/evil", headers=AUTH).status_code == 200
        # the export is gone: its path is stale and the peer says so, in its own words
        body = {"source": {"peer": source.grpc, "export": "e" + EVIL[:40]}}
        r = dest.request("POST", "/v1/sessions", json=body, headers=AUTH)
        assert r.status_code in (400, 404, 502), r.text
        assert r.json()["error"]["code"] in ("export_not_found", "invalid_export", "peer_refused")
    finally:
        dest.stop()
        source.stop()
    src_log = source.log_path.read_text()
    assert "FORGED" in src_log  # the name was logged, escaped
    assert_clean(src_log)
    assert_clean(dest.log_path.read_text())


def test_a_peers_error_details_cannot_forge_log_lines(tmp_path: Path, image) -> None:  # type: ignore[no-untyped-def]
    img = image(1 << 20)
    cmd = [sys.executable, "-m", "tests.security.lying_peer"]
    args = [str(tmp_path / "peer-state"), str(img), "img", "127.0.0.1:0"]
    peer = subprocess.Popen([*cmd, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    dest = start_agent(tmp_path, "dst")
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        body = {"source": {"peer": f"127.0.0.1:{port}", "export": "img"}, "attach_timeout_s": 5}
        r = dest.request("POST", "/v1/sessions", json=body, headers=AUTH)
        assert r.status_code == 201, r.text  # the channel is refused; gRPC carries the data
        deadline = time.monotonic() + 10
        while "FORGED by a peer" not in dest.log_path.read_text():
            assert time.monotonic() < deadline, dest.log_tail()
            time.sleep(0.05)
    finally:
        dest.stop()
        peer.kill()
        peer.wait()
    assert_clean(dest.log_path.read_text())
