"""Prometheus metrics. Counters that live in C are read by a custom collector at scrape
time: the fault path never makes a Python call for a metric."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pagewire import __version__, _uffd
from pagewire.core.engine import RESOLUTIONS

if TYPE_CHECKING:
    from pagewire.agent.node import AgentState
    from pagewire.sessions.session import Session

STATES = ("awaiting_attach", "running", "paused", "completed", "failed", "cancelled")
# powers of two from 2.048 µs to 1.07 s: exact bucket edges of the engine's histogram
BOUNDS_NS = [1 << k for k in range(11, 31)]
INSTALL_PATHS = {
    "fault": "pages_fault",
    "prefetch": "pages_prefetched",
    "background": "pages_background",
}


@dataclass
class Retired:
    """Totals over sessions: kept for forgotten ones, so counters never go backwards, and
    extended with the live ones at each scrape."""

    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESOLUTIONS, 0))
    buckets: dict[str, list[int]] = field(
        default_factory=lambda: {r: [0] * _uffd.HIST_BUCKETS for r in RESOLUTIONS}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOLUTIONS, 0.0))
    installed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTALL_PATHS, 0))
    bytes_received: int = 0
    digest_failures: int = 0
    reconnects: int = 0

    def add(self, session: Session) -> None:
        stats = session.stats()
        for res in RESOLUTIONS:
            self.faults[res] += stats.get(f"faults_{res}", 0)
        for res, hist in session.histograms().items():
            self.buckets[res] = [a + b for a, b in zip(self.buckets[res], hist.counts, strict=True)]
            self.sums[res] += hist.sum_s
        for path, key in INSTALL_PATHS.items():
            self.installed[path] += stats.get(key, 0)
        self.bytes_received += session.source.bytes_received()
        self.bytes_received += stats.get("channel_bytes_received", 0)
        self.digest_failures += source_counter(session, "integrity_failures")
        self.digest_failures += stats.get("channel_digest_failures", 0)
        self.reconnects += source_counter(session, "reconnects")


def source_counter(session: Session, name: str) -> int:
    """A peer source's counter (local sources have none)."""
    return int(getattr(session.source, name, 0))


def cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Engine buckets folded onto BOUNDS_NS, cumulative, with +Inf."""
    out: list[tuple[str, float]] = []
    running = 0
    edges = _uffd.HIST_BOUNDS_NS
    i = 0
    for bound in BOUNDS_NS:
        while i < len(counts) and edges[i] <= bound:
            running += counts[i]
            i += 1
        out.append((repr(bound / 1e9), float(running)))
    out.append(("+Inf", float(sum(counts))))
    return out


class AgentCollector(Collector):
    def __init__(self, agent: AgentState) -> None:
        self.agent = agent

    def sessions(self) -> Iterable[Session]:
        return list(self.agent.sessions.sessions.values())

    def collect(self) -> Iterator[Metric]:
        sessions = self.sessions()
        # forgotten sessions' totals plus every known session's, each read once per scrape
        totals = copy.deepcopy(self.agent.sessions.retired)
        for s in sessions:
            totals.add(s)
        yield from self._faults(totals)
        yield from self._installs(totals)
        yield from self._sessions(sessions)
        yield from self._peers(totals)
        yield from self._cache()
        yield from self._misc()

    def _faults(self, totals: Retired) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "pagewire_fault_latency_seconds",
            "Time from reading a fault to its install returning, by where the answer came from.",
            labels=["resolution"],
        )
        faults = CounterMetricFamily(
            "pagewire_faults", "Demand faults resolved, by resolution.", labels=["resolution"]
        )
        for res in RESOLUTIONS:
            hist.add_metric([res], cumulative(totals.buckets[res]), totals.sums[res])
            faults.add_metric([res], totals.faults[res])
        yield hist
        yield faults

    def _installs(self, totals: Retired) -> Iterator[Metric]:
        pages = CounterMetricFamily(
            "pagewire_pages_installed", "Pages installed, by path.", labels=["path"]
        )
        for path in INSTALL_PATHS:
            pages.add_metric([path], totals.installed[path])
        yield pages

    def _sessions(self, sessions: Iterable[Session]) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "pagewire_sessions", "Sessions known to this agent, by state.", labels=["state"]
        )
        counts = dict.fromkeys(STATES, 0)
        remaining = GaugeMetricFamily(
            "pagewire_session_pages_remaining",
            "Pages a session still misses; absent while it awaits attach (its layout unknown).",
            labels=["session"],
        )
        paused = GaugeMetricFamily(
            "pagewire_session_paused_seconds",
            "How long a session has been paused (0 when not).",
            labels=["session"],
        )
        now = time.monotonic()
        for s in sessions:
            counts[s.state] = counts.get(s.state, 0) + 1
            if s.active and s.state != "awaiting_attach":
                remaining.add_metric([s.id], s.stats().get("pages_missing", 0))
            if s.active:
                since = s.paused_since
                paused.add_metric([s.id], now - since if since is not None else 0.0)
        for state, n in counts.items():
            by_state.add_metric([state], n)
        ended = CounterMetricFamily(
            "pagewire_sessions_ended",
            "Sessions that ended, by state and failure code.",
            labels=["state", "code"],
        )
        for (state, code), n in sorted(self.agent.sessions.ended_counts.items()):
            ended.add_metric([state, code], n)
        yield from (by_state, remaining, paused, ended)

    def _peers(self, totals: Retired) -> Iterator[Metric]:
        server = self.agent.peer_server
        sent = server.servicer.bytes_sent if server is not None else 0
        if self.agent.channel is not None:
            sent += self.agent.channel.bytes_sent()
        yield CounterMetricFamily("pagewire_bytes_sent", "Page bytes sent to peers.", value=sent)
        yield CounterMetricFamily(
            "pagewire_bytes_received",
            "Page bytes received from peers.",
            value=totals.bytes_received,
        )
        yield CounterMetricFamily(
            "pagewire_digest_failures",
            "Chunks refused because their size, index or digest was wrong.",
            value=totals.digest_failures,
        )
        yield CounterMetricFamily(
            "pagewire_peer_reconnects",
            "Peer streams opened again after one broke.",
            value=totals.reconnects,
        )

    def _cache(self) -> Iterator[Metric]:
        cache = self.agent.cache
        stats = cache.stats() if cache is not None else {}
        for key, help_text in (
            ("hits", "Chunks installed from the host's chunk cache."),
            ("misses", "Chunk cache look-ups that found nothing usable."),
            ("evictions", "Chunks evicted from the cache to stay in bounds."),
            ("corrupt", "Cached chunks refused because their digest failed."),
        ):
            yield CounterMetricFamily(f"pagewire_cache_{key}", help_text, value=stats.get(key, 0))
        yield GaugeMetricFamily(
            "pagewire_cache_bytes", "Bytes held in the chunk cache.", value=stats.get("bytes", 0)
        )

    def _misc(self) -> Iterator[Metric]:
        rejections = CounterMetricFamily(
            "pagewire_handoff_rejections", "Refused handoffs, by reason.", labels=["reason"]
        )
        for reason, n in sorted(self.agent.sessions.handoff_rejections.items()):
            rejections.add_metric([reason], n)
        yield rejections
        exports = GaugeMetricFamily(
            "pagewire_exports", "Published exports, by state.", labels=["state"]
        )
        counts = {"ready": 0, "stale": 0}
        if self.agent.exports is not None:
            for e in self.agent.exports.list():
                counts[e.state] = counts.get(e.state, 0) + 1
        for state, n in counts.items():
            exports.add_metric([state], n)
        yield exports
        info = GaugeMetricFamily(
            "pagewire_build_info", "Agent version and node.", labels=["version", "node"]
        )
        info.add_metric([__version__, self.agent.settings.node_name], 1)
        yield info


def create_registry(agent: AgentState) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    rpc = Histogram(
        "pagewire_peer_rpc_latency_seconds",
        "Round trip of peer RPCs, by method.",
        ["method"],
        registry=registry,
        buckets=[b / 1e9 for b in BOUNDS_NS],
    )
    return registry, rpc
