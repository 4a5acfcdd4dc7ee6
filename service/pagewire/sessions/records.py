"""The state dir's session records: one JSON file per session, written whenever its
state changes, so a restarted agent can take unfinished sessions back. A record read back
is data, not a command: one that is not what this agent writes is skipped and logged."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagewire.sessions.session import Session

log = logging.getLogger("pagewire.sessions")


class RecordStore:
    """The records directory; writable says whether the last write (or probe) succeeded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writable = True

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.json"

    def write(self, session: Session) -> None:
        """Write the session's record durably enough to survive an agent restart; OSError
        (read-only dir, ENOSPC) leaves no temp file behind."""
        path = self.path(session.id)
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
            self.write(session)
            self.writable = True
        except OSError as exc:
            if self.writable:
                log.error(
                    "session record cannot be written: %s", exc, extra={"session": session.id}
                )
            self.writable = False

    def probe(self) -> bool:
        """Whether a record can be written now (for /readyz, after a failed write)."""
        probe = self.directory / ".probe.tmp"
        try:
            probe.write_bytes(b"{}")
            probe.unlink()
            self.writable = True
        except OSError:
            with contextlib.suppress(OSError):
                probe.unlink()
            self.writable = False
        return self.writable

    def remove(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(session_id).unlink()

    def load_all(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every record that has the shape this agent writes, in file name order."""
        for path in sorted(self.directory.glob("*.json")):
            record = load_record(path)
            if record is not None:
                yield path, record


SESSION_ID_RE = re.compile(r"^s-[0-9a-f]{16}$")
STATES = ("awaiting_attach", "running", "paused", "completed", "failed", "cancelled")


class BadRecord(ValueError):
    pass


def _number(value: Any, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRecord(f"{what} is not a number")


def _workload(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadRecord("workload is not an object")
    for key in ("pid", "start_time", "uffd_inode"):
        v = value.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BadRecord(f"workload.{key} is not a positive integer")
    regions = value.get("regions")
    if not isinstance(regions, list) or not regions:
        raise BadRecord("workload.regions is not a list of regions")
    for r in regions:
        if not isinstance(r, list) or len(r) != 4:
            raise BadRecord("a region is not [base, size, offset, page_size]")


def check_record(record: Any, path: Path) -> dict[str, Any]:
    """The record if it has the shape this agent writes; BadRecord says what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    sid = record.get("id")
    if not isinstance(sid, str) or not SESSION_ID_RE.match(sid) or path.stem != sid:
        raise BadRecord(f"id {sid!r} is not a session id matching its file name")
    if record.get("state") not in STATES:
        raise BadRecord(f"state {record.get('state')!r} is not a session state")
    _number(record.get("created_at"), "created_at")
    _number(record.get("attached_at"), "attached_at", optional=True)
    _number(record.get("completed_at"), "completed_at", optional=True)
    error = record.get("error")
    if error is not None and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
    ):
        raise BadRecord("error is not {code, message}")
    source = record.get("source")
    if source is not None and not (
        isinstance(source, dict) and all(isinstance(v, str) for v in source.values())
    ):
        raise BadRecord("source is not an object of strings")
    if not isinstance(record.get("request"), dict):
        raise BadRecord("request is not an object")
    _workload(record.get("workload"))
    return record


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        return check_record(json.loads(path.read_text()), path)
    except (OSError, ValueError) as exc:
        log.warning("session record %s skipped: %s", path, exc)
        return None
