"""Fault-around: faults and touch time for sequential and random touch, local and remote,
with the adaptive window ("around") and without fault-around ("none") in the same run.
Background fill is off, so every page arrives through a fault or its window.

usage: python bench/prefetch.py [--image-mib 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, emit, run_workload, wait_ended
from pagewire.tools.images import make_image


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-mib", type=int, default=64)
    a = p.parse_args()
    size = a.image_mib * MiB
    out: dict[str, Any] = {"image_mib": a.image_mib}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = work / "roots"
        roots.mkdir()
        img = roots / "image.bin"
        make_image(img, size, seed=7)
        src = LocalAgent(work, "src", [roots]).start()
        dst = LocalAgent(work, "dst", [roots]).start()
        try:
            src.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
            sources = {"local": {"path": str(img)}, "remote": {"peer": src.grpc, "export": "img"}}
            for where, source in sources.items():
                for prefetch in ("around", "none"):
                    for order in ("sequential", "random"):
                        body = {"source": source, "prefetch": prefetch, "background": False}
                        s = dst.request("POST", "/v1/sessions", json=body).json()
                        seen = run_workload(s["socket"], size, "--order", order)
                        st = wait_ended(dst, s["id"])
                        out[f"{where}/{prefetch}/{order}"] = {
                            "faults": sum(st["faults"].values()),
                            "touch_s": seen["touch_s"],
                            "transport": st["transport"],
                        }
        finally:
            dst.stop()
            src.stop()
    emit("prefetch", out)


if __name__ == "__main__":
    main()
