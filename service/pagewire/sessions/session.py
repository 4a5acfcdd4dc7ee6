"""A session and its state machine: the only writer of its state.

awaiting_attach -> running <-> paused -> completed | failed | cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagewire import _uffd
from pagewire.control.models import ACTIVE_STATES, SessionRequest
from pagewire.core.engine import Histogram, histogram
from pagewire.core.handoff import Handoff, HandoffError
from pagewire.sessions.sources import Source, is_remote


@dataclass
class Session:
    id: str
    request: SessionRequest
    source: Source
    socket_path: Path
    created_at: float = field(default_factory=time.time)
    state: str = "awaiting_attach"
    attached_at: float | None = None
    completed_at: float | None = None
    error: dict[str, str] | None = None
    handoff: Handoff | None = None
    engine: _uffd.Engine | None = None
    notify_fd: int = -1
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    final_stats: dict[str, int] | None = None
    final_hist: dict[str, Histogram] | None = None
    paused_since: float | None = None
    closing: bool = False  # a policy or request is ending it; engine notices are not news
    last_refusal: dict[str, str] | None = None  # the latest refused handoff, while awaiting
    frozen_status: dict[str, Any] | None = None  # an ended session read back from its record

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def remote(self) -> bool:
        return is_remote(self.request)

    def begin(self, *, recovered: bool = False) -> None:
        """The engine serves the workload now (again, for a recovered session)."""
        if not recovered:
            self.attached_at = time.time()
        self.state = "running"
        self.paused_since = None

    def pause(self) -> bool:
        """The source is unreachable; True when this pauses a running session."""
        if self.state != "running":
            return False
        self.state = "paused"
        self.paused_since = time.monotonic()
        return True

    def resume(self) -> bool:
        """The source is back; True when this resumes a paused session."""
        if self.state != "paused":
            return False
        self.state = "running"
        self.paused_since = None
        return True

    def end(self, state: str, code: str | None = None, message: str = "") -> bool:
        """Enter an ended state, close the engine and answer a workload still waiting for
        its verdict. False when the session had ended already."""
        if not self.active:
            return False
        self.state = state
        self.completed_at = time.time()
        if code is not None:
            self.error = {"code": code, "message": message}
        if self.engine is not None:
            self.final_stats = self.engine.stats()
            self.final_hist = self.histograms()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.notify_fd)
            self.engine.close()
            self.engine = None
            os.close(self.notify_fd)
            self.notify_fd = -1
        if self.handoff is not None and self.handoff.conn is not None:
            # a restore can end before its registration check did: answer the workload
            ended_ok = state == "completed"
            self.handoff.verdict(None if ended_ok else HandoffError(code or state, message))
            self.handoff.conn.close()
            self.handoff.conn = None
        return True

    def stats(self) -> dict[str, int]:
        if self.engine is not None:
            return self.engine.stats()
        return self.final_stats or {}

    def histograms(self) -> dict[str, Histogram]:
        if self.engine is not None:
            return {name: histogram(self.engine, name) for name in ("local", "remote", "zero")}
        return self.final_hist or {}

    def status(self) -> dict[str, Any]:
        if self.frozen_status is not None:
            return self.frozen_status
        s = self.stats()
        hists = self.histograms()
        total = Histogram.empty()
        for h in hists.values():
            total = total.merge(h)
        page_size = self.handoff.regions[0].page_size if self.handoff else None
        return {
            "id": self.id,
            "state": self.state,
            "source": {**self.request.source.model_dump(), **self.source.describe()},
            "socket": str(self.socket_path),
            "pages_total": s.get("pages_total", 0),
            "pages_present": s.get("pages_present", 0),
            "pages_zero": s.get("pages_zero", 0),
            "pages_removed": s.get("pages_removed", 0),
            "faults": {
                "local": s.get("faults_local", 0),
                "remote": s.get("faults_remote", 0),
                "zero": s.get("faults_zero", 0),
            },
            "pages_prefetched": s.get("pages_prefetched", 0),
            "pages_background": s.get("pages_background", 0),
            "bytes_received": self.source.bytes_received() + s.get("channel_bytes_received", 0),
            "fault_latency_seconds": {
                "p50": total.quantile(0.5),
                "p99": total.quantile(0.99),
                "max": total.max_s if total.count else None,
            },
            "created_at": self.created_at,
            "attached_at": self.attached_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "workload_pid": self.handoff.pid if self.handoff else None,
            "page_size": page_size,
            "transport": self.source.transport,
        }

    def record(self) -> dict[str, Any]:
        """What the state dir keeps, enough for a restarted agent to take the session back."""
        h = self.handoff
        return {
            "id": self.id,
            "request": self.request.model_dump(),
            "state": self.state,
            "source": self.source.describe(),
            "socket": str(self.socket_path),
            "created_at": self.created_at,
            "attached_at": self.attached_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "status": None if self.active else self.status(),
            "workload": None
            if h is None
            else {
                "pid": h.pid,
                "start_time": h.start_time,
                "uffd_inode": h.uffd_inode,
                "regions": [r.as_tuple() for r in h.regions],
            },
        }
