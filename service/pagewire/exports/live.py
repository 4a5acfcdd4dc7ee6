"""Live sources: export a running process's memory.

The process is frozen (SIGSTOP), its private writable memory (or the listed ranges) is
published like a file (zero map and chunk digests), and pages are served with
process_vm_readv. The export's image is the ranges one after another; its `ranges` say
where each lies in the process, so a destination can map them at the same addresses
and pointers inside stay valid. A process export lives as long as the agent (it is not
kept in the state dir); withdrawing it lets the process run again (SIGCONT).

Freezing is refused for the agent itself, its ancestors and pid 1, and for every process
whose uids the operator has not listed with --live-export-uid (none by default).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pagewire import _uffd
from pagewire.core.errors import Forbidden
from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.core.proc import process_start_time
from pagewire.exports.errors import ExportError, ExportInvalid, ExportStale
from pagewire.exports.export import STATE_READY, Export
from pagewire.exports.identity import FileIdentity
from pagewire.exports.registry import ExportRegistry

MAX_RANGES = 4096
FREEZE_TIMEOUT_S = 5.0


class LiveExportDisabled(ExportError, Forbidden, PermissionError):
    code = "live_export_disabled"


class LiveExportForbidden(ExportError, Forbidden, PermissionError):
    code = "live_export_forbidden"


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def protected_pids() -> set[int]:
    """The agent, every ancestor of it, and pid 1: never frozen."""
    pids = {1}
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(_status_fields(pid)["PPid"])
        except (OSError, KeyError, ValueError):
            break
    return pids


def check_freezable(pid: int, allowed_uids: list[int]) -> None:
    """Refuse what must never be stopped: checked before any signal is sent."""
    if not allowed_uids:
        raise LiveExportDisabled(
            "live export is off: allow it for given uids with --live-export-uid "
            "(PAGEWIRE_LIVE_EXPORT_UIDS)"
        )
    try:
        status = _status_fields(pid)
        tgid = int(status["Tgid"])
        uids = {int(u) for u in status["Uid"].split()}
    except (OSError, KeyError, ValueError):
        raise ExportInvalid(f"no process {pid}") from None
    if tgid != pid:
        raise LiveExportForbidden(f"{pid} is a thread of process {tgid}, not a process")
    if pid in protected_pids():
        raise LiveExportForbidden(f"process {pid} is the agent, an ancestor of it, or pid 1")
    if not uids <= set(allowed_uids):
        raise LiveExportForbidden(
            f"process {pid} runs as uid {sorted(uids)}, not one allowed by --live-export-uid"
        )


@dataclass(frozen=True)
class Range:
    start: int  # address in the process
    size: int
    offset: int  # where it lies in the export's image

    def to_json(self) -> dict[str, int]:
        return {"start": self.start, "size": self.size, "offset": self.offset}


def private_writable_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, size) of every private writable mapping of pid (its heap, stacks, anon)."""
    ranges = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if (
                fields[1].startswith("rw")
                and fields[1][3] == "p"
                and name not in ("[vvar]", "[vsyscall]", "[vdso]")
            ):
                ranges.append((lo, hi - lo))
    return ranges


