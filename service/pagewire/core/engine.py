"""Thin typed facade over the native engine: creation from a handoff, histograms, and
what its failure codes and counters mean."""

from __future__ import annotations

from dataclasses import dataclass

from pagewire import _uffd
from pagewire.core.handoff import Handoff

RESOLUTIONS = {"local": _uffd.RES_LOCAL, "remote": _uffd.RES_REMOTE, "zero": _uffd.RES_ZERO}
BOUNDS_S = [b / 1e9 for b in _uffd.HIST_BOUNDS_NS]
# what an engine failure code means, for a session's error message
FAILURE_TEXT = {
    "workload_exited": "the workload exited before the restore completed",
    "source_read_failed": "reading the source image failed",
    "install_failed": "installing pages into the workload failed",
    "fault_outside_regions": "the workload faulted outside its regions",
    "uffd_read_failed": "reading the userfaultfd failed",
}


@dataclass
class EngineOptions:
    background: bool = True
    window_pages: int = 16
    batch_bytes: int = 1 << 20


@dataclass
class Histogram:
    counts: list[int]
    sum_s: float
    max_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> Histogram:
        return Histogram(
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.sum_s + other.sum_s,
            max(self.max_s, other.max_s),
        )

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile q (None when empty)."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for bound, n in zip(BOUNDS_S, self.counts, strict=True):
            seen += n
            if seen >= rank and n:
                return min(bound, self.max_s)
        return self.max_s

    @classmethod
    def empty(cls) -> Histogram:
        return cls([0] * _uffd.HIST_BUCKETS, 0.0, 0.0)


def histogram(engine: _uffd.Engine, resolution: str) -> Histogram:
    counts, sum_ns, max_ns = engine.histogram(RESOLUTIONS[resolution])
    return Histogram(counts, sum_ns / 1e9, max_ns / 1e9)


def all_faults_histogram(engine: _uffd.Engine) -> Histogram:
    total = Histogram.empty()
    for name in RESOLUTIONS:
        total = total.merge(histogram(engine, name))
    return total


def open_engine(
    handoff: Handoff,
    notify_fd: int,
    options: EngineOptions,
    *,
    source_fd: int = -1,
    source_size: int = 0,
    zero_map: bytes | None = None,
    zero_map_page_size: int = 0,
    pidfd: int = -1,
) -> _uffd.Engine:
    return _uffd.Engine(
        handoff.uffd,
        [r.as_tuple() for r in handoff.regions],
        notify_fd,
        source_fd=source_fd,
        source_size=source_size,
        zero_map=zero_map,
        zero_map_page_size=zero_map_page_size,
        pidfd=pidfd,
        background=options.background,
        window_pages=options.window_pages,
        batch_bytes=options.batch_bytes,
    )


def all_installed(engine: _uffd.Engine) -> bool:
    """Every page present, zero or removed: whatever happened afterwards, it restored."""
    s = engine.stats()
    return s.get("pages_total", 0) > 0 and s.get("pages_missing", 1) == 0
