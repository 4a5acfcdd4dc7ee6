"""Control plane: event stream, cancel with SIGBUS, token, and a real Prometheus scraping a
real agent that has just restored an image from a peer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pagewire.tools.localagents import LocalAgent

from tests.prom import prometheus

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def workload(sock: str, size: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pagewire.tools.workload", "--socket", sock, "--size", str(size)]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_state(agent: LocalAgent, sid: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = agent.request("GET", f"/v1/sessions/{sid}").json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


@pytest.fixture
def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    a = LocalAgent(tmp_path, "agent", [roots]).start()
    yield a
    a.stop()


def test_event_stream_gives_progress_then_end(agent: LocalAgent, image) -> None:
    img = image(16 * MiB)
    s = agent.request(
        "POST", "/v1/sessions", json={"source": {"path": str(img)}, "background": False}
    ).json()
    events: list[tuple[str, dict]] = []
    proc = workload(
        s["socket"], 16 * MiB, "--order", "sequential", "--hold", "0", "--verify", str(img)
    )
    with httpx.stream("GET", f"{agent.url}/v1/sessions/{s['id']}/events", timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    proc.communicate(timeout=60)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert "progress" in kinds
    assert events[-1][1]["state"] == "completed"


def test_cancel_gives_sigbus_never_zeros(agent: LocalAgent, image) -> None:
    img = image(16 * MiB)
    s = agent.request(
        "POST", "/v1/sessions", json={"source": {"path": str(img)}, "background": False}
    ).json()
    proc = workload(s["socket"], 16 * MiB, "--order", "none", "--hold", "1.5", "--verify", str(img))
    wait_state(agent, s["id"], ("running",))
    r = agent.request("DELETE", f"/v1/sessions/{s['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled"
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGBUS


def test_token_guards_every_route_but_health_and_metrics(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    a = LocalAgent(tmp_path, "tok", [], extra=["--token-file", str(token)]).start()
    try:
        for path in ("/v1/sessions", "/v1/exports", "/v1/info"):
            r = a.request("GET", path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = a.request("GET", path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = a.request("GET", path, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, r.text
        for path in ("/healthz", "/readyz", "/metrics"):
            assert a.request("GET", path).status_code == 200
    finally:
        a.stop()


PROM_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pagewire
    static_configs:
      - targets: ["{target}"]
"""


def prom_query(base: str, query: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=10)
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict] = body["data"]["result"]
    return result


def test_real_prometheus_scrapes_a_restoring_agent(tmp_path: Path, image) -> None:
    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    src = LocalAgent(tmp_path, "src", [roots]).start()
    dst = LocalAgent(tmp_path, "dst", []).start()
    try:
        img = image(16 * MiB)
        assert (
            src.request("POST", "/v1/exports", json={"name": "img", "path": str(img)}).status_code
            == 201
        )
        s = dst.request(
            "POST",
            "/v1/sessions",
            json={"source": {"peer": src.grpc, "export": "img"}, "background": False},
        ).json()
        proc = workload(s["socket"], 16 * MiB, "--threads", "2", "--verify", str(img))
        out, _ = proc.communicate(timeout=120)
        assert b'"verified": true' in out
        status = wait_state(dst, s["id"], ("completed",))
        config = PROM_CONFIG.replace("{target}", f"127.0.0.1:{dst.http_port}")
        with prometheus(tmp_path / "prom", config) as base:
            deadline = time.monotonic() + 60
            faults: list[dict] = []
            while time.monotonic() < deadline:
                try:
                    faults = prom_query(base, "sum(pagewire_faults_total)")
                except (httpx.HTTPError, ValueError):
                    faults = []
                if faults:
                    break
                time.sleep(0.5)
            assert faults, "Prometheus never scraped the agent"
            total = sum(status["faults"].values())
            assert float(faults[0]["value"][1]) == total
            remote = prom_query(base, 'pagewire_faults_total{resolution="remote"}')
            assert float(remote[0]["value"][1]) == status["faults"]["remote"]
            q = prom_query(
                base, "histogram_quantile(0.5, sum by (le) (pagewire_fault_latency_seconds_bucket))"
            )
            p50 = float(q[0]["value"][1])
            own = status["fault_latency_seconds"]["p50"]
            # Prometheus interpolates within power-of-two buckets; the engine's own buckets are
            # four per power of two: the two agree within a factor of two
            assert own / 2 <= p50 <= own * 2, (p50, own)
            count = prom_query(base, "sum(pagewire_fault_latency_seconds_count)")
            assert float(count[0]["value"][1]) == total
    finally:
        dst.stop()
        src.stop()
