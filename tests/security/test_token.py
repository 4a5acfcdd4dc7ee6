"""Issue 14 items 7, 12 and 22: an empty token file stops the agent (auth never turns off
silently); a non-ASCII bearer token is a plain 401; the docs and the schema need the
token when one is configured, and are open when none is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pagewire.tools.localagents import LocalAgent, free_port

from tests.security.rest_util import AUTH, Watch, connect, read_response, start_agent, status_of

DOCS = ("/docs", "/redoc", "/openapi.json")
PUBLIC = ("/healthz", "/readyz", "/metrics")


@pytest.mark.parametrize("content", [b"", b"\n", b"  \t\n \n", b"\xff\xfe"])
def test_an_empty_or_unreadable_token_file_stops_the_agent(tmp_path: Path, content: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    cmd = [
        sys.executable, "-m", "pagewire.tools.cli", "agent",
        "--http", f"127.0.0.1:{free_port()}", "--grpc", f"127.0.0.1:{free_port()}",
        "--socket-dir", str(tmp_path / "sock"), "--state-dir", str(tmp_path / "state"),
        "--token-file", str(token_file),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert str(token_file) in done.stderr, done.stderr
    assert "agent listening" not in done.stderr


def test_a_non_ascii_bearer_token_is_401_not_500(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "tok")
    try:
        with Watch(agent) as watch:
            for given in (b"\xc3\xa9t\xc3\xa9", b"s3cret-tok\xff", b"\x80" * 64):
                s = connect(agent.http_port)
                s.sendall(
                    b"GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + given
                    + b"\r\n\r\n"
                )
                response = read_response(s)
                s.close()
                assert status_of(response) == 401, response[:300]
                assert b'"unauthorized"' in response
        watch.assert_healthy(rss_growth=16 << 20)
        assert "Traceback" not in agent.log_tail(200)
    finally:
        agent.stop()


def test_a_non_ascii_token_in_the_file_matches_its_utf8_bytes(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("pässwörd\n", encoding="utf-8")
    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(tmp_path, "utf8", [roots], extra=["--token-file", str(token_file)]).start()
    try:
        ok = agent.request("GET", "/v1/info", headers={"Authorization": "Bearer pässwörd".encode()})
        assert ok.status_code == 200, ok.text
        wrong = agent.request("GET", "/v1/info", headers={"Authorization": b"Bearer passwort"})
        assert wrong.status_code == 401
    finally:
        agent.stop()


def test_docs_and_schema_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "docs")
    try:
        for path in DOCS:
            r = agent.request("GET", path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
            assert agent.request("GET", path, headers=AUTH).status_code == 200, path
        for path in PUBLIC:
            assert agent.request("GET", path).status_code == 200, path
        # unknown paths too: no token, no hint of what exists
        r = agent.request("GET", "/v1/nothing-here")
        assert r.status_code == 401
        assert agent.request("GET", "/v1/nothing-here", headers=AUTH).status_code == 404
    finally:
        agent.stop()


def test_docs_and_schema_are_open_without_a_token(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "open", token=False)
    try:
        for path in DOCS:
            assert agent.request("GET", path).status_code == 200, path
        schema = agent.request("GET", "/openapi.json").json()
        assert "/v1/sessions" in schema["paths"]
        with pytest.raises(httpx.HTTPStatusError):
            agent.request("GET", "/v1/nothing-here").raise_for_status()
    finally:
        agent.stop()
