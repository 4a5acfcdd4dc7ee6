"""Shared helpers for the deployment tests: paths, YAML loading, PromQL metric names, promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE_BASE = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "pagewire-dashboard.json"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DOCS = ROOT / "docs"

# The agent's metrics (DESIGN section 6; names fixed with the metrics work). Histograms also
# expose _bucket, _sum and _count series.
COUNTERS = {
    "pagewire_faults_total",
    "pagewire_pages_installed_total",
    "pagewire_bytes_sent_total",
    "pagewire_bytes_received_total",
    "pagewire_sessions_ended_total",
    "pagewire_digest_failures_total",
    "pagewire_peer_reconnects_total",
    "pagewire_handoff_rejections_total",
}
GAUGES = {
    "pagewire_sessions",
    "pagewire_session_pages_remaining",
    "pagewire_session_paused_seconds",
    "pagewire_exports",
    "pagewire_build_info",
}
HISTOGRAMS = {"pagewire_fault_latency_seconds", "pagewire_peer_rpc_latency_seconds"}
AGENT_METRICS = COUNTERS | GAUGES | HISTOGRAMS
SERIES_NAMES = (
    COUNTERS | GAUGES | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        need(False, "PyYAML is not installed (pip install -r tests/deploy/requirements.txt)")
    return yaml


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    yaml = yaml_module()
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path} should hold one YAML document"
    return docs[0]


def render_base() -> list[dict[str, Any]]:
    """The base rendered as kustomize would: it has no patches, generators or transformers
    besides `namespace`, so it is its resources in order with that namespace applied."""
    kustomization = load_yaml(KUSTOMIZE_BASE / "kustomization.yaml")
    allowed = {"apiVersion", "kind", "namespace", "resources"}
    extra = set(kustomization) - allowed
    assert not extra, f"the base gained kustomize features {extra}: render with kustomize instead"
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for doc in load_yaml_docs(KUSTOMIZE_BASE / name):
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
            docs.append(doc)
    return docs


CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---- PromQL: which metric names an expression reads -------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, labels, keywords or durations)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so an expression is plain PromQL."""
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
        ("$datasource", "prometheus"),
        ("$job", ".+"),
        ("$instance", ".+"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def promtool() -> str:
    path = shutil.which("promtool")
    need(path is not None, "promtool is not installed (Debian package 'prometheus')")
    assert path is not None
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}{proc.stderr}"
    return proc
