"""Agent restart: read session records back and take each unfinished session's uffd back
from its workload (pidfd_open + pidfd_getfd), then carry on where the old agent stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pagewire import _uffd
from pagewire.control.errors import ApiError
from pagewire.control.models import ACTIVE_STATES, SessionRequest
from pagewire.core.handoff import Handoff, is_uffd, process_start_time
from pagewire.core.layout import Region
from pagewire.sessions.manager import PassiveSource, Session, SessionManager

log = logging.getLogger("pagewire.sessions.recovery")


class RecoveryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def find_uffd(pid: int, start_time: int, inode: int) -> int:
    """A copy of the workload's uffd, checked against the recorded pid start and inode."""
    try:
        if process_start_time(pid) != start_time:
            raise RecoveryError("workload_exited", f"pid {pid} is another process now")
        pidfd = os.pidfd_open(pid)
    except (FileNotFoundError, ProcessLookupError):
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


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
        return record
    except (OSError, ValueError):
        log.warning("unreadable session record %s", path)
        return None


class _Placeholder(PassiveSource):
    """The source of a session that cannot be reopened: describes, holds nothing."""

    def __init__(self, source: dict[str, str]) -> None:
        self.source = source

    def describe(self) -> dict[str, str]:
        return self.source


def _session_from(record: dict[str, Any], request: SessionRequest) -> Session:
    session = Session(
        record["id"],
        request,
        _Placeholder(record.get("source") or {}),
        Path(record["socket"]),
        created_at=record["created_at"],
    )
    session.state = record["state"]
    session.attached_at = record.get("attached_at")
    session.completed_at = record.get("completed_at")
    session.error = record.get("error")
    return session


async def recover(manager: SessionManager) -> None:
    for path in sorted(manager.records_dir.glob("*.json")):
        record = load_record(path)
        if record is None:
            continue
        try:
            request = SessionRequest.model_validate(record["request"])
        except (KeyError, ValueError):
            log.warning("session record %s has an invalid request; dropped", path)
            continue
        session = _session_from(record, request)
        manager.sessions[session.id] = session
        if session.state not in ACTIVE_STATES:
            session.frozen_status = record.get("status")
            continue
        await _take_back(manager, session, record)


async def _take_back(manager: SessionManager, session: Session, record: dict[str, Any]) -> None:
    workload = record.get("workload")
    if workload is None:
        # the workload never attached: nothing can be waiting on the old socket
        session.state = "awaiting_attach"
        manager._end(session, "failed", "attach_lost", "the agent restarted before attach")
        return
    try:
        uffd = find_uffd(workload["pid"], workload["start_time"], workload["uffd_inode"])
    except RecoveryError as exc:
        manager._end(session, "failed", exc.code, exc.message)
        return
    regions = [Region(*r) for r in workload["regions"]]
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
    source = await _reopen_source(manager, session)
    if source is None:
        # policy: the missing pages are poisoned, never left hanging or zero-filled
        manager._start_engine(session, handoff, recovered=True)
        await manager.fail(session, "source_lost", "the source could not be reopened")
        return
    session.source = source
    manager._start_engine(session, handoff, recovered=True)
    await session.source.start(session)
    log.info(
        "session taken back after restart", extra={"session": session.id, "pid": workload["pid"]}
    )


async def _reopen_source(manager: SessionManager, session: Session) -> Any:
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
        except (ApiError, OSError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            permanent = isinstance(exc, ApiError) and exc.status < 500
            if permanent or (request.on_source_lost == "sigbus" and loop.time() >= deadline):
                log.warning(
                    "source of a recovered session lost: %s", message, extra={"session": session.id}
                )
                return None
            session.state = "paused"
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
