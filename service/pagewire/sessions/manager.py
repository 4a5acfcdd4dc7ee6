"""The agent's sessions: admission, the session socket, the engine, ending and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket

from pagewire import _uffd
from pagewire.agent.settings import Settings
from pagewire.control.metrics import Retired
from pagewire.control.models import PathSource, SessionRequest
from pagewire.core import filework
from pagewire.core.attach import accept_handoff
from pagewire.core.engine import FAILURE_TEXT, EngineOptions, all_installed, open_engine
from pagewire.core.errors import InvalidRequest, LimitReached, NotFound, Unavailable
from pagewire.core.handoff import Handoff, HandoffError, SocketSpec, check_registered, listen
from pagewire.core.layout import Limits
from pagewire.core.poison import PoisonUnsupported, kill_through_pidfd, poison_registered
from pagewire.sessions.lanes import WINDOW_BYTES
from pagewire.sessions.records import RecordStore
from pagewire.sessions.session import Session
from pagewire.sessions.sources import (
    LocalSource,
    Source,
    SourceFactory,
    is_remote,
    open_local_source,
)

log = logging.getLogger("pagewire.sessions")

WINDOW_PAGES = {"around": 16, "none": 1, "working_set": 16}


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
        self.records = RecordStore(settings.state_dir / "sessions")

    # ---- creation -------------------------------------------------------

    def prepare_dirs(self) -> None:
        socket_dir = self.settings.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.socket_group is not None:
            os.chown(socket_dir, -1, self.settings.socket_group)
            os.chmod(socket_dir, 0o710)  # only the agent and that group may enter
        else:
            os.chmod(socket_dir, 0o711)  # anyone may enter, nobody may list
        self.records.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.settings.state_dir, 0o700)

    async def open_source(self, request: SessionRequest) -> Source:
        src = request.source
        if isinstance(src, PathSource):
            return await filework.pool().run(
                f"opening {src.path!r}",
                open_local_source,
                src.path,
                self.settings.export_roots,
                undo=LocalSource.close,
            )
        if self.remote_factory is None:
            raise InvalidRequest("unsupported_source", "this agent cannot reach peers")
        source: Source = await self.remote_factory(request)
        try:
            await source.connect()  # before attach, so the first fault does not wait for it
        except BaseException:  # refused, or the client went away: no connection left open
            await asyncio.shield(source.stop())
            raise
        return source

    async def create(self, request: SessionRequest) -> Session:
        if self.shutting_down:
            raise Unavailable("shutting_down", "the agent is shutting down")
        if self.draining:
            raise Unavailable("draining", "the node is being drained")
        remote = is_remote(request)
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
            raise LimitReached(
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
            raise InvalidRequest(
                "socket_failed", f"cannot create the session socket: {exc}"
            ) from None
        session = Session(session_id, request, source, socket_path)
        try:
            await asyncio.to_thread(self.records.write, session)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            await source.stop()
            self.records.writable = False
            log.error("session refused: its record cannot be written: %s", exc)
            raise Unavailable(
                "state_unwritable", f"the session record cannot be written: {exc}"
            ) from None
        self.records.writable = True
        self.sessions[session_id] = session
        session.task = asyncio.create_task(self._run(session, listener))
        log.info("session created", extra={"session": session_id, "source": source.describe()})
        return session

    def _admit_remote(self) -> None:
        remote = self.reserved_remote + sum(
            1 for s in self.sessions.values() if s.active and s.remote
        )
        if (remote + 1) * WINDOW_BYTES > self.settings.max_bytes_in_flight:
            raise LimitReached(
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

    def _refused(self, session: Session, exc: HandoffError) -> None:
        """One bad or silent connection must not end the session: the real workload may
        still come before attach_timeout_s."""
        self.count_rejection(exc.code)
        session.last_refusal = {"code": exc.code, "message": exc.message}
        log.warning("handoff refused: %s: %s", exc.code, exc.message, extra={"session": session.id})

    async def _run(self, session: Session, listener: socket.socket) -> None:
        try:
            try:
                s, refused = self.settings, functools.partial(self._refused, session)
                limits = Limits(s.max_regions, s.max_session_bytes, session.source.size)
                timeout = session.request.attach_timeout_s
                handoff = await accept_handoff(listener, limits, timeout, s.allowed_uids, refused)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    session.socket_path.unlink()
            self.start_engine(session, handoff)
            await self._check_registered(session, handoff)
            handoff.verdict()
            await session.source.start(session)
            await session.ended.wait()
        except HandoffError as exc:
            if exc.code == "attach_timeout" and session.last_refusal:
                exc.message += f"; last handoff refused: {session.last_refusal['message']}"
            elif exc.code != "attach_timeout":
                self.count_rejection(exc.code)
            self.end(session, "failed", exc.code, exc.message)
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
            if engine is None or engine.state == "completed" or all_installed(engine):
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

    def start_engine(self, session: Session, handoff: Handoff, *, recovered: bool = False) -> None:
        """Serve the workload: the engine takes its uffd (a recovered session's too, after
        an agent restart) and the session runs."""
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
        session.begin(recovered=recovered)
        asyncio.get_running_loop().add_reader(session.notify_fd, self._on_notify, session)
        session.engine.start()
        if recovered:
            session.engine.wake_all()  # threads the old agent left blocked fault again
        self.records.persist(session)
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
        if engine.state == "completed" or (engine.state == "failed" and all_installed(engine)):
            self.end(session, "completed")
        elif engine.state == "failed":
            code = engine.error or "failed"
            self.end(session, "failed", code, FAILURE_TEXT.get(code, code))

    def end(self, session: Session, state: str, code: str | None = None, message: str = "") -> None:
        """End a session (once): count it, stop its source, keep its record."""
        if not session.end(state, code, message):
            return
        key = (state, code or "")
        self.ended_counts[key] = self.ended_counts.get(key, 0) + 1
        asyncio.get_running_loop().create_task(session.source.stop())
        session.ended.set()
        self.records.persist(session)
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
            if all_installed(engine):  # nothing is missing: the restore is complete
                await asyncio.to_thread(engine.fail, code, False)
                self.end(session, "completed")
                return
            message += await self._fail_engine(session, engine, code)
        self.end(session, state, code, message)

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
            self.end(session, "cancelled", "cancelled", "cancelled before attach")
            return
        await self.fail(session, "cancelled", "cancelled by request", state="cancelled")

    def forget(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.retired.add(session)
        self.records.remove(session.id)

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("session_not_found", f"no session {session_id}")
        return session

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
        self.records.persist(session)
        log.warning("session handed over to the next agent", extra={"session": session.id})
