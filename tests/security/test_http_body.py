"""Issue 14 item 3: unauthenticated memory exhaustion with large bodies. The token is
checked from the headers before any body byte is read, and bodies are counted as they
stream (chunked or with Content-Length) and refused at the limit with 413."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.security.rest_util import AUTH, TOKEN, MiB, Watch, start_agent, status_of, stream_body

BIG = 300 * MiB


def head(port: int, *, token: bool, chunked: bool, length: int = BIG) -> bytes:
    lines = [
        "POST /v1/sessions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_code(response: bytes) -> str:
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return str(body["error"]["code"])


def test_three_chunked_300mib_bodies_without_token_are_refused_unread(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "body")
    try:
        with Watch(agent) as watch:
            with ThreadPoolExecutor(3) as pool:
                runs = [
                    pool.submit(
                        stream_body,
                        agent.http_port,
                        head(agent.http_port, token=False, chunked=True),
                        BIG,
                        True,
                    )
                    for _ in range(3)
                ]
                results = [r.result() for r in runs]
        print("3 x 300 MiB chunked, no token:", watch.figures())
        for response, sent in results:
            assert status_of(response) == 401, response[:300]
            assert error_code(response) == "unauthorized"
            assert sent < 64 * MiB  # answered at the headers: the client stopped early
        watch.assert_healthy(rss_growth=32 * MiB)
    finally:
        agent.stop()


def test_chunked_and_sized_bodies_with_token_stop_at_the_limit(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "body", extra=["--max-body-bytes", str(256 << 10)])
    port = agent.http_port
    try:
        with Watch(agent) as watch:
            with ThreadPoolExecutor(3) as pool:
                runs = [
                    pool.submit(
                        stream_body, port, head(port, token=True, chunked=True), BIG, True, 64 << 10
                    )
                    for _ in range(3)
                ]
                results = [r.result() for r in runs]
            sized, sized_sent = stream_body(port, head(port, token=True, chunked=False), BIG, False)
            unsized, _ = stream_body(port, head(port, token=False, chunked=False), BIG, False)
        print("3 x 300 MiB chunked, with token, limit 256 KiB:", watch.figures())
        for response, sent in results:
            assert status_of(response) == 413, response[:300]
            assert error_code(response) == "body_too_large"
            assert sent < 64 * MiB
        assert status_of(sized) == 413 and error_code(sized) == "body_too_large"
        assert sized_sent < 64 * MiB
        assert status_of(unsized) == 401  # the token comes first, whatever the length says
        watch.assert_healthy(rss_growth=32 * MiB)
        # a body under the limit still reaches the route
        r = agent.request(
            "POST", "/v1/sessions", json={"source": {"path": "relative"}}, headers=AUTH
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
    finally:
        agent.stop()


def test_a_body_that_stalls_is_cut_off(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "body", extra=["--http-body-timeout-s", "1"])
    port = agent.http_port
    try:
        from tests.security.rest_util import connect, read_response

        s = connect(port)
        s.sendall(head(port, token=True, chunked=False, length=100) + b"{")
        response = read_response(s, timeout=10)
        assert status_of(response) == 408 and error_code(response) == "body_timeout"
        assert agent.request("GET", "/healthz").status_code == 200
    finally:
        agent.stop()
