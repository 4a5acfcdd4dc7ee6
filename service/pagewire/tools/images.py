"""Realistic memory images for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import random
from pathlib import Path

from pagewire.core.layout import SYSTEM_PAGE_SIZE

# Target page mix of make_image (fractions of pages; holes come on top of this).
ZERO_FRACTION = 0.25
TEMPLATE_FRACTION = 0.05
DATA_FRACTION = 1.0 - ZERO_FRACTION - TEMPLATE_FRACTION
ZERO_RUN = (1, 256)  # pages per run of zero pages
DATA_RUN = (1, 256)  # pages per run of random data pages
TEMPLATE_RUN = (1, 32)  # pages per run of template copies
TEMPLATE_COUNT = 4
HOLE_COUNT = 2


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
    if size <= 0 or size % SYSTEM_PAGE_SIZE:
        raise ValueError(
            f"size {size} is not a positive multiple of the page size {SYSTEM_PAGE_SIZE}"
        )
    pages = size // SYSTEM_PAGE_SIZE
    rng = random.Random(seed)
    templates = [rng.randbytes(SYSTEM_PAGE_SIZE) for _ in range(TEMPLATE_COUNT)]
    zero_block = bytes(ZERO_RUN[1] * SYSTEM_PAGE_SIZE)

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
                data = zero_block[: n * SYSTEM_PAGE_SIZE]
            elif kind == "template":
                n = min(rng.randint(*TEMPLATE_RUN), limit - page)
                data = b"".join(rng.choice(templates) for _ in range(n))
            else:
                n = min(rng.randint(*DATA_RUN), limit - page)
                data = rng.randbytes(n * SYSTEM_PAGE_SIZE)
            _pwrite_all(fd, data, page * SYSTEM_PAGE_SIZE)
            page += n
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def data_bytes(path: Path) -> int:
    """The bytes of the image's non-zero pages: what a restore must carry at least."""
    zero, total = bytes(SYSTEM_PAGE_SIZE), 0
    with open(path, "rb") as f:
        while page := f.read(SYSTEM_PAGE_SIZE):
            total += len(page) if page != zero else 0
    return total
