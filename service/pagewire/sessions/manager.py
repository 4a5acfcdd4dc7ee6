"""Post-copy sessions: socket, attach, engine, source, lifecycle, records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pagewire import _uffd
from pagewire.agent.settings import Settings
from pagewire.control.errors import ApiError
from pagewire.control.metrics import Retired
from pagewire.control.models import ACTIVE_STATES, SessionRequest
from pagewire.core import filework
from pagewire.core.engine import EngineOptions, Histogram, histogram, open_engine
from pagewire.core.handoff import (
    Handoff,
    HandoffError,
    PoisonUnsupported,
    SocketSpec,
    check_registered,
    kill_through_pidfd,
    listen,
    poison_registered,
    receive_handoff,
    refuse_handoff,
)
from pagewire.core.layout import SYSTEM_PAGE_SIZE, Limits
from pagewire.core.paths import open_beneath

log = logging.getLogger("pagewire.sessions")

WINDOW_PAGES = {"around": 16, "none": 1, "working_set": 16}
MAX_PENDING_HANDOFFS = 8  # connections of one session read at once (each times out in 5 s)


class Source(Protocol):
    """Where a session's pages come from."""

    size: int
    zero_map: bytes  # one byte per page of zero_map_page_size, 1 = zero
    zero_map_page_size: int
    local_fd: int  # >= 0 when the engine reads the image itself

    def describe(self) -> dict[str, str]: ...
    async def connect(self) -> None: ...
    def attach(self, session: Session) -> None: ...
    async def start(self, session: Session) -> None: ...
    def on_requests(self, session: Session, offsets: list[int]) -> None: ...
    async def stop(self) -> None: ...
    def bytes_received(self) -> int: ...


class PassiveSource:
    """A source Python has nothing to do for: every hook is a no-op."""

    size = 0
    zero_map = b""
    zero_map_page_size = 0
    local_fd = -1

    async def connect(self) -> None:
        return None

    def attach(self, session: Session) -> None:
        return None

    async def start(self, session: Session) -> None:
        return None

    def on_requests(self, session: Session, offsets: list[int]) -> None:
        return None

    async def stop(self) -> None:
        return None

    def bytes_received(self) -> int:
        return 0


class LocalSource(PassiveSource):
    """A file under an export root: the engine reads it with pread, Python does nothing."""

    def __init__(self, path: Path, fd: int, size: int, zero_map: bytes) -> None:
        self.path = path
        self.local_fd = fd
        self.size = size
        self.zero_map = zero_map
        self.zero_map_page_size = SYSTEM_PAGE_SIZE

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path)}

    async def stop(self) -> None:
        if self.local_fd >= 0:
            os.close(self.local_fd)
            self.local_fd = -1


def open_local_source(path: str, roots: list[Path]) -> LocalSource:
    """A local image, opened beneath an export root (paths.open_beneath); blocking."""
    opened = open_beneath(roots, path)
    fd = opened.fd
    try:
        size = os.fstat(fd).st_size
        if size == 0 or size % SYSTEM_PAGE_SIZE:
            raise ApiError(
                400,
                "invalid_image",
                f"{path}: size must be a positive multiple of the page size",
            )
        return LocalSource(opened.path, fd, size, _uffd.zero_map(fd, size, SYSTEM_PAGE_SIZE))
    except BaseException:
        os.close(fd)
        raise


def _close_source(source: LocalSource) -> None:
    if source.local_fd >= 0:
        os.close(source.local_fd)
        source.local_fd = -1


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
            "transport": getattr(self.source, "transport", "local"),
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


SourceFactory = Any  # async (SessionRequest) -> Source


