"""Every PromQL expression of the dashboard and the alerts, evaluated by a real Prometheus that
scrapes two real agents right after a post-copy restore between them; every metric the
expressions name is one the agents export, and every alert rule evaluates without error."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .common import PROMETHEUS, PROMETHEUS_SERIES, grafana_to_promql, metric_names
from .test_grafana import expressions as dashboard_expressions
from .test_prometheus import all_rules

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def exported_series(metrics_text: str) -> set[str]:
    """Series names an exposition offers: its samples, plus the series of every declared family
    (a labelled family with no children yet has a TYPE line but no samples)."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def query(base: str, expr: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = r.json()
    return body


def test_dashboard_and_alert_queries_against_real_agents(tmp_path: Path, image) -> None:  # type: ignore[no-untyped-def]
    from pagewire.tools.localagents import LocalAgent

    from tests.prom import prometheus

    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    src = LocalAgent(tmp_path, "src", [roots]).start()
    dst = LocalAgent(tmp_path, "dst", []).start()
    try:
        size = 8 * MiB
        img = image(size)
        r = src.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
        assert r.status_code == 201, r.text
        # no bulk fill: every page comes by a fault, so the fault series are never empty
        body = {"source": {"peer": src.grpc, "export": "img"}, "background": False}
        r = dst.request("POST", "/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        session = r.json()
        cmd = [sys.executable, "-m", "pagewire.tools.workload", "--socket", session["socket"]]
        proc = subprocess.run(
            [*cmd, "--size", str(size), "--threads", "2", "--verify", str(img)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert b'"verified": true' in proc.stdout, proc.stderr
        deadline = time.monotonic() + 60
        while dst.request("GET", f"/v1/sessions/{session['id']}").json()["state"] != "completed":
            assert time.monotonic() < deadline, "the restore never completed"
            time.sleep(0.05)

        exported = set()
        for agent in (src, dst):
            r = agent.request("GET", "/metrics")
            assert r.status_code == 200
            exported |= exported_series(r.text)

        targets = ", ".join(f'"127.0.0.1:{a.http_port}"' for a in (src, dst))
        config = (
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yaml]\n"
            "scrape_configs:\n"
            f"  - job_name: pagewire\n    static_configs: [{{targets: [{targets}]}}]\n"
        )
        rules = (PROMETHEUS / "rules.yaml").read_text()
        with prometheus(tmp_path / "prom", config, rules) as base:
            deadline = time.monotonic() + 60
            while True:
                try:
                    # two scrapes of both agents, so rate() has two samples
                    up = query(base, 'count_over_time(up{job="pagewire"}[1m]) >= 2')
                    if up.get("status") == "success" and len(up["data"]["result"]) == 2:
                        break
                except (httpx.HTTPError, ValueError):  # 503 text while Prometheus starts
                    pass
                assert time.monotonic() < deadline, "Prometheus never scraped both agents"
                time.sleep(0.5)

            named = set()
            cases = [(w, grafana_to_promql(e)) for w, e in dashboard_expressions()]
            cases += [(f"rule {r['alert']}", r["expr"]) for r in all_rules()]
            for where, expr in cases:
                body = query(base, expr)
                assert body["status"] == "success", f"{where}: {body}"
                named |= metric_names(expr)
            assert not named - exported - PROMETHEUS_SERIES, "named but not exported"

            # Values: the restore's faults are visible through the dashboard's own query.
            faults = query(base, "sum(pagewire_faults_total)")["data"]["result"]
            assert faults and float(faults[0]["value"][1]) > 0

            # Every alert rule has been evaluated, without error.
            deadline = time.monotonic() + 30
            while True:
                groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
                evaluated = [rule for g in groups for rule in g["rules"]]
                if len(evaluated) == len(all_rules()) and all(
                    rule["health"] != "unknown" for rule in evaluated
                ):
                    break
                assert time.monotonic() < deadline, evaluated
                time.sleep(0.5)
            bad = {
                rule["name"]: rule.get("lastError") for rule in evaluated if rule["health"] != "ok"
            }
            assert not bad
            # Both agents are up: the down alerts must not be firing.
            firing = {rule["name"] for rule in evaluated if rule["state"] == "firing"}
            assert not firing & {"PagewireAgentDown", "PagewireAgentsAbsent"}
    finally:
        dst.stop()
        src.stop()
