"""The kustomize base: rendered, validated offline against the Kubernetes schemas, and checked
for the least-privilege shape the agent's design needs (docs/deployment.md, "Privileges")."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import need

from .common import (
    CLUSTER_SCOPED,
    KUSTOMIZE_BASE,
    SCHEMAS,
    by_kind,
    render_base,
    yaml_module,
)

# Oldest Kubernetes the base supports (securityContext.appArmorProfile is 1.30) and the newest
# schemas the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render_base()


@pytest.fixture(scope="module")
def daemonset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "DaemonSet")


@pytest.fixture(scope="module")
def agent(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_base_has_the_expected_resources(docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "PriorityClass",
            "ServiceAccount",
            "DaemonSet",
            "Service",
            "PodMonitor",
            "PrometheusRule",
        ]
    )
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "pagewire", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "pagewire", doc["kind"]


def test_kustomize_renders_the_same_resources(docs: list[dict[str, Any]]) -> None:
    """`kubectl kustomize` (or `kustomize build`) agrees with the plain rendering used here."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(KUSTOMIZE_BASE)]
    else:
        need(shutil.which("kubectl") is not None, "needs kustomize or kubectl (Debian: kubectl)")
        cmd = ["kubectl", "kustomize", str(KUSTOMIZE_BASE)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml_module().safe_load_all(out.stdout) if d]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    canon = {key(d): json.dumps(d, sort_keys=True) for d in rendered}
    ours = {key(d): json.dumps(d, sort_keys=True) for d in docs}
    assert canon == ours


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_manifests_validate_against_kubernetes_schemas(
    docs: list[dict[str, Any]], version: str
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        need(
            False,
            "kubernetes-validate is not installed (pip install -r tests/deploy/requirements.txt)",
        )
    core = [d for d in docs if d["kind"] not in OPERATOR_KINDS]
    assert len(core) == 5
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")


@pytest.mark.parametrize("kind", sorted(OPERATOR_KINDS))
def test_operator_resources_match_their_schema(docs: list[dict[str, Any]], kind: str) -> None:
    try:
        import jsonschema
    except ImportError:
        need(False, "jsonschema is not installed (pip install -r tests/deploy/requirements.txt)")
    schema = json.loads((SCHEMAS / f"{kind.lower()}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(by_kind(docs, kind)),
        key=lambda e: list(e.path),
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_operator_schemas_catch_mistakes(docs: list[dict[str, Any]]) -> None:
    """The schemas are strict enough to matter: a misspelt field or a bad duration fails."""
    try:
        import jsonschema
    except ImportError:
        need(False, "jsonschema is not installed (pip install -r tests/deploy/requirements.txt)")
    rule_schema = json.loads((SCHEMAS / "prometheusrule.schema.json").read_text())
    rule = json.loads(json.dumps(by_kind(docs, "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert not jsonschema.Draft202012Validator(rule_schema).is_valid(rule)
    rule = json.loads(json.dumps(by_kind(docs, "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["record"] = "both:alert_and_record"
    assert not jsonschema.Draft202012Validator(rule_schema).is_valid(rule)
    monitor_schema = json.loads((SCHEMAS / "podmonitor.schema.json").read_text())
    monitor = json.loads(json.dumps(by_kind(docs, "PodMonitor")))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert not jsonschema.Draft202012Validator(monitor_schema).is_valid(monitor)


def test_daemonset_is_least_privilege(daemonset: dict[str, Any], agent: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["CHOWN", "SYS_NICE", "SYS_PTRACE"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["hostPID"] is True  # restart recovery: pidfd_getfd on the workload's pid
    assert not pod.get("hostNetwork", False)
    assert not pod.get("hostIPC", False)
    assert pod["automountServiceAccountToken"] is False
    for volume in pod["volumes"]:
        assert volume.get("hostPath", {}).get("path") != "/", "never mount the host's root"


def test_every_privilege_is_commented() -> None:
    """Each added capability, hostPID and each hostPath mount carries a comment saying why."""
    lines = (KUSTOMIZE_BASE / "daemonset.yaml").read_text().splitlines()

    def commented(predicate: str) -> None:
        hits = [i for i, line in enumerate(lines) if line.strip() == predicate]
        assert hits, f"{predicate!r} not found"
        for i in hits:
            assert lines[i - 1].strip().startswith("#"), f"no comment above {predicate!r}"

    commented("- SYS_PTRACE")
    commented("- CHOWN")
    commented("- SYS_NICE")
    commented("hostPID: true")
    commented("- name: sessions")
    commented("- name: state")
    commented("- name: snapshots")


def test_daemonset_host_paths(daemonset: dict[str, Any], agent: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    env = env_of(agent)
    for name, path, setting in (
        ("sessions", "/run/pagewire/sessions", "PAGEWIRE_SOCKET_DIR"),
        ("state", "/var/lib/pagewire", "PAGEWIRE_STATE_DIR"),
        ("snapshots", "/srv/pagewire/snapshots", "PAGEWIRE_EXPORT_ROOTS"),
    ):
        assert volumes[name]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
        # Same path inside and out: the socket path the API returns is the host's path.
        assert mounts[name]["mountPath"] == path
        assert env[setting] == path
    assert mounts["snapshots"]["readOnly"] is True
    assert volumes["tls"]["secret"]["secretName"] == "pagewire-tls"
    assert volumes["token"]["secret"]["secretName"] == "pagewire-token"
    for setting, mount in (
        ("PAGEWIRE_TLS_CERT", "tls"),
        ("PAGEWIRE_TLS_KEY", "tls"),
        ("PAGEWIRE_TLS_CA", "tls"),
        ("PAGEWIRE_TOKEN_FILE", "token"),
    ):
        assert env[setting].startswith(mounts[mount]["mountPath"] + "/"), setting
        assert mounts[mount]["readOnly"] is True


def test_daemonset_identity_probes_and_lifecycle(
    daemonset: dict[str, Any], agent: dict[str, Any]
) -> None:
    spec = daemonset["spec"]
    pod = spec["template"]["spec"]
    env = env_of(agent)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["PAGEWIRE_NODE_NAME"] == "$(NODE_NAME)"
    assert env["PAGEWIRE_ADVERTISE_GRPC"] == "$(POD_IP):7071"
    # $(VAR) references only work to variables defined earlier in the list.
    names = [e["name"] for e in agent["env"]]
    assert names.index("NODE_NAME") < names.index("PAGEWIRE_NODE_NAME")
    assert names.index("POD_IP") < names.index("PAGEWIRE_ADVERTISE_GRPC")
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {p["name"]: p for p in agent["ports"]}
    assert ports["http"]["containerPort"] == 7070
    assert ports["grpc"]["containerPort"] == 7071
    assert ports["grpc"]["hostPort"] == 7071  # PAGEWIRE_PEER_DNS_PATTERN "{node}:7071"
    # the native data channel: dialled on the gRPC host at the port the agent binds
    assert env["PAGEWIRE_DATA_PORT"] == "7072"
    assert ports["data"]["containerPort"] == ports["data"]["hostPort"] == 7072
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(agent["resources"][kind])
    assert {"operator": "Exists"} in pod["tolerations"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    grace = float(env["PAGEWIRE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= grace + 15
    assert pod["priorityClassName"] == "pagewire-node-critical"


def test_daemonset_settings_are_agent_flags(agent: dict[str, Any]) -> None:
    """Every PAGEWIRE_* variable is a setting of the agent (a typo would be rejected at start)."""
    from pagewire.agent.settings import Settings

    fields = {f"PAGEWIRE_{name.upper()}" for name in Settings.model_fields}
    env = env_of(agent)
    unknown = {name for name in env if name.startswith("PAGEWIRE_")} - fields
    assert not unknown


def test_service_is_headless_and_selects_the_agents(
    docs: list[dict[str, Any]], daemonset: dict[str, Any]
) -> None:
    service = by_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("http", 7070),
        ("grpc", 7071),
    }
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = by_kind(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["spec"]["jobLabel"]] == "pagewire"  # alerts: job=~"pagewire.*"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["http"]
