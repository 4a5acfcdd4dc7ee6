"""Property-based run over /openapi.json: every route, random path parameters, query
strings and bodies; no response is ever a 5xx, and every error has the DESIGN shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagewire.agent.node import AgentState
from pagewire.agent.settings import Settings
from pagewire.control.app import create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    (tmp / "roots").mkdir()
    (tmp / "roots" / "img").write_bytes(b"\1" * 8192)
    settings = Settings(
        socket_dir=tmp / "sock",
        state_dir=tmp / "state",
        export_roots=[tmp / "roots"],
        grpc="127.0.0.1:0",
    )
    state = AgentState(settings)
    app = create_app(state)

    @app.on_event("startup")
    async def _start() -> None:
        await state.start()

    @app.on_event("shutdown")
    async def _stop() -> None:
        await state.stop()
        await state.close()

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def operations(client: TestClient) -> list[tuple[str, str]]:
    spec: dict[str, Any] = client.get("/openapi.json").json()
    ops = []
    for path, item in spec["paths"].items():
        for method in item:
            if path.endswith("/events"):
                continue  # a stream: covered by the integration tests
            ops.append((method.upper(), path))
    return ops


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
body_keys = st.sampled_from(
    [
        "name",
        "path",
        "source",
        "peer",
        "export",
        "node",
        "prefetch",
        "background",
        "socket",
        "mode",
        "attach_timeout_s",
        "x",
    ]
)
bodies = st.dictionaries(body_keys, json_value, max_size=5) | json_value
segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#%"),
    min_size=1,
    max_size=40,
)


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = {p for _, p in operations(client)}
    for expected in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/info",
        "/v1/exports",
        "/v1/exports/{name}",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
    ):
        assert expected in paths


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_route_answers_5xx(client: TestClient, data: st.DataObject) -> None:
    method, path = data.draw(st.sampled_from(operations(client)))
    path = re.sub(r"\{[^}]+\}", lambda _: data.draw(segment), path)
    query = data.draw(
        st.dictionaries(
            st.sampled_from(["state", "x"]),
            st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=10),
            max_size=2,
        )
    )
    kwargs: dict[str, Any] = {"params": query}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = data.draw(bodies)
    r = client.request(method, path, **kwargs)
    assert r.status_code < 500, (method, path, kwargs, r.text)
    if r.status_code >= 400:
        assert set(r.json()) == {"error"}, r.text
    if method == "POST" and path == "/v1/sessions" and r.status_code == 201:
        client.delete(f"/v1/sessions/{r.json()['id']}")
