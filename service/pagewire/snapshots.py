"""Live snapshots by userfaultfd write-protect: a workload hands over a region registered in
WP mode; the agent protects it (the snapshot's instant), copies pages to a file in the
background while the workload keeps running, copying a page first when a write to it
arrives; the finished file becomes an export."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _uffd
from .errors import ApiError
from .exports import ExportError, ExportRegistry
from .handoff import Handoff, HandoffError, SocketSpec, listen, receive_handoff
from .layout import Limits
from .models import SnapshotRequest
from .sessions import resolve_parent_under_roots
from .settings import Settings

log = logging.getLogger("pagewire.snapshots")


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


class SnapshotManager:
    def __init__(self, settings: Settings, exports: ExportRegistry) -> None:
        self.settings = settings
        self.exports = exports
        self.snapshots: dict[str, Snapshot] = {}

    def get(self, snapshot_id: str) -> Snapshot:
        snap = self.snapshots.get(snapshot_id)
        if snap is None:
            raise ApiError(404, "snapshot_not_found", f"no snapshot {snapshot_id}")
        return snap

    async def create(self, request: SnapshotRequest) -> Snapshot:
        path = resolve_parent_under_roots(request.path, self.settings.export_roots)
        if path.exists():
            raise ApiError(409, "file_exists", f"{path} exists already")
        try:
            self.exports.get(request.name)
            raise ApiError(409, "export_exists", f"export {request.name!r} already exists")
        except ExportError:
            pass
        snap_id = "snap-" + secrets.token_hex(8)
        socket_path = self.settings.socket_dir / f"{snap_id}.sock"
        listener = listen(SocketSpec(socket_path))
        snap = Snapshot(snap_id, request, path, socket_path)
        self.snapshots[snap_id] = snap
        asyncio.get_running_loop().create_task(self._run(snap, listener))
        return snap

    async def _run(self, snap: Snapshot, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                conn, _ = await asyncio.wait_for(
                    loop.sock_accept(listener), snap.request.attach_timeout_s
                )
            except TimeoutError:
                raise HandoffError("attach_timeout", "no workload attached in time") from None
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    snap.socket_path.unlink()
            limits = Limits(max_regions=1, max_bytes=self.settings.max_session_bytes)
            snap.handoff = await receive_handoff(conn, limits, check_registration=False)
            await self._copy(snap)
        except HandoffError as exc:
            self._end(snap, "failed", exc.code, exc.message)
        except (OSError, ExportError) as exc:
            self._end(snap, "failed", "snapshot_failed", str(exc))

    async def _copy(self, snap: Snapshot) -> None:
        h = snap.handoff
        assert h is not None
        region = h.regions[0]
        out = os.open(snap.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(out, region.size)
            snap.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            snap.engine = _uffd.Snapshot(
                h.uffd, region.base, region.size, region.page_size, h.pid, out, snap.notify_fd
            )
        finally:
            os.close(out)
            os.close(h.uffd)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(snap.engine.start)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                snap.path.unlink()  # the partial file holds no instant
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
        await asyncio.to_thread(self.exports.publish, snap.request.name, str(snap.path))
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
        snap.state = state
        snap.completed_at = time.time()
        if code:
            snap.error = {"code": code, "message": message}
        snap.ended.set()
        log.info("snapshot %s", state, extra={"snapshot": snap.id, "code": code})
