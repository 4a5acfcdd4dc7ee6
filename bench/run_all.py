"""Every benchmark in one command: local restore, network baselines, remote restore.

Runs ``local_restore.py`` (a subprocess: engine vs the minimal C handler), then the
network baselines once, then the remote benchmark, which compares against those same
baselines. Writes each part's results file, then ``bench/results/all.json``, and prints it.

usage: python bench/run_all.py [--quick] [--runs 3] [--local-mib 256]
                               [remote.py options, e.g. --restore-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import net_baselines
import remote
from common import RESULTS_DIR, emit

BENCH_DIR = Path(__file__).resolve().parent


def write(name: str, result: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def local_restore(size_mib: int, runs: int) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "local_restore.py")]
    cmd += ["--size-mib", str(size_mib), "--runs", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"local_restore.py exited {proc.returncode}: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local-mib", type=int, default=None, help="local restore image (256)")
    a, rest = p.parse_known_args()
    ra = remote.parse_args(rest)
    quick = ra.quick
    local_mib = a.local_mib or (64 if quick else 256)
    started = time.monotonic()
    suffix = "_quick" if quick else ""

    print(f"local restore ({local_mib} MiB, {ra.runs} runs) ...", file=sys.stderr)
    local = local_restore(local_mib, ra.runs)

    print("network baselines ...", file=sys.stderr)
    baselines = net_baselines.run_all(**(net_baselines.quick_args() if quick else {}))
    write("net_baselines" + suffix, {**baselines, "quick": quick})

    print("remote ...", file=sys.stderr)
    rem = remote.run(ra, baselines)
    write("remote" + suffix, rem)

    result = {
        "machine": {
            "vcpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "local_restore": local,
        "net_baselines": baselines,
        "remote": {k: v for k, v in rem.items() if k != "baselines"},
        "vs_targets": {
            "local_restore_time_ratio": {
                "measured": local["total_time_ratio_engine_over_minimal"],
                "target": local["target_ratio"],
                "direction": "<=",
                "met": local["total_time_ratio_engine_over_minimal"] <= local["target_ratio"],
            },
            **rem["vs_targets"],
        },
        "bench_s": round(time.monotonic() - started, 1),
    }
    emit("all" + suffix, result)


if __name__ == "__main__":
    main()
