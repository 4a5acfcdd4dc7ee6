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
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SOURCE = BENCH_DIR / "minimal_handler.c"
BUILD_DIR = BENCH_DIR / ".build"
BINARY = BUILD_DIR / "minimal_handler"
CFLAGS = ["-O2", "-pthread", "-Wall", "-Wextra"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Target page mix of make_image (fractions of pages; holes come on top of this).
ZERO_FRACTION = 0.25
TEMPLATE_FRACTION = 0.05
DATA_FRACTION = 1.0 - ZERO_FRACTION - TEMPLATE_FRACTION
ZERO_RUN = (1, 256)  # pages per run of zero pages
DATA_RUN = (1, 256)  # pages per run of random data pages
TEMPLATE_RUN = (1, 32)  # pages per run of template copies
TEMPLATE_COUNT = 4
HOLE_COUNT = 2


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


def _plan_holes(rng: random.Random, pages: int) -> list[tuple[int, int]]:
    """Pick HOLE_COUNT non-overlapping page ranges [start, end) to leave sparse."""
    if pages < 8:
        return []
    hole_len = max(1, min(256, pages // 50))
    holes: list[tuple[int, int]] = []
    slot = pages // HOLE_COUNT  # one hole per equal slot keeps them disjoint
    for i in range(HOLE_COUNT):
        lo = i * slot
        length = min(hole_len, slot)
        start = lo + rng.randrange(max(1, slot - length + 1))
        holes.append((start, start + length))
    return holes


def make_image(path: Path, size: int, seed: int) -> None:
    """Write a realistic, reproducible memory image of ``size`` bytes to ``path``.

    Mix: ~70% pseudo-random data pages, ~25% zero pages in runs of 1-256 pages, ~5%
    copies of a few template pages, plus a couple of sparse holes (never written, read
    as zeros). ``size`` must be a positive multiple of the page size. The same seed
    gives the same bytes.
    """
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"size {size} is not a positive multiple of the page size {PAGE_SIZE}")
    pages = size // PAGE_SIZE
    rng = random.Random(seed)
    templates = [rng.randbytes(PAGE_SIZE) for _ in range(TEMPLATE_COUNT)]
    zero_block = bytes(ZERO_RUN[1] * PAGE_SIZE)

    # Probability of each run kind, so that the expected share of *pages* matches.
    weights = [
        ZERO_FRACTION / (sum(ZERO_RUN) / 2),
        TEMPLATE_FRACTION / (sum(TEMPLATE_RUN) / 2),
        DATA_FRACTION / (sum(DATA_RUN) / 2),
    ]
    kinds = ["zero", "template", "data"]
    holes = _plan_holes(rng, pages)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)  # holes and anything unwritten stay sparse
        page = 0
        hole_idx = 0
        while page < pages:
            if hole_idx < len(holes) and page >= holes[hole_idx][0]:
                page = max(page, holes[hole_idx][1])  # skip: leave a hole
                hole_idx += 1
                continue
            limit = holes[hole_idx][0] if hole_idx < len(holes) else pages
            kind = rng.choices(kinds, weights)[0]
            if kind == "zero":
                n = min(rng.randint(*ZERO_RUN), limit - page)
                data = zero_block[: n * PAGE_SIZE]
            elif kind == "template":
                n = min(rng.randint(*TEMPLATE_RUN), limit - page)
                data = b"".join(rng.choice(templates) for _ in range(n))
            else:
                n = min(rng.randint(*DATA_RUN), limit - page)
                data = rng.randbytes(n * PAGE_SIZE)
            _pwrite_all(fd, data, page * PAGE_SIZE)
            page += n
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


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
