"""The Grafana dashboard: valid JSON of the expected shape, the requested panels, and PromQL
that promtool parses and that reads only the agent's metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .common import (
    AGENT_METRICS,
    DASHBOARD,
    PROMETHEUS_SERIES,
    SERIES_NAMES,
    grafana_to_promql,
    metric_names,
    run_promtool,
    yaml_module,
)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    """(where, expression) for every query of the dashboard, variables included."""
    found = []
    for panel in panels():
        for target in panel["targets"]:
            found.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(selector, label) -> the selector
            inner = query[len("label_values(") : query.rindex(",")]
            found.append((f"variable {var['name']}", inner))
    return found


def test_dashboard_shape() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24


def test_requested_panels() -> None:
    by_title = {p["title"]: p for p in panels()}
    heatmap = by_title["Fault latency (all resolutions)"]
    assert heatmap["type"] == "heatmap"
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "pagewire_fault_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
    quantiles = [t["expr"] for t in by_title["Fault latency p50 / p99 by resolution"]["targets"]]
    assert any(e.startswith("histogram_quantile(0.5,") and "resolution" in e for e in quantiles)
    assert any(e.startswith("histogram_quantile(0.99,") and "resolution" in e for e in quantiles)
    faults = by_title["Faults/s by resolution"]["targets"][0]["expr"]
    assert "rate(pagewire_faults_total" in faults and "by (resolution)" in faults
    transfer = " ".join(t["expr"] for t in by_title["Peer bytes/s"]["targets"])
    assert "pagewire_bytes_sent_total" in transfer and "pagewire_bytes_received_total" in transfer
    states = by_title["Sessions by state"]["targets"][0]["expr"]
    assert "pagewire_sessions{" in states and "by (state)" in states
    top = by_title["Top sessions by pages remaining"]["targets"][0]["expr"]
    assert top.startswith("topk(") and "pagewire_session_pages_remaining" in top


@pytest.mark.parametrize("where,expr", expressions())
def test_expressions_read_only_agent_metrics(where: str, expr: str) -> None:
    names = metric_names(grafana_to_promql(expr))
    assert names, f"{where}: reads no metric"
    unknown = names - SERIES_NAMES - PROMETHEUS_SERIES
    assert not unknown, f"{where}: {unknown}"


def test_dashboard_covers_the_agent_metrics() -> None:
    read = set()
    for _where, expr in expressions():
        for name in metric_names(grafana_to_promql(expr)):
            for suffix in ("_bucket", "_sum", "_count"):
                name = name.removesuffix(suffix) if name[: -len(suffix)] in AGENT_METRICS else name
            read.add(name)
    assert AGENT_METRICS - read == set()


def test_expressions_parse(tmp_path: Path) -> None:
    """promtool cannot parse a bare expression, so each one becomes a recording rule."""
    rules = [
        {"record": f"pagewire:dashboard_query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_where, expr) in enumerate(expressions())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(
        yaml_module().safe_dump(
            {"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False
        )
    )
    out = run_promtool("check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
