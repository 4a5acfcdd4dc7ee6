"""Live snapshots by userfaultfd write-protect: a workload hands over a region registered in
WP mode; the agent protects it (the snapshot's instant), copies pages to a file in the
background while the workload keeps running, copying a page first when a write to it
arrives; the finished file becomes an export."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagewire import _uffd
from pagewire.agent.settings import Settings
from pagewire.control.models import SnapshotRequest
from pagewire.core import filework
from pagewire.core.attach import accept_handoff
from pagewire.core.errors import InvalidRequest, LimitReached, NotFound, PagewireError
from pagewire.core.handoff import Handoff, HandoffError, SocketSpec, listen
from pagewire.core.layout import Limits
from pagewire.core.paths import BeneathFile, open_beneath, reopen_read_only
from pagewire.exports.errors import ExportError, ExportExists, ExportNotFound
from pagewire.exports.registry import ExportRegistry

log = logging.getLogger("pagewire.exports.snapshots")


@dataclass
class Snapshot:
    id: str
    request: SnapshotRequest
    path: Path
    socket_path: Path
    created_at: float = field(default_factory=time.time)
    state: str = "awaiting_attach"
    attached_at: float | None = None
    completed_at: float | None = None
    error: dict[str, str] | None = None
    engine: _uffd.Snapshot | None = None
    notify_fd: int = -1
    handoff: Handoff | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    final: dict[str, int] = field(default_factory=dict)
    out: BeneathFile | None = None  # the file, created at request time; removed on failure
    last_refusal: dict[str, str] | None = None  # a handoff refused while awaiting attach

    @property
    def active(self) -> bool:
        return self.state in ("awaiting_attach", "running")

    def status(self) -> dict[str, Any]:
        stats = self.engine.stats() if self.engine is not None else self.final
        return {
            "id": self.id,
            "state": self.state,
            "export": self.request.name,
            "path": str(self.path),
            "socket": str(self.socket_path),
            "pages_total": stats.get("pages_total", 0),
            "pages_copied": stats.get("pages_copied", 0),
            "write_faults": stats.get("write_faults", 0),
            "created_at": self.created_at,
            "attached_at": self.attached_at,
            "completed_at": self.completed_at,
            "error": self.error,
            "workload_pid": self.handoff.pid if self.handoff else None,
        }


def _discard(out: BeneathFile) -> None:
    out.remove()
    out.close()


class SnapshotManager:
    def __init__(
        self,
        settings: Settings,
        exports: ExportRegistry,
        count_rejection: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.settings = settings
        self.exports = exports
        self.count_rejection = count_rejection
        self.snapshots: dict[str, Snapshot] = {}
        self._creating = 0

    def _withdraw(self, exp: Any) -> None:
        with contextlib.suppress(ExportError):  # withdrawn meanwhile
            self.exports.withdraw(exp.name)

    def expire(self, now: float) -> int:
        """Forget snapshots that ended more than retention_s ago."""
        old = [
            sid
            for sid, s in self.snapshots.items()
            if not s.active
            and s.completed_at is not None
            and now - s.completed_at > self.settings.retention_s
        ]
        for sid in old:
            del self.snapshots[sid]
        return len(old)

    def get(self, snapshot_id: str) -> Snapshot:
        snap = self.snapshots.get(snapshot_id)
        if snap is None:
            raise NotFound("snapshot_not_found", f"no snapshot {snapshot_id}")
        return snap

    async def create(self, request: SnapshotRequest) -> Snapshot:
        pending = sum(1 for s in self.snapshots.values() if s.active) + self._creating
        if pending >= self.settings.max_snapshots:
            raise LimitReached(
                "too_many_snapshots",
                f"{pending} snapshots pending, at most {self.settings.max_snapshots} "
                "(--max-snapshots)",
            )
        try:
            self.exports.get(request.name)
        except ExportNotFound:
            pass
        else:
            raise ExportExists(f"export {request.name!r} already exists")
        self._creating += 1  # the slot is taken before the first await
        try:
            out = await filework.pool().run(
                f"creating {request.path!r}",
                functools.partial(open_beneath, create=True),
                self.settings.export_roots,
                request.path,
                undo=_discard,
            )
        finally:
            self._creating -= 1
        snap_id = "snap-" + secrets.token_hex(8)
        socket_path = self.settings.socket_dir / f"{snap_id}.sock"
        try:
            listener = listen(SocketSpec(socket_path))
        except OSError as exc:
            _discard(out)
            raise InvalidRequest("socket_failed", f"cannot create the socket: {exc}") from None
        snap = Snapshot(snap_id, request, out.path, socket_path, out=out)
        self.snapshots[snap_id] = snap
        asyncio.get_running_loop().create_task(self._run(snap, listener))
        return snap

    def _refused(self, snap: Snapshot, exc: HandoffError) -> None:
        """As for sessions, one bad connection does not end the snapshot's wait."""
        self.count_rejection(exc.code)
        snap.last_refusal = {"code": exc.code, "message": exc.message}
        log.warning("handoff refused: %s: %s", exc.code, exc.message, extra={"snapshot": snap.id})

    async def _run(self, snap: Snapshot, listener: socket.socket) -> None:
        try:
            try:
                snap.handoff = await accept_handoff(
                    listener,
                    Limits(max_regions=1, max_bytes=self.settings.max_session_bytes),
                    snap.request.attach_timeout_s,
                    self.settings.allowed_uids,
                    functools.partial(self._refused, snap),
                )
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    snap.socket_path.unlink()
            await self._copy(snap)
        except HandoffError as exc:
            if exc.code == "attach_timeout" and snap.last_refusal:
                exc.message += f"; last handoff refused: {snap.last_refusal['message']}"
            self._end(snap, "failed", exc.code, exc.message)
        except ExportError as exc:  # publishing the finished file
            self._end(snap, "failed", "snapshot_failed", str(exc))
        except PagewireError as exc:
            self._end(snap, "failed", exc.code, exc.message)
        except OSError as exc:
            self._end(snap, "failed", "snapshot_failed", str(exc))

    async def _copy(self, snap: Snapshot) -> None:
        h = snap.handoff
        assert h is not None
        region = h.regions[0]
        assert snap.out is not None
        out = snap.out.fd
        try:
            os.ftruncate(out, region.size)
            snap.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            snap.engine = _uffd.Snapshot(
                h.uffd, region.base, region.size, region.page_size, h.pid, out, snap.notify_fd
            )
        finally:
            os.close(h.uffd)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(snap.engine.start)
        except OSError as exc:  # _end removes the partial file, through its directory fd
            if exc.errno == errno.EBUSY:
                raise HandoffError(
                    "process_not_stopped",
                    f"process {h.pid} did not stop, so no instant could be taken",
                ) from None
            raise
        loop.add_reader(snap.notify_fd, done.set)
        snap.attached_at = time.time()
        snap.state = "running"
        log.info("snapshot started", extra={"snapshot": snap.id, "pid": h.pid})
        try:
            await done.wait()
        finally:
            loop.remove_reader(snap.notify_fd)
        if snap.engine.state != "completed":
            raise OSError(snap.engine.error or "the snapshot failed")
        # the export reads the file written here, through its fd, never by its name
        image = BeneathFile(reopen_read_only(out), snap.path)
        await filework.pool().run(
            f"publishing snapshot {snap.id}",
            self.exports.publish_fd,
            snap.request.name,
            image,
            undo=self._withdraw,
        )
        self._end(snap, "completed")

    def _end(self, snap: Snapshot, state: str, code: str | None = None, message: str = "") -> None:
        if snap.engine is not None:
            snap.final = snap.engine.stats()
            snap.engine.close()
            snap.engine = None
        if snap.notify_fd >= 0:
            os.close(snap.notify_fd)
            snap.notify_fd = -1
        if snap.handoff is not None and snap.handoff.conn is not None:
            snap.handoff.conn.close()
        if snap.out is not None:
            if state != "completed":
                snap.out.remove()  # no partial image is left behind
            snap.out.close()
            snap.out = None
        snap.state = state
        snap.completed_at = time.time()
        if code:
            snap.error = {"code": code, "message": message}
        snap.ended.set()
        log.info("snapshot %s", state, extra={"snapshot": snap.id, "code": code})
