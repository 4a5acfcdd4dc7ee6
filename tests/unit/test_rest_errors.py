"""Every error path of the session routes: the DESIGN error shape, the right status, no 500."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagewire.agent.node import AgentState
from pagewire.agent.settings import Settings
from pagewire.control.app import create_app


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "roots"
    root.mkdir()
    (root / "img").write_bytes(b"\1" * 8192)
    (root / "odd").write_bytes(b"\1" * 100)
    (tmp_path / "secret").write_bytes(b"\2" * 4096)
    os.symlink(tmp_path / "secret", root / "escape")
    return root


@pytest.fixture
def client(tmp_path: Path, roots: Path) -> Iterator[TestClient]:
    settings = Settings(
        socket_dir=tmp_path / "sock", state_dir=tmp_path / "state", export_roots=[roots]
    )
    state = AgentState(settings)
    state.sessions.prepare_dirs()
    with TestClient(create_app(state), raise_server_exceptions=False) as c:
        yield c


def assert_error(r, status: int, code: str | None = None) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


@pytest.mark.parametrize(
    "body,status,code",
    [
        ("{", 400, "malformed_json"),
        ("[]", 400, "malformed_body"),
        ('"text"', 400, "malformed_body"),
        ("{}", 400, "invalid_request"),
        ('{"source": {}}', 400, None),
        ('{"source": {"path": "/x"}, "bogus": 1}', 400, "unknown_field"),
        ('{"source": {"path": "/x", "extra": 1}}', 400, None),
        ('{"source": {"path": 5}}', 400, None),
        ('{"source": {"path": "relative/img"}}', 400, "invalid_path"),
        ('{"source": {"path": "/etc/passwd"}}', 403, "outside_export_roots"),
        ('{"source": {"path": "ROOT/escape"}}', 403, "outside_export_roots"),
        ('{"source": {"path": "ROOT/missing"}}', 404, "not_found"),
        ('{"source": {"path": "ROOT/odd"}}', 400, "invalid_image"),
        ('{"source": {"path": "ROOT/img"}, "prefetch": "all"}', 400, None),
        ('{"source": {"path": "ROOT/img"}, "on_source_lost": "zeros"}', 400, None),
        ('{"source": {"path": "ROOT/img"}, "attach_timeout_s": 0}', 422, "out_of_bounds"),
        ('{"source": {"path": "ROOT/img"}, "pause_timeout_s": 1e9}', 422, "out_of_bounds"),
        ('{"source": {"path": "ROOT/img"}, "socket": {"mode": "0666"}}', 400, None),
        ('{"source": {"path": "ROOT/img"}, "socket": {"mode": "rwx"}}', 400, None),
        ('{"source": {"path": "ROOT/img"}, "socket": {"uid": -1}}', 422, "out_of_bounds"),
        ('{"source": {"peer": "not a peer", "export": "x"}}', 400, None),
        ('{"source": {"peer": "127.0.0.1:1", "export": ""}}', 422, None),
    ],
)
def test_create_errors(
    client: TestClient, roots: Path, body: str, status: int, code: str | None
) -> None:
    r = client.post(
        "/v1/sessions",
        content=body.replace("ROOT", str(roots)),
        headers={"content-type": "application/json"},
    )
    assert_error(r, status, code)


def test_unknown_session(client: TestClient) -> None:
    assert_error(client.get("/v1/sessions/s-nope"), 404, "session_not_found")
    assert_error(client.delete("/v1/sessions/s-nope"), 404, "session_not_found")


def test_bad_state_filter(client: TestClient) -> None:
    assert_error(client.get("/v1/sessions?state=sleeping"), 400)


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/v1/sessions"), 405, "method_not_allowed")


def test_body_too_large(client: TestClient) -> None:
    r = client.post(
        "/v1/sessions",
        content=b"{" + b" " * (2 << 20) + b"}",
        headers={"content-type": "application/json"},
    )
    assert_error(r, 413, "body_too_large")


def test_session_created_then_cancelled_before_attach(client: TestClient, roots: Path) -> None:
    r = client.post("/v1/sessions", json={"source": {"path": str(roots / "img")}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "source",
                "prefetch",
                "background",
                "on_source_lost",
                "pause_timeout_s",
                "attach_timeout_s",
                "socket",
                "x",
            ]
        ),
        json_values,
        max_size=5,
    )
)
def test_no_malformed_body_gives_500(client: TestClient, body: dict) -> None:
    r = client.post("/v1/sessions", json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()) == {"error"}
    else:
        client.delete(f"/v1/sessions/{r.json()['id']}")
