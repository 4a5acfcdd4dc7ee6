"""Every benchmark in one command: local restore, network baselines, remote restore,
working-set replay.

Runs ``local_restore.py`` (a subprocess: engine vs the minimal C handler), then the
network baselines once, then the remote benchmark (plain text and mTLS side by side),
which compares against those same baselines, then ``working_set.py``. Writes each part's
results file, then ``bench/results/all.json``, and prints it; on stderr, one line per
target of issues 8 and 15 with its figure in each configuration and the same run's
baselines (raw TCP loopback, gRPC, the local restore by UFFDIO_COPY).

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
import working_set
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

    print("working set ...", file=sys.stderr)
    wa = working_set.parse_args(["--quick"] if quick else ["--runs", str(ra.runs)])
    ws = working_set.run(wa)
    write("working_set" + suffix, ws)

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
        "working_set": ws,
        "vs_targets": {
            "local_restore_time_ratio": {
                "measured": local["total_time_ratio_engine_over_minimal"],
                "target": local["target_ratio"],
                "direction": "<=",
                "met": local["total_time_ratio_engine_over_minimal"] <= local["target_ratio"],
            },
            **{
                f"{name} ({config})": t
                for config, ts in rem["vs_targets_by_config"].items()
                for name, t in ts.items()
            },
            **ws["vs_targets"],
        },
        "baselines_same_run": baselines_line(baselines, local),
        "bench_s": round(time.monotonic() - started, 1),
    }
    emit("all" + suffix, result)
    print_targets(result)


def baselines_line(baselines: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """The same run's baselines every target is read against."""
    image_bytes = local["image_mib"] * (1 << 20)
    return {
        "raw_tcp_loopback_gbps": baselines["tcp_throughput"]["gbps"],
        "tcp_round_trip_p50_us": baselines["tcp_round_trip"]["p50_us"],
        "grpc_stream_gbps": baselines["grpc_stream"]["gbps"],
        "grpc_bidi_round_trip_p50_us": baselines["grpc_bidi_round_trip"]["p50_us"],
        # a local restore (image bytes over total time, random touch, 2 threads): the
        # minimal C handler (one UFFDIO_COPY per fault) and the engine (local file)
        "minimal_c_handler_local_gbps": round(
            image_bytes / local["minimal_c_handler"]["total_s"] / 1e9, 4
        ),
        "engine_local_restore_gbps": round(image_bytes / local["engine"]["total_s"] / 1e9, 4),
    }


def print_targets(result: dict[str, Any]) -> None:
    """One line per target: measured, target, met (on stderr; stdout is the JSON)."""
    print(
        "\ntarget                                         measured     target  met", file=sys.stderr
    )
    for name, t in result["vs_targets"].items():
        measured = "-" if t["measured"] is None else f"{t['measured']:.4g}"
        line = f"{name:46} {measured:>9} {t['direction']} {t['target']:<7} {t['met']}"
        print(line, file=sys.stderr)
    print(f"baselines (same run): {json.dumps(result['baselines_same_run'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
