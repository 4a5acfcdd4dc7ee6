"""Minimal userfaultfd handler baseline and memory-image generator for benchmarks.

Other bench scripts import:

- ``build_minimal_handler() -> Path``: compile ``bench/minimal_handler.c`` (cached in
  ``bench/.build/``, rebuilt only when the source is newer than the binary).
- ``run_minimal_handler(image, threads, order, seed) -> dict``: run the baseline on an
  image and return its parsed JSON result.
- ``make_image(path, size, seed) -> None``: write a realistic memory image.

Run alone: ``python bench/baseline.py IMAGE_SIZE_MIB`` builds a temporary image, runs the
baseline (2 threads, random order by default) and prints the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))
from pagewire.tools.images import make_image  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "minimal_handler.c"
BUILD_DIR = BENCH_DIR / ".build"
BINARY = BUILD_DIR / "minimal_handler"
CFLAGS = ["-O2", "-pthread", "-Wall", "-Wextra"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def build_minimal_handler() -> Path:
    """Compile the minimal handler if the cached binary is missing or older than the source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f"minimal_handler.{os.getpid()}.tmp"
    cmd = ["gcc", *CFLAGS, "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr}")
    os.replace(tmp, BINARY)  # atomic, safe against concurrent builders
    return BINARY


def run_minimal_handler(
    image: Path, threads: int, order: str, seed: int, *, timeout: float = 600.0
) -> dict[str, Any]:
    """Run the minimal handler on ``image`` and return its JSON result.

    ``order`` is ``"random"`` or ``"sequential"``. Raises RuntimeError on failure or if
    the region did not verify against the image.
    """
    if order not in ("random", "sequential"):
        raise ValueError(f"order must be 'random' or 'sequential', not {order!r}")
    binary = build_minimal_handler()
    cmd = [str(binary), str(image), str(threads), order, str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"minimal_handler exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError("minimal_handler printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    if not result.get("verified"):
        raise RuntimeError(f"minimal_handler did not verify: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the minimal userfaultfd baseline.")
    parser.add_argument("size_mib", type=int, help="image size in MiB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=["random", "sequential"], default="random")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagewire-baseline-") as tmp:
        image = Path(tmp) / "image.bin"
        make_image(image, args.size_mib * 1024 * 1024, args.seed)
        result = run_minimal_handler(image, args.threads, args.order, args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
