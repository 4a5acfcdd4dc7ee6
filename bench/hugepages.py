"""Remote restore of a huge-page (2 MiB hugetlbfs) workload: the native channel, which
gathers each huge page's chunks in the engine, against gRPC (Python gathers them), on the
same image in the same run; plain text, two agents on this machine.

Needs root (it reserves huge pages through /proc/sys/vm/nr_hugepages and gives them back).

usage: python bench/hugepages.py [--size-mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, at, emit, median
from pagewire.tools.images import data_bytes, make_image
from remote import check, create_session, finish_workload, start_workload, wait_sessions

HUGE = 2 * MiB
NR = Path("/proc/sys/vm/nr_hugepages")


def restore(source: LocalAgent, dest: LocalAgent, image: Path, size: int) -> dict[str, Any]:
    """One restore: 2 threads touch every huge page in random order while bulk runs."""
    session = create_session(dest, source, "huge", True)
    args = ["--page-size", str(HUGE), "--order", "random", "--threads", "2"]
    proc = start_workload(session["socket"], size, *args, "--verify", str(image))
    (status,), _ = wait_sessions(dest, [session["id"]])
    seen = finish_workload(proc)
    dest.request("DELETE", f"/v1/sessions/{session['id']}")
    if status["state"] != "completed" or not seen.get("verified"):
        raise RuntimeError(f"restore failed: {status} {seen}")
    return {
        "create_to_complete_s": round(at(status, "completed_at") - at(status, "created_at"), 4),
        "transport": status["transport"],
        "bytes_received": status["bytes_received"],
        "fault_p50_us": round(status["fault_latency_seconds"]["p50"] * 1e6, 1),
        "fault_p99_us": round(status["fault_latency_seconds"]["p99"] * 1e6, 1),
        "faults_remote": status["faults"]["remote"],
    }


def measure(work: Path, roots: Path, image: Path, size: int, runs: int, native: bool) -> dict:
    extra = [] if native else ["--no-native-channel"]
    source = LocalAgent(work, "source", [roots], extra=extra).start()
    dest = LocalAgent(work, "destination", [], extra=extra).start()
    try:
        body = {"name": "huge", "path": str(image)}
        check(source.request("POST", "/v1/exports", json=body, timeout=300), "exporting")
        results = [restore(source, dest, image, size) for _ in range(runs)]
    finally:
        dest.stop()
        source.stop()
    out: dict[str, Any] = {"transport": results[0]["transport"], "runs": results}
    for key in ("create_to_complete_s", "fault_p50_us", "fault_p99_us", "bytes_received"):
        out[key] = median([float(r[key]) for r in results])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    size = a.size_mib * MiB
    before = int(NR.read_text())
    NR.write_text(str(before + size // HUGE + 16))
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="pagewire-bench-huge-") as tmp:
            work, roots = Path(tmp), Path(tmp) / "roots"
            roots.mkdir()
            image = roots / "huge.img"
            make_image(image, size, seed=21)
            grpc = measure(work / "grpc", roots, image, size, a.runs, native=False)
            native = measure(work / "native", roots, image, size, a.runs, native=True)
            data = data_bytes(image)
    finally:
        NR.write_text(str(before))
    emit(
        "hugepages",
        {
            "command": f"python bench/hugepages.py --size-mib {a.size_mib} --runs {a.runs}",
            "image_mib": a.size_mib,
            "page_size": HUGE,
            "native": native,
            "grpc_baseline": grpc,
            "data_bytes": data,
            "bytes_received_over_data_native": round(native["bytes_received"] / data, 4),
            "bytes_received_over_data_grpc": round(grpc["bytes_received"] / data, 4),
            "restore_time_native_over_grpc": round(
                native["create_to_complete_s"] / grpc["create_to_complete_s"], 3
            ),
            "fault_p99_native_over_grpc": round(native["fault_p99_us"] / grpc["fault_p99_us"], 3),
            "bench_s": round(time.monotonic() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
