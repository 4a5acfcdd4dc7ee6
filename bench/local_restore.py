"""Local restore of an image through the agent's engine vs the minimal C handler.

Both restore the same image with the same touch pattern (random order, 2 threads) in the
same invocation; prints JSON with total time and per-touch p50/p99 of each, and the ratio.

usage: python bench/local_restore.py [--size-mib 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from baseline import run_minimal_handler
from common import LocalAgent, MiB, emit, median, run_workload, wait_ended
from pagewire.tools.images import make_image


def engine_run(agent: LocalAgent, image: Path, size: int, threads: int) -> dict[str, float]:
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(image)}})
    session = r.json()
    seen = run_workload(
        session["socket"],
        size,
        "--threads",
        str(threads),
        "--order",
        "random",
        "--verify",
        str(image),
    )
    status = wait_ended(agent, session["id"])
    assert seen["verified"] and status["state"] == "completed", (seen, status)
    agent.request("DELETE", f"/v1/sessions/{session['id']}")
    return {
        "total_s": seen["touch_s"],
        "touch_p50_us": seen["p50_us"],
        "touch_p99_us": seen["p99_us"],
        "faults": float(sum(status["faults"].values())),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    size = a.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = work / "roots" / "image.bin"
        image.parent.mkdir()
        make_image(image, size, seed=3)
        agent = LocalAgent(work, "bench", [image.parent]).start()
        try:
            engine = [engine_run(agent, image, size, a.threads) for _ in range(a.runs)]
        finally:
            agent.stop()
        minimal = [run_minimal_handler(image, a.threads, "random", 1) for _ in range(a.runs)]

    def summary(runs: list[dict[str, float]]) -> dict[str, float]:
        return {
            k: median([r[k] for r in runs])
            for k in ("total_s", "touch_p50_us", "touch_p99_us", "faults")
        }

    eng, base = summary(engine), summary(minimal)
    emit(
        "local_restore",
        {
            "image_mib": a.size_mib,
            "threads": a.threads,
            "order": "random",
            "runs": a.runs,
            "engine": eng,
            "minimal_c_handler": base,
            "total_time_ratio_engine_over_minimal": round(eng["total_s"] / base["total_s"], 4),
            "target_ratio": 0.3,
        },
    )


if __name__ == "__main__":
    main()
