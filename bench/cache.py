"""Per-host chunk cache: N concurrent restores of one image on one host, with the cache on
and off (baseline, same run): bytes the source sent over the network per image.

usage: python bench/cache.py [--image-mib 64] [--sessions 1 4 8]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, emit, wait_ended
from pagewire.tools.images import make_image
from pagewire.tools.workload import command as workload_command


def sent_bytes(agent: LocalAgent) -> float:
    text = agent.request("GET", "/metrics").text
    return sum(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("pagewire_bytes_sent_total")
    )


def together(src: LocalAgent, dst: LocalAgent, size: int, n: int, order: str) -> dict[str, Any]:
    before = sent_bytes(src)
    started = time.monotonic()
    sessions = [
        dst.request(
            "POST", "/v1/sessions", json={"source": {"peer": src.grpc, "export": "img"}}
        ).json()
        for _ in range(n)
    ]
    procs = [
        subprocess.Popen(
            workload_command(s["socket"], size, "--order", order, "--threads", "2", "--hold", "60"),
            stdout=subprocess.DEVNULL,
        )
        for s in sessions
    ]
    try:
        states = [wait_ended(dst, s["id"])["state"] for s in sessions]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert states == ["completed"] * n, states
    return {"sent_bytes": sent_bytes(src) - before, "wall_s": round(time.monotonic() - started, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-mib", type=int, default=64)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    a = p.parse_args()
    size = a.image_mib * MiB
    out: dict[str, Any] = {"image_mib": a.image_mib}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = work / "roots"
        roots.mkdir()
        img = roots / "image.bin"
        make_image(img, size, seed=5)
        src = LocalAgent(work, "src", [roots]).start()
        try:
            export = src.request(
                "POST", "/v1/exports", json={"name": "img", "path": str(img)}
            ).json()
            data = (export["pages"] - export["zero_pages"]) * 4096
            out["image_data_bytes"] = data
            for label, extra in (("cache_on", []), ("cache_off", ["--cache-bytes", "0"])):
                for order in ("none", "random"):  # bulk only; random touch by two threads
                    for n in a.sessions:  # a fresh destination each time: an empty cache
                        dst = LocalAgent(work, f"dst-{label}-{order}-{n}", [], extra=extra).start()
                        try:
                            r = together(src, dst, size, n, order)
                        finally:
                            dst.stop()
                        r["images_sent"] = round(r["sent_bytes"] / data, 3)
                        out[f"{label}/{order}/{n}_sessions"] = r
        finally:
            src.stop()
    emit("cache", out)


if __name__ == "__main__":
    main()
