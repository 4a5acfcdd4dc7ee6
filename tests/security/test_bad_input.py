"""Issue 14 item 11: bad input against a real agent answers 400/422 with the documented
shape and codes (never 500): a NUL byte in a path, JSON nested too deeply, a string where
a boolean or a number goes; and messages name the field as the user wrote it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.security.rest_util import AUTH, Watch, start_agent

DOCUMENTED = {
    "malformed_json",
    "malformed_body",
    "invalid_request",
    "invalid_path",
    "invalid_source",
    "unknown_field",
    "out_of_bounds",
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    a = start_agent(tmp_path_factory.mktemp("bad"), "bad")
    yield a
    # after every bad request of the module, whatever ran and in whatever order
    log = a.log_tail(100_000)
    a.stop()
    assert "Traceback" not in log and "internal_error" not in log


def post(agent: Any, path: str, body: Any) -> tuple[int, str, str]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    r = agent.request("POST", path, content=content, headers=headers)
    payload = r.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}, r.text
    return r.status_code, payload["error"]["code"], payload["error"]["message"]


def test_a_nul_byte_in_a_path_is_400_everywhere(agent: Any) -> None:
    root = agent.export_roots[0]
    nul = f"{root}/a\x00b"
    cases = [
        ("/v1/sessions", {"source": {"path": nul}}, "source.path"),
        ("/v1/exports", {"name": "x", "path": nul}, "path"),
        ("/v1/snapshots", {"name": "x", "path": nul}, "path"),
    ]
    with Watch(agent) as watch:
        for route, body, field in cases:
            status, code, message = post(agent, route, body)
            assert (status, code) == (400, "invalid_path"), (route, code, message)
            assert message.startswith(f"{field}: "), message
        for url in ("/v1/exports/a%00b", "/v1/sessions/s-%00", "/v1/snapshots/a%00"):
            r = agent.request("GET", url, headers=AUTH)
            assert r.status_code in (400, 404) and "error" in r.json(), (url, r.text)
    watch.assert_healthy(rss_growth=32 << 20)


@pytest.mark.parametrize("depth", [50, 5_000, 200_000])
@pytest.mark.parametrize("where", ["top", "source", "extra"])
def test_deeply_nested_json_is_a_documented_400(agent: Any, depth: int, where: str) -> None:
    nest = "[" * depth + "]" * depth
    body = {
        "top": nest,
        "source": '{"source": ' + nest + "}",
        "extra": '{"source": {"path": "/x"}, "deep": ' + nest + "}",
    }[where]
    status, code, message = post(agent, "/v1/sessions", body.encode())
    assert status == 400 and code in DOCUMENTED, (code, message)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"source": {"path": "/x"}, "background": "yes"}, "background"),
        ({"source": {"path": "/x"}, "background": 1}, "background"),
        ({"source": {"path": "/x"}, "background": "true"}, "background"),
        ({"source": {"path": "/x"}, "pause_timeout_s": "30"}, "pause_timeout_s"),
        ({"source": {"path": "/x"}, "socket": {"uid": "1000"}}, "socket.uid"),
        ({"source": {"path": "/x"}, "socket": {"uid": 1.5}}, "socket.uid"),
    ],
)
def test_no_coercion_a_string_is_not_a_boolean_or_a_number(
    agent: Any, body: dict[str, Any], field: str
) -> None:
    status, code, message = post(agent, "/v1/sessions", body)
    assert (status, code) == (400, "invalid_request"), message
    assert message.startswith(f"{field}: "), message


@pytest.mark.parametrize(
    "body,code,message",
    [
        (
            {"source": {"path": "/x", "peer": "a:1"}},
            "unknown_field",
            "source.peer: extra field not permitted",
        ),
        (
            {"source": {"peer": "a:1", "export": "e", "bogus": 1}},
            "unknown_field",
            "source.bogus: extra field not permitted",
        ),
        (
            {"source": {"path": "/x", "node": "n"}},
            "unknown_field",
            "source.node: extra field not permitted",
        ),
        (
            {"source": {"path": "/x"}, "bogus": 1},
            "unknown_field",
            "bogus: extra field not permitted",
        ),
        ({"source": {"peer": "no port", "export": "e"}}, "invalid_request", "source.peer: "),
        ({"source": {"path": 5}}, "invalid_request", "source.path: "),
        (
            {"source": {"path": "/x"}, "socket": {"mode": "0777"}},
            "invalid_request",
            "socket.mode: ",
        ),
        ({"source": {}}, "invalid_source", "source: "),
    ],
)
def test_messages_name_the_field_as_written(
    agent: Any, body: dict[str, Any], code: str, message: str
) -> None:
    status, got_code, got = post(agent, "/v1/sessions", body)
    assert (status, got_code) == (400, code), got
    assert got.startswith(message), got
    assert "Value error" not in got and "function-" not in got


def test_the_agent_is_healthy_after_the_bad_requests(agent: Any) -> None:
    assert agent.request("GET", "/healthz").status_code == 200
