"""Agent restart: read session records back and take each unfinished session's uffd back
from its workload (pidfd_open + pidfd_getfd), then carry on where the old agent stopped.

A record is data, not a command: one that is not what this agent writes is skipped and
logged; an id is checked against a strict pattern (it names files); the socket path is
rebuilt from the id; and before a workload's uffd is taken, its regions must be what
the process has registered (smaps) and fit the reopened image, and the pid's start time
and uffd inode must match.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pagewire import _uffd
from pagewire.control.models import ACTIVE_STATES, SessionRequest, SessionStatus
from pagewire.core.errors import PagewireError, PeerUnavailable, Unavailable
from pagewire.core.handoff import Handoff
from pagewire.core.layout import LayoutError, Limits, Region, check_layout, parse_region
from pagewire.core.proc import is_uffd, process_start_time, read_registered_vmas, uncovered
from pagewire.sessions.manager import SessionManager
from pagewire.sessions.session import Session
from pagewire.sessions.sources import PassiveSource, Source

log = logging.getLogger("pagewire.sessions.recovery")


class RecoveryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def find_uffd(pid: int, start_time: int, inode: int) -> int:
    """A copy of the workload's uffd, checked against the recorded pid start and inode."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise RecoveryError("workload_exited", f"the workload (pid {pid}) is gone") from None
    try:
        # checked after pidfd_open: the pidfd then holds the very process checked
        if process_start_time(pid) != start_time:
            os.close(pidfd)
            raise RecoveryError("workload_exited", f"pid {pid} is another process now")
    except OSError:
        os.close(pidfd)
        raise RecoveryError("workload_exited", f"the workload (pid {pid}) is gone") from None
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/fd/{name}").st_ino != inode:
                    continue
                fd = _uffd.pidfd_getfd(pidfd, int(name))
                if is_uffd(fd) and os.fstat(fd).st_ino == inode:
                    return fd
                os.close(fd)
    finally:
        os.close(pidfd)
    raise RecoveryError("uffd_lost", f"the workload (pid {pid}) no longer holds its uffd")


class _Placeholder(PassiveSource):
    """The source of a session that cannot be reopened: describes, holds nothing."""

    def __init__(self, source: dict[str, str]) -> None:
        self.source = source

    def describe(self) -> dict[str, str]:
        return self.source


def _session_from(record: dict[str, Any], request: SessionRequest, socket_dir: Path) -> Session:
    return Session(
        record["id"],
        request,
        _Placeholder(record.get("source") or {}),
        socket_dir / f"{record['id']}.sock",  # rebuilt, never taken from the record
        created_at=record["created_at"],
        state=record["state"],
        attached_at=record.get("attached_at"),
        completed_at=record.get("completed_at"),
        error=record.get("error"),
    )


async def recover(manager: SessionManager) -> None:
    for path, record in manager.records.load_all():
        try:
            request = SessionRequest.model_validate(record["request"])
        except (KeyError, ValueError):
            log.warning("session record %s has an invalid request; skipped", path)
            continue
        session = _session_from(record, request, manager.settings.socket_dir)
        manager.sessions[session.id] = session
        if session.state not in ACTIVE_STATES:
            session.frozen_status = _frozen_status(record, path)
            continue
        try:
            await _take_back(manager, session, record)
        except Exception:  # one record must not stop the agent from starting
            log.exception("taking back session %s failed", session.id)
            if session.active:
                manager.end(session, "failed", "recovery_failed", "taking it back failed")