class SessionManager:
    """Every session of this agent, on the agent's one asyncio loop."""

    def __init__(self, settings: Settings, remote_factory: SourceFactory | None = None) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.remote_factory = remote_factory
        self.handoff_rejections: dict[str, int] = {}
        self.ended_counts: dict[tuple[str, str], int] = {}
        self.retired = Retired()
        self.shutting_down = False
        self.draining = False
        self.reserved = 0  # creates under way: counted against max_sessions
        self.reserved_remote = 0
        self.records_dir = settings.state_dir / "sessions"
        self.state_writable = True  # the last record write (or probe) succeeded

    # ---- creation -------------------------------------------------------

    def prepare_dirs(self) -> None:
        socket_dir = self.settings.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.socket_group is not None:
            os.chown(socket_dir, -1, self.settings.socket_group)
            os.chmod(socket_dir, 0o710)  # only the agent and that group may enter
        else:
            os.chmod(socket_dir, 0o711)  # anyone may enter, nobody may list
        self.records_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.settings.state_dir, 0o700)

    async def open_source(self, request: SessionRequest) -> Source:
        src = request.source
        if hasattr(src, "path"):
            return await filework.pool().run(
                f"opening {src.path!r}",
                open_local_source,
                src.path,
                self.settings.export_roots,
                undo=_close_source,
            )
        if self.remote_factory is None:
            raise ApiError(400, "unsupported_source", "this agent cannot reach peers")
        source: Source = await self.remote_factory(request)
        try:
            await source.connect()  # before attach, so the first fault does not wait for it
        except BaseException:  # refused, or the client went away: no connection left open
            await asyncio.shield(source.stop())
            raise
        return source

    async def create(self, request: SessionRequest) -> Session:
        if self.shutting_down:
            raise ApiError(503, "shutting_down", "the agent is shutting down")
        if self.draining:
            raise ApiError(503, "draining", "the node is being drained")
        remote = not hasattr(request.source, "path")
        # the slot is taken before the first await and given back on every way out, so
        # concurrent creates can never pass the count together
        self._reserve(remote)
        try:
            return await self._create(request)
        finally:
            self.reserved -= 1
            self.reserved_remote -= remote

    def _reserve(self, remote: bool) -> None:
        active = sum(1 for s in self.sessions.values() if s.active) + self.reserved
        if active >= self.settings.max_sessions:
            raise ApiError(
                429,
                "too_many_sessions",
                f"{active} sessions active or starting, at most {self.settings.max_sessions}",
            )
        if remote:
            self._admit_remote()
        self.reserved += 1
        self.reserved_remote += remote

    async def _create(self, request: SessionRequest) -> Session:
        source = await self.open_source(request)
        session_id = "s-" + secrets.token_hex(8)
        socket_path = self.settings.socket_dir / f"{session_id}.sock"
        opts = request.socket
        spec = SocketSpec(
            socket_path,
            uid=opts.uid if opts else None,
            gid=opts.gid if opts else None,
            mode=int(opts.mode, 8) if opts else 0o600,
        )
        try:
            listener = listen(spec)
        except OSError as exc:
            await source.stop()
            raise ApiError(
                400, "socket_failed", f"cannot create the session socket: {exc}"
            ) from None
        session = Session(session_id, request, source, socket_path)
        try:
            await asyncio.to_thread(self.write_record, session)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            await source.stop()
            self.state_writable = False
            log.error("session refused: its record cannot be written: %s", exc)
            raise ApiError(
                503, "state_unwritable", f"the session record cannot be written: {exc}"
            ) from None
        self.state_writable = True
        self.sessions[session_id] = session
        session.task = asyncio.create_task(self._run(session, listener))
        log.info("session created", extra={"session": session_id, "source": source.describe()})
        return session

    def _admit_remote(self) -> None:
        from pagewire.sessions.remote import WINDOW_BYTES

        remote = self.reserved_remote + sum(
            1 for s in self.sessions.values() if s.active and not hasattr(s.request.source, "path")
        )
        if (remote + 1) * WINDOW_BYTES > self.settings.max_bytes_in_flight:
            raise ApiError(
                429,
                "bytes_in_flight_limit",
                f"{remote} remote sessions already use the "
                f"{self.settings.max_bytes_in_flight} bytes in flight allowed",
            )

    def expire(self, now: float) -> int:
        """Forget sessions that ended more than retention_s ago."""
        old = [
            s
            for s in self.sessions.values()
            if not s.active
            and s.completed_at is not None
            and now - s.completed_at > self.settings.retention_s
        ]
        for s in old:
            self.forget(s)
        return len(old)

    # ---- lifecycle ------------------------------------------------------

    async def _accept(self, session: Session, listener: socket.socket) -> Handoff:
        """The first good handoff before attach_timeout_s. Connections are read side by
        side (up to MAX_PENDING_HANDOFFS), so a silent or bad one neither ends the session
        nor delays the real workload; each refusal fails closed and is logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + session.request.attach_timeout_s
        limits = Limits(
            max_regions=self.settings.max_regions,
            max_bytes=self.settings.max_session_bytes,
            image_size=session.source.size,
        )
        pending: set[asyncio.Future[Any]] = set()
        accepting: asyncio.Future[Any] | None = None
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise HandoffError("attach_timeout", "no workload attached in time")
                if accepting is None and len(pending) < MAX_PENDING_HANDOFFS:
                    accepting = asyncio.ensure_future(loop.sock_accept(listener))
                waiting = pending | ({accepting} if accepting is not None else set())
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is accepting:
                        accepting = None
                        conn, _ = task.result()
                        pending.add(asyncio.ensure_future(self._receive(conn, limits)))
                        continue
                    pending.discard(task)
                    try:
                        handoff: Handoff = task.result()
                    except HandoffError as exc:
                        self._refused(session, exc)
                        continue
                    for other in done - {task, accepting}:  # a second one in the same instant
                        if other in pending and not other.exception():
                            pending.discard(other)
                            refuse_handoff(other.result(), "already_attached")
                    return handoff
        finally:
            if accepting is not None and accepting.done() and not accepting.cancelled():
                with contextlib.suppress(Exception):
                    accepting.result()[0].close()  # accepted in the same instant: dropped
            elif accepting is not None:
                accepting.cancel()
                pending.add(accepting)
            for task in pending:  # cancelled handoffs are refused and fail closed
                task.cancel()
            # wait for the cancellations to remove their readers: the listener's fd number
            # is reused (by the session's eventfd) as soon as it is closed
            await asyncio.gather(*pending, return_exceptions=True)

    async def _receive(self, conn: socket.socket, limits: Limits) -> Handoff:
        handoff = await receive_handoff(conn, limits, check_registration=False)
        if self.settings.allowed_uids and handoff.uid not in self.settings.allowed_uids:
            refuse_handoff(handoff, "peer_not_allowed", f"handoff from uid {handoff.uid} refused")
            raise HandoffError("peer_not_allowed", f"handoff from uid {handoff.uid} refused")
        return handoff

    def _refused(self, session: Session, exc: HandoffError) -> None:
        """One bad or silent connection must not end the session: the real workload may
        still come before attach_timeout_s."""
        self.count_rejection(exc.code)
        session.last_refusal = {"code": exc.code, "message": exc.message}
        log.warning("handoff refused: %s: %s", exc.code, exc.message, extra={"session": session.id})

    async def _run(self, session: Session, listener: socket.socket) -> None:
        try:
            try:
                handoff = await self._accept(session, listener)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    session.socket_path.unlink()
            self._start_engine(session, handoff)
            await self._check_registered(session, handoff)
            handoff.verdict()
            await session.source.start(session)
            await session.ended.wait()
        except HandoffError as exc:
            if exc.code == "attach_timeout" and session.last_refusal:
                exc.message += f"; last handoff refused: {session.last_refusal['message']}"
            elif exc.code != "attach_timeout":
                self.count_rejection(exc.code)
            self._end(session, "failed", exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the workload hanging
            log.exception("session failed", extra={"session": session.id})
            await self.fail(session, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _check_registered(self, session: Session, handoff: Handoff) -> None:
        """The regions' coverage, checked while the engine already serves the first faults
        (reading smaps takes milliseconds). A hostile layout ends the session, failing
        closed: every range the uffd registered is poisoned, never unregistered."""
        try:
            await asyncio.to_thread(check_registered, handoff.pid, handoff.regions)
        except HandoffError as exc:
            engine = session.engine
            if engine is None or engine.state == "completed" or _all_installed(engine):
                return  # a fast restore completed and unregistered its ranges meanwhile
            session.closing = True
            await asyncio.to_thread(self._poison_all, engine, handoff)
            await self._fail_engine(session, engine, exc.code)
            handoff.verdict(exc)
            raise

    @staticmethod
    def _poison_all(engine: _uffd.Engine, handoff: Handoff) -> None:
        with contextlib.suppress(PoisonUnsupported):
            poison_registered(engine.uffd, handoff.pid)

    def _start_engine(self, session: Session, handoff: Handoff, *, recovered: bool = False) -> None:
        session.handoff = handoff
        session.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        options = EngineOptions(
            background=session.request.background,
            window_pages=WINDOW_PAGES[session.request.prefetch],
        )
        pidfd = -1
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(handoff.pid)
        src = session.source
        try:
            session.engine = open_engine(
                handoff,
                session.notify_fd,
                options,
                source_fd=src.local_fd,
                source_size=src.size,
                zero_map=src.zero_map or None,
                zero_map_page_size=src.zero_map_page_size,
                pidfd=pidfd,
            )
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        os.close(handoff.uffd)  # the engine holds its own copy
        handoff.uffd = -1
        session.source.attach(session)
        if recovered:
            # pages the workload already holds; REMOVE events the old agent read are gone
            session.engine.reconcile_pagemap(handoff.pid)
        else:
            session.attached_at = time.time()
        session.state = "running"
        asyncio.get_running_loop().add_reader(session.notify_fd, self._on_notify, session)
        session.engine.start()
        if recovered:
            session.engine.wake_all()  # threads the old agent left blocked fault again
        self.persist(session)
        log.info(
            "workload attached",
            extra={"session": session.id, "pid": handoff.pid, "regions": len(handoff.regions)},
        )

    def _on_notify(self, session: Session) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(session.notify_fd)
        engine = session.engine
        if engine is None or session.closing:
            return
        offsets = engine.take_requests()
        if offsets:
            session.source.on_requests(session, offsets)
        if engine.state == "completed" or (engine.state == "failed" and _all_installed(engine)):
            self._end(session, "completed")
        elif engine.state == "failed":
            code = engine.error or "failed"
            self._end(session, "failed", code, _FAILURE_TEXT.get(code, code))

    def _end(
        self, session: Session, state: str, code: str | None = None, message: str = ""
    ) -> None:
        if not session.active and session.state != "awaiting_attach":
            return
        session.state = state
        session.completed_at = time.time()
        key = (state, code or "")
        self.ended_counts[key] = self.ended_counts.get(key, 0) + 1
        if code is not None:
            session.error = {"code": code, "message": message}
        if session.engine is not None:
            session.final_stats = session.engine.stats()
            session.final_hist = session.histograms()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(session.notify_fd)
            session.engine.close()
            session.engine = None
            os.close(session.notify_fd)
            session.notify_fd = -1
        if session.handoff is not None and session.handoff.conn is not None:
            # a restore can end before its registration check did: answer the workload
            ended_ok = state == "completed"
            session.handoff.verdict(None if ended_ok else HandoffError(code or state, message))
            session.handoff.conn.close()
            session.handoff.conn = None
        asyncio.get_running_loop().create_task(session.source.stop())
        session.ended.set()
        self.persist(session)
        level = logging.INFO if state == "completed" else logging.WARNING
        log.log(level, "session %s", state, extra={"session": session.id, "code": code})

    async def fail(
        self, session: Session, code: str, message: str, *, state: str = "failed"
    ) -> None:
        """End a session now: poison what is missing (SIGBUS, never zeros), unregister, close."""
        if not session.active or session.closing:
            return
        session.closing = True
        engine = session.engine
        if engine is not None:
            if _all_installed(engine):  # nothing is missing: the restore is complete
                await asyncio.to_thread(engine.fail, code, False)
                self._end(session, "completed")
                return
            message += await self._fail_engine(session, engine, code)
        self._end(session, state, code, message)

    async def _fail_engine(self, session: Session, engine: _uffd.Engine, code: str) -> str:
        """Poison what is missing (POISON is probed, so a Firecracker uffd gets it too).
        Only a kernel without UFFDIO_POISON (before 6.6) leaves one fail-closed answer:
        killing the workload through its pidfd. Returns what to add to the message."""
        if await asyncio.to_thread(engine.fail, code, True):
            return ""
        h = session.handoff
        killed = h is not None and kill_through_pidfd(h.pid, h.start_time)
        log.warning(
            "kernel lacks UFFDIO_POISON; workload %s through its pidfd",
            "killed" if killed else "could not be killed",
            extra={"session": session.id},
        )
        await asyncio.to_thread(engine.fail, code, False)
        return (
            "; the kernel lacks UFFDIO_POISON, so the workload was killed"
            if killed
            else "; the kernel lacks UFFDIO_POISON and the workload could not be killed"
        )

    async def cancel(self, session: Session) -> None:
        if session.state == "awaiting_attach" and session.task is not None:
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.task
            with contextlib.suppress(FileNotFoundError):
                session.socket_path.unlink()
            self._end(session, "cancelled", "cancelled", "cancelled before attach")
            return
        await self.fail(session, "cancelled", "cancelled by request", state="cancelled")

    def forget(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.retired.add(session)
        with contextlib.suppress(FileNotFoundError):
            (self.records_dir / f"{session.id}.json").unlink()

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "session_not_found", f"no session {session_id}")
        return session

    # ---- records, counters, shutdown -------------------------------------

    def write_record(self, session: Session) -> None:
        """Write the session's record durably enough to survive an agent restart; OSError
        (read-only dir, ENOSPC) leaves no temp file behind."""
        path = self.records_dir / f"{session.id}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(session.record()))
            tmp.replace(path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def persist(self, session: Session) -> None:
        """Update a record; a failure is logged and makes the agent not ready."""
        try:
            self.write_record(session)
            self.state_writable = True
        except OSError as exc:
            if self.state_writable:
                log.error(
                    "session record cannot be written: %s", exc, extra={"session": session.id}
                )
            self.state_writable = False

    def probe_state_dir(self) -> bool:
        """Whether a record can be written now (for /readyz, after a failed write)."""
        probe = self.records_dir / ".probe.tmp"
        try:
            probe.write_bytes(b"{}")
            probe.unlink()
            self.state_writable = True
        except OSError:
            with contextlib.suppress(OSError):
                probe.unlink()
            self.state_writable = False
        return self.state_writable

    def count_rejection(self, reason: str) -> None:
        self.handoff_rejections[reason] = self.handoff_rejections.get(reason, 0) + 1

    async def shutdown(self) -> None:
        """Never abandon a workload: let running sessions finish within the grace period,
        then fail what is left by policy (SIGBUS), so no thread stays blocked."""
        self.shutting_down = True
        running = [s for s in self.sessions.values() if s.active]
        for s in running:
            if s.state == "awaiting_attach":
                await self.cancel(s)
        running = [s for s in running if s.active]
        if running:
            log.info("waiting for %d sessions to finish", len(running))
            await asyncio.wait(
                [asyncio.create_task(s.ended.wait()) for s in running],
                timeout=self.settings.shutdown_grace_s,
            )
        for s in running:
            if not s.active:
                continue
            if self.settings.shutdown_policy == "handover" and s.engine is not None:
                self.hand_over(s)
            else:
                await self.fail(s, "agent_shutdown", "the agent shut down before the restore ended")

    def hand_over(self, session: Session) -> None:
        """Leave a running session to the next agent: stop serving without unregistering;
        the record stays 'running' and the next agent takes the uffd back."""
        session.closing = True
        if session.engine is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(session.notify_fd)
            session.engine.close_uffd()
        self.persist(session)
        log.warning("session handed over to the next agent", extra={"session": session.id})


def _all_installed(engine: _uffd.Engine) -> bool:
    """Every page present, zero or removed: whatever happened afterwards, it restored."""
    s = engine.stats()
    return s.get("pages_total", 0) > 0 and s.get("pages_missing", 1) == 0


_FAILURE_TEXT = {
    "workload_exited": "the workload exited before the restore completed",
    "source_read_failed": "reading the source image failed",
    "install_failed": "installing pages into the workload failed",
    "fault_outside_regions": "the workload faulted outside its regions",
    "uffd_read_failed": "reading the userfaultfd failed",
}
