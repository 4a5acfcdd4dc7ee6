"""Two agents for tests: in network namespaces joined by veth when root, else loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagewire.tools.localagents import LocalAgent

from tests.netns import NetnsPair
from tests.pki import agent_pki
from tests.workloads import workload_command


def can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass
class Peers:
    source: LocalAgent
    dest: LocalAgent
    roots: Path
    net: NetnsPair | None


def start_pair(
    tmp: Path,
    extra_src: list[str] | None = None,
    extra_dst: list[str] | None = None,
    tls: bool = False,
    isolated: bool = True,
) -> Peers:
    """isolated: in network namespaces when root. The test process itself then reaches
    the agents only through their unix-socket REST API, never their namespace addresses."""
    roots = tmp / "roots"
    roots.mkdir(exist_ok=True)
    net = NetnsPair.create() if isolated and can_netns() else None
    host_a = net.addr_a if net else "127.0.0.1"
    host_b = net.addr_b if net else "127.0.0.1"
    src_extra, dst_extra = list(extra_src or []), list(extra_dst or [])
    if tls:
        pki = agent_pki(
            tmp / "pki", {"source": [host_a, "127.0.0.1"], "destination": [host_b, "127.0.0.1"]}
        )
        for name, extra in (("source", src_extra), ("destination", dst_extra)):
            extra += [
                "--tls-cert",
                str(pki / f"{name}.crt"),
                "--tls-key",
                str(pki / f"{name}.key"),
                "--tls-ca",
                str(pki / "ca.crt"),
            ]
    elif net:
        src_extra.append("--insecure-peers")
        dst_extra.append("--insecure-peers")
    source = LocalAgent(
        tmp, "source", [roots], host=host_a, extra=src_extra, netns=net.a if net else None
    )
    dest = LocalAgent(
        tmp, "destination", [], host=host_b, extra=dst_extra, netns=net.b if net else None
    )
    try:
        source.start()
        dest.start()
    except BaseException:
        source.kill()
        dest.kill()
        if net:
            net.destroy()
        raise
    return Peers(source, dest, roots, net)


def stop_pair(p: Peers) -> None:
    p.dest.stop()
    p.source.stop()
    if p.net:
        p.net.destroy()


def publish(p: Peers, image: Path, name: str = "img") -> dict[str, Any]:
    r = p.source.request("POST", "/v1/exports", json={"name": name, "path": str(image)})
    assert r.status_code == 201, r.text
    return r.json()


def restore(
    p: Peers,
    image: Path,
    *args: str,
    kind: str = "client",
    ready: Callable[[dict], None] | None = None,
    **options: Any,
) -> tuple[dict, dict]:
    """Restore the export into a workload of this kind (tests/workloads.py) and wait for
    the session's end; returns what the workload saw and the session's status. ready, if
    given, is called with the new session before the workload starts."""
    body = {"source": {"peer": p.source.grpc, "export": "img"}, **options}
    r = p.dest.request("POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    session = r.json()
    if ready is not None:
        ready(session)
    size = image.stat().st_size
    cmd = workload_command(kind, session["socket"], size, "--verify", str(image), *args)
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    lines = done.stdout.decode().splitlines()
    assert lines, f"the workload printed nothing (exit {done.returncode}): {done.stderr!r}"
    seen = json.loads(lines[-1])
    deadline = time.monotonic() + 60
    while True:
        status = p.dest.request("GET", f"/v1/sessions/{session['id']}").json()
        if status["state"] not in ("awaiting_attach", "running", "paused"):
            return seen, status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def record_working_set(p: Peers, image: Path, *args: str, **options: Any) -> dict:
    """Restore once (the destination records the first touches and uploads them as the
    session completes) and wait until the source holds the working set; returns the
    session's status."""
    seen, status = restore(p, image, *args, **options)
    assert seen["verified"] and status["state"] == "completed", (seen, status)
    record = p.source.workdir / "state" / "exports" / "img.json"
    deadline = time.monotonic() + 10
    while not json.loads(record.read_text())["working_set"]:
        assert time.monotonic() < deadline, "no working set uploaded"
        time.sleep(0.02)
    return status


def staged(p: Peers) -> Callable[[dict], None]:
    """A ready hook for restore(): wait until the destination has logged a working set
    staged (its pair's first; as a VM would start a while after its session)."""

    def wait(session: dict) -> None:
        deadline = time.monotonic() + 20
        while "working set staged:" not in p.dest.log_path.read_text():
            assert time.monotonic() < deadline, f"session {session['id']}: nothing staged"
            time.sleep(0.02)

    return wait