def freeze(pid: int, start_time: int) -> None:
    """SIGSTOP pid and wait until it is stopped, so its memory holds still. Through a
    pidfd checked against the start time, so a reused pid is never the one stopped."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise ExportInvalid(f"no process {pid}") from None
    try:
        if process_start_time(pid) != start_time:
            raise ExportInvalid(f"process {pid} exited")
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except OSError:
        raise ExportInvalid(f"process {pid} exited") from None
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    while process_state(pid) != "T":
        if time.monotonic() > deadline:
            raise ExportInvalid(f"process {pid} did not stop")
        time.sleep(0.001)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@dataclass
class ProcessExport(Export):
    backed_by_file: ClassVar[bool] = False
    pid: int = 0
    start_time: int = 0
    ranges: list[Range] = field(default_factory=list)

    def check(self) -> None:
        """Stale unless the same process is still there and still frozen."""
        if self.state != STATE_READY:
            raise ExportStale(f"export {self.name!r} is stale: its process changed")
        try:
            same = process_start_time(self.pid) == self.start_time
        except OSError:
            same = False
        if not same or process_state(self.pid) != "T":
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: its process ran or exited")

    def read_image(self, offset: int, length: int) -> bytes:
        parts = []
        for r in self.ranges:
            lo, hi = max(offset, r.offset), min(offset + length, r.offset + r.size)
            if lo < hi:
                parts.append(_uffd.process_read(self.pid, r.start + lo - r.offset, hi - lo))
        return b"".join(parts)

    def read_chunk(self, index: int) -> bytes:
        self.check()
        data = b"".join(self.read_image(off, n) for off, n in self._data_runs(index))
        self.check()  # had it run meanwhile, the bytes could be newer than the digests
        return data

    def read_chunk_full(self, index: int) -> bytes:
        self._check_index(index)
        first, last = self.chunk_pages(index)
        self.check()
        return self.read_image(first * self.page_size, (last - first) * self.page_size)

    def close(self) -> None:
        if process_state(self.pid) == "T":
            try:
                if process_start_time(self.pid) == self.start_time:
                    os.kill(self.pid, signal.SIGCONT)
            except OSError:
                pass

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(pid=self.pid, ranges=[r.to_json() for r in self.ranges])
        return out


def _layout(pid: int, wanted: list[tuple[int, int]] | None) -> list[Range]:
    pairs = wanted if wanted is not None else private_writable_ranges(pid)
    if not pairs or len(pairs) > MAX_RANGES:
        raise ExportInvalid(f"between 1 and {MAX_RANGES} ranges are needed")
    ranges, offset = [], 0
    for start, size in pairs:
        if start % SYSTEM_PAGE_SIZE or size % SYSTEM_PAGE_SIZE or size <= 0:
            raise ExportInvalid(f"range at 0x{start:x} is not page aligned")
        ranges.append(Range(start, size, offset))
        offset += size
    return ranges


def _scan(exp: ProcessExport) -> None:
    """Zero map and chunk digests, read from the frozen process."""
    zero_page = bytes(exp.page_size)
    zero_map = bytearray()
    digests = []
    for index in range(exp.chunks):
        first, last = exp.chunk_pages(index)
        data = exp.read_image(first * exp.page_size, (last - first) * exp.page_size)
        for i in range(0, len(data), exp.page_size):
            zero_map.append(data[i : i + exp.page_size] == zero_page)
        digests.append(hashlib.sha256(data).digest())
    exp.zero_map = bytes(zero_map)
    exp.digests = digests


def publish_process(
    registry: ExportRegistry, name: str, pid: int, ranges: list[tuple[int, int]] | None = None
) -> ProcessExport:
    """Freeze pid and publish its memory as an export; blocking (use asyncio.to_thread)."""
    try:
        start_time = process_start_time(pid)
    except OSError:
        raise ExportInvalid(f"no process {pid}") from None
    check_freezable(pid, registry.live_export_uids)
    layout = _layout(pid, ranges)
    size = sum(r.size for r in layout)
    freeze(pid, start_time)
    exp = ProcessExport(
        name=name,
        path=f"pid:{pid}",
        size=size,
        page_size=SYSTEM_PAGE_SIZE,
        chunk_size=registry.chunk_size,
        zero_map=b"",
        digests=[],
        identity=FileIdentity(0, pid, size, start_time),
        created_at=time.time(),
        pid=pid,
        start_time=start_time,
        ranges=layout,
    )
    try:
        _scan(exp)
    except OSError as exc:
        exp.close()
        raise ExportInvalid(f"reading process {pid}: {exc.strerror}") from None
    try:
        registry.add(exp)
    except BaseException:
        exp.close()  # refused (name taken, limit): the process runs again
        raise
    return exp
