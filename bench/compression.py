"""Wire compression figures: a compressible and an incompressible image restored with
compression "none" and "zstd", over the native channel and over gRPC, bulk only.

usage: python bench/compression.py [--image-mib 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, at, emit, wait_ended
from pagewire.tools.workload import command as workload_command


def text_image(path: Path, size: int) -> None:
    line = b"pagewire moves memory pages on demand; compressible page data follows. "
    block = (line * (65536 // len(line) + 1))[:65536]
    with open(path, "wb") as f:
        for i in range(size // 65536):
            f.write(block[:-8] + i.to_bytes(8, "little"))


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def restore(src: LocalAgent, dst: LocalAgent, size: int, mode: str) -> dict[str, Any]:
    body = {"source": {"peer": src.grpc, "export": "img"}, "compression": mode}
    session = dst.request("POST", "/v1/sessions", json=body).json()
    started = time.monotonic()
    cmd = workload_command(session["socket"], size, "--order", "none", "--hold", "60")
    workload = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    status = wait_ended(dst, session["id"])
    workload.kill()
    workload.wait()
    assert status["state"] == "completed", status
    return {
        "bytes_on_wire": status["bytes_received"],
        "transport": status["transport"],
        "attach_to_complete_s": round(at(status, "completed_at") - at(status, "attached_at"), 4),
        "wall_s": round(time.monotonic() - started, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-mib", type=int, default=64)
    a = p.parse_args()
    size = a.image_mib * MiB
    results: dict[str, Any] = {"image_mib": a.image_mib}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = work / "roots"
        roots.mkdir()
        for transport, extra in (("native", []), ("grpc", ["--no-native-channel"])):
            src = LocalAgent(work, f"src-{transport}", [roots], extra=extra).start()
            dst = LocalAgent(work, f"dst-{transport}", []).start()
            try:
                for name, make in (("compressible", text_image), ("incompressible", random_image)):
                    img = roots / f"{name}.img"
                    make(img, size)
                    src.request("DELETE", "/v1/exports/img")
                    src.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
                    for mode in ("none", "zstd"):
                        results[f"{transport}/{name}/{mode}"] = restore(src, dst, size, mode)
            finally:
                dst.stop()
                src.stop()
    for transport in ("native", "grpc"):
        for name in ("compressible", "incompressible"):
            none = results[f"{transport}/{name}/none"]["bytes_on_wire"]
            zstd = results[f"{transport}/{name}/zstd"]["bytes_on_wire"]
            results[f"{transport}/{name}/wire_ratio_zstd_over_none"] = round(zstd / none, 4)
    emit("compression", results)


if __name__ == "__main__":
    main()
