"""Working-set record and replay: the same workload restored twice from a peer.

A source agent exports a generated image; a destination agent restores it twice into a
workload that touches the same working set (the pages of ``--ws-chunks`` randomly chosen
chunks, in a random order, 2 threads) and then waits for the session to complete and
verifies the whole region byte for byte. The first session records the chunks the
workload touched first and uploads that record to the export when it completes; the
second asks for ``"prefetch": "working_set"`` and gets that set first, in one burst.

Figures, each a median over ``--runs`` pairs: demand faults (session ``faults.remote``)
and the time the workload took to touch its working set, first and second restore, and
their ratios against issue 15's targets (faults <= 5%, time <= 1/3). Nothing here asserts.

usage: python bench/working_set.py [--runs 3] [--image-mib 1024] [--ws-chunks 256]
                                   [--transport native|grpc]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, at, emit, median
from pagewire.tools.images import make_image

WORKLOAD = str(Path(__file__).resolve().parent / "ws_workload.py")
CHUNK = 64 << 10
PAGE = 4096


def restore_once(
    source: LocalAgent, dest: LocalAgent, image: Path, size: int, a: argparse.Namespace, n: int
) -> dict[str, Any]:
    prefetch = "around" if n == 0 else "working_set"
    body = {"source": {"peer": source.grpc, "export": "ws"}, "prefetch": prefetch}
    session = dest.request("POST", "/v1/sessions", json=body).json()
    go = Path(tempfile.mktemp(prefix="pagewire-ws-go-"))
    cmd = [sys.executable, WORKLOAD, session["socket"], str(size), str(a.seed)]
    cmd += [str(a.ws_chunks), str(image), str(go)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while True:
        status: dict[str, Any] = dest.request("GET", f"/v1/sessions/{session['id']}").json()
        if status["state"] in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(status)
        time.sleep(0.02)
    go.touch()
    out, err = proc.communicate(timeout=300)
    go.unlink()
    seen = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    if status["state"] != "completed" or not seen.get("verified"):
        raise RuntimeError(f"restore {n}: {status.get('error')} {seen} {err.decode()[-800:]}")
    dest.request("DELETE", f"/v1/sessions/{session['id']}")
    return {
        "prefetch": prefetch,
        "transport": status.get("transport"),
        "faults_remote": status["faults"]["remote"],
        "faults_total": sum(status["faults"].values()),
        "touch_s": seen["touch_s"],
        "first_touch_us": seen["first_touch_us"],
        "attach_to_complete_s": round(at(status, "completed_at") - at(status, "attached_at"), 4),
        "bytes_received": status["bytes_received"],
    }


def wait_for_record(source: LocalAgent, timeout: float = 10.0) -> int:
    """The first session's upload happens as it ends: wait until the export's record (in
    the source's state dir) holds it."""
    record = source.workdir / "state" / "exports" / "ws.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(json.loads(record.read_text()).get("working_set", []))
        if count:
            return count
        time.sleep(0.05)
    return 0


def run(a: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="pagewire-bench-ws-") as tmp:
        work = Path(tmp)
        roots = work / "roots"
        roots.mkdir()
        image = roots / "ws.img"
        size = a.image_mib * MiB
        make_image(image, size, seed=21)
        extra = ["--no-native-channel"] if a.transport == "grpc" else []
        for n in range(a.runs):  # fresh agents each time: the first restore records anew
            run_dir = work / f"run{n}"
            source = LocalAgent(run_dir, "source", [roots], extra=extra).start()
            dest = LocalAgent(run_dir, "destination", [], extra=extra).start()
            try:
                r = source.request("POST", "/v1/exports", json={"name": "ws", "path": str(image)})
                if r.status_code != 201:
                    raise RuntimeError(r.text)
                first = restore_once(source, dest, image, size, a, 0)
                first["recorded_chunks"] = wait_for_record(source)
                if not first["recorded_chunks"]:  # a replay of nothing would score anyway
                    raise RuntimeError("the first restore uploaded no working set")
                second = restore_once(source, dest, image, size, a, 1)
            finally:
                dest.stop()
                source.stop()
            pairs.append((first, second))
    faults1 = median([p[0]["faults_remote"] for p in pairs])
    faults2 = median([p[1]["faults_remote"] for p in pairs])
    touch1 = median([p[0]["touch_s"] for p in pairs])
    touch2 = median([p[1]["touch_s"] for p in pairs])
    fault_ratio = faults2 / faults1 if faults1 else None
    time_ratio = touch2 / touch1 if touch1 else None
    return {
        "config": {
            "runs": a.runs,
            "image_mib": a.image_mib,
            "ws_chunks": a.ws_chunks,
            "ws_mib": a.ws_chunks * CHUNK / MiB,
            "transport": a.transport,
            "threads": 2,
        },
        "pairs": [{"first": f, "second": s} for f, s in pairs],
        "median": {
            "first_faults_remote": faults1,
            "second_faults_remote": faults2,
            "first_touch_s": touch1,
            "second_touch_s": touch2,
        },
        "vs_targets": {
            "second_faults_over_first": {
                "measured": None if fault_ratio is None else round(fault_ratio, 4),
                "target": 0.05,
                "direction": "<=",
                "met": fault_ratio is not None and fault_ratio <= 0.05,
            },
            "second_touch_time_over_first": {
                "measured": None if time_ratio is None else round(time_ratio, 4),
                "target": round(1 / 3, 4),
                "direction": "<=",
                "met": time_ratio is not None and time_ratio <= 1 / 3,
            },
        },
        "notes": [
            "the record holds the chunks the workload faulted on; a chunk the background "
            "fill installed before the workload touched it raised no fault and is not in it",
            "touch_s: the workload touching its working set (the recorded work)",
        ],
        "bench_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--image-mib", type=int, default=1024)
    p.add_argument("--ws-chunks", type=int, default=256, help="64 KiB chunks touched")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--transport", choices=["native", "grpc"], default="native")
    p.add_argument("--quick", action="store_true", help="small sizes, one run")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(runs=1, image_mib=128, ws_chunks=64)
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    suffix = ("_quick" if a.quick else "") + ("_grpc" if a.transport == "grpc" else "")
    emit("working_set" + suffix, run(a))


if __name__ == "__main__":
    main()
