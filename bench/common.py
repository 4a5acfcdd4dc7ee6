"""Helpers shared by the benchmarks: images, agents, workloads, JSON output."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from pagewire.control.models import epoch_seconds  # noqa: E402
from pagewire.tools.localagents import LocalAgent  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


def run_workload(socket_path: str, size: int, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pagewire.tools.workload", "--socket", socket_path]
    cmd += ["--size", str(size)]
    out = subprocess.run([*cmd, *args], capture_output=True, check=True, timeout=600).stdout
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def wait_ended(agent: LocalAgent, session_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = agent.request("GET", f"/v1/sessions/{session_id}").json()
        if status["state"] not in ("awaiting_attach", "running", "paused"):
            return status
        time.sleep(0.02)
    raise TimeoutError(session_id)


def at(status: dict[str, Any], key: str) -> float:
    """A status timestamp (RFC 3339) as epoch seconds."""
    value = epoch_seconds(status[key])
    assert value is not None, key
    return value


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def emit(name: str, result: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    text = json.dumps(result, indent=2)
    (RESULTS_DIR / f"{name}.json").write_text(text + "\n")
    print(text)
