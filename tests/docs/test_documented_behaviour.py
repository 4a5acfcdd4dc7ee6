"""What the docs promise about the running agent, checked against a real one: offline API
docs, readiness while drained, stale exports on read, node sources, RFC 3339 timestamps,
the pages-remaining gauge before attach, JSON logs without ANSI colour codes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagewire.tools.localagents import LocalAgent

MiB = 1 << 20


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[LocalAgent]:
    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    a = LocalAgent(tmp_path, "agent", [roots], extra=["--log-json"]).start()
    yield a
    a.stop()


def test_api_docs_work_offline(agent: LocalAgent) -> None:
    """/docs and /redoc, and every script, style sheet and image they load, come from the
    agent itself: no other host is referenced."""
    for page in ("/docs", "/redoc"):
        r = agent.request("GET", page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
        refs += re.findall(r"""url\s*:\s*["']([^"']+)["']""", r.text)  # the OpenAPI document
        refs += re.findall(r"""spec-url\s*=\s*["']([^"']+)["']""", r.text)
        assert refs, page
        assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", r.text), page
        for ref in set(refs):
            assert ref.startswith("/"), f"{page} loads {ref} from elsewhere"
            asset = agent.request("GET", ref)
            assert asset.status_code == 200 and asset.content, f"{page}: {ref}"
        assert "/openapi.json" in refs or "/openapi.json" in r.text


def test_readyz_while_drained_and_timestamps(agent: LocalAgent) -> None:
    ready = agent.request("GET", "/readyz").json()
    assert ready["checks"]["accepting"] is True
    assert agent.request("POST", "/v1/admin/drain").status_code == 200
    r = agent.request("GET", "/readyz")
    assert r.status_code == 200 and r.json()["checks"]["accepting"] is False
    body = {"source": {"path": "/nonexistent"}}
    refused = agent.request("POST", "/v1/sessions", json=body)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert agent.request("DELETE", "/v1/admin/drain").status_code == 200
    assert agent.request("GET", "/readyz").json()["checks"]["accepting"] is True


def test_export_shows_stale_after_its_file_changes(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(MiB, name="vm.mem")
    made = agent.request("POST", "/v1/exports", json={"name": "vm", "path": str(img)})
    assert made.status_code == 201 and made.json()["state"] == "ready"
    with open(img, "r+b") as f:
        f.write(b"changed")
    listed = agent.request("GET", "/v1/exports").json()["exports"]
    assert [e["state"] for e in listed] == ["stale"]
    withdrawn = agent.request("DELETE", "/v1/exports/vm").json()
    assert withdrawn["state"] == "stale"


@pytest.mark.usefixtures("require_uffd")
def test_session_status_before_attach(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(MiB, name="local.mem")
    s = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}}).json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", s["created_at"])
    metrics = agent.request("GET", "/metrics").text
    # awaiting attach: the layout (so the page count) is not known yet, so no sample
    assert f'pagewire_session_pages_remaining{{session="{s["id"]}"}}' not in metrics
    # ... while the session's other gauges are there (so the label format is right)
    assert f'pagewire_session_paused_seconds{{session="{s["id"]}"}}' in metrics
    agent.request("DELETE", f"/v1/sessions/{s['id']}")


def test_node_source_keeps_its_name(tmp_path: Path, image) -> None:  # type: ignore[no-untyped-def]
    img = image(MiB, name="n.mem")
    source = LocalAgent(tmp_path, "node-src", [img.parent]).start()
    dest = LocalAgent(
        tmp_path, "node-dst", [], extra=["--peer-dns-pattern", f"127.0.0.1:{source.grpc_port}"]
    ).start()
    try:
        assert source.request(
            "POST", "/v1/exports", json={"name": "n", "path": str(img)}
        ).is_success
        body = {"source": {"node": "node-src", "export": "n"}}
        s = dest.request("POST", "/v1/sessions", json=body).json()
        assert s["source"]["node"] == "node-src" and s["source"]["export"] == "n"
        assert s["source"]["peer"] == source.grpc
        dest.request("DELETE", f"/v1/sessions/{s['id']}")
    finally:
        dest.stop()
        source.stop()


def test_json_logs_carry_no_ansi(agent: LocalAgent) -> None:
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline and "uvicorn" not in text:
        text = agent.log_path.read_text()
        time.sleep(0.1)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(e["logger"].startswith("uvicorn") for e in lines)
    assert not any("color_message" in e for e in lines)
    assert "\x1b[" not in text