def _frozen_status(record: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """An ended session's last status, if it is one (else it is rebuilt from the record)."""
    status = record.get("status")
    try:
        checked = SessionStatus.model_validate(status)
    except ValidationError:
        log.warning("session record %s: its status is malformed; rebuilt", path)
        return None
    if checked.id != record["id"] or not isinstance(status, dict):
        return None
    return status


def _regions(workload: dict[str, Any], settings: Any, image_size: int | None) -> list[Region]:
    """The recorded regions, checked like a handoff layout (and against the image)."""
    items = [
        {"base_host_virt_addr": b, "size": s, "offset": o, "page_size": p}
        for b, s, o, p in workload["regions"]
    ]
    limits = Limits(settings.max_regions, settings.max_session_bytes, image_size)
    regions = [parse_region(item, i) for i, item in enumerate(items)]
    check_layout(regions, limits)
    return regions


def check_registered_now(pid: int, start_time: int, regions: list[Region]) -> None:
    """The process is the recorded one and has every region registered with a uffd
    (smaps 'um'); RecoveryError otherwise. Nothing is taken from it before this holds."""
    try:
        if process_start_time(pid) != start_time:
            raise RecoveryError("workload_exited", f"pid {pid} is another process now")
        vmas = read_registered_vmas(pid)
    except OSError:
        raise RecoveryError("workload_exited", f"the workload (pid {pid}) is gone") from None
    bad = uncovered(regions, vmas)
    if bad:
        raise RecoveryError(
            "record_mismatch", f"region at 0x{bad[0].base:x} is not registered in pid {pid}"
        )


async def _take_back(manager: SessionManager, session: Session, record: dict[str, Any]) -> None:
    workload = record.get("workload")
    if workload is None:
        # the workload never attached: nothing can be waiting on the old socket
        manager.end(session, "failed", "attach_lost", "the agent restarted before attach")
        return
    pid, start_time = workload["pid"], workload["start_time"]
    try:
        regions = _regions(workload, manager.settings, None)
        check_registered_now(pid, start_time, regions)
    except LayoutError as exc:
        manager.end(session, "failed", "record_mismatch", f"recorded regions: {exc}")
        return
    except RecoveryError as exc:
        manager.end(session, "failed", exc.code, exc.message)
        return
    source = await _reopen_source(manager, session)
    if source is not None:
        try:
            _regions(workload, manager.settings, source.size)
        except LayoutError as exc:
            await source.stop()
            manager.end(session, "failed", "record_mismatch", f"recorded regions: {exc}")
            return
    try:
        uffd = find_uffd(pid, start_time, workload["uffd_inode"])
    except RecoveryError as exc:
        if source is not None:
            await source.stop()
        manager.end(session, "failed", exc.code, exc.message)
        return
    handoff = Handoff(
        uffd=uffd,
        regions=regions,
        pid=workload["pid"],
        uid=-1,
        start_time=workload["start_time"],
        uffd_inode=workload["uffd_inode"],
        features=_uffd.uffd_features(uffd),
    )
    session.handoff = handoff
    if source is None:
        # policy: the missing pages are poisoned, never left hanging or zero-filled
        manager.start_engine(session, handoff, recovered=True)
        await manager.fail(session, "source_lost", "the source could not be reopened")
        return
    session.source = source
    manager.start_engine(session, handoff, recovered=True)
    await session.source.start(session)
    log.info(
        "session taken back after restart", extra={"session": session.id, "pid": workload["pid"]}
    )


async def _reopen_source(manager: SessionManager, session: Session) -> Source | None:
    """Open the session's source again; while it is unreachable the session is paused (its
    workload's threads stay blocked) and, under on_source_lost "sigbus", given up after
    pause_timeout_s. Returns None when given up."""
    request = session.request
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.pause_timeout_s
    backoff = 0.1
    while True:
        try:
            return await manager.open_source(request)
        except (PagewireError, OSError) as exc:
            message = exc.message if isinstance(exc, PagewireError) else str(exc)
            permanent = isinstance(exc, PagewireError) and not isinstance(
                exc, (PeerUnavailable, Unavailable)
            )
            if permanent or (request.on_source_lost == "sigbus" and loop.time() >= deadline):
                log.warning(
                    "source of a recovered session lost: %s", message, extra={"session": session.id}
                )
                return None
            session.pause()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
