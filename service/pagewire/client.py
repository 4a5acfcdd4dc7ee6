"""The workload side of the handoff, for ordinary processes.

Maps an anonymous region (MADV_DONTFORK, so a forked child never reads zeros),
creates and registers a userfaultfd, and hands both to the agent exactly as
Firecracker does. The uffd stays open for as long as the region lives.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field

from pagewire import _uffd
from pagewire.core.layout import SYSTEM_PAGE_SIZE, Region

MADV_DONTFORK = 10
MADV_DONTNEED = 4

DEFAULT_FEATURES = _uffd.FEATURE_EVENT_REMOVE | (
    _uffd.FEATURE_POISON if _uffd.API_FEATURES_SUPPORTED & _uffd.FEATURE_POISON else 0
)


class HandoffRefused(Exception):
    """The agent refused the handoff; code names the defect (DESIGN.md section 3). The
    region's missing pages were poisoned by the agent, and the region is unmapped."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def read_verdict(sock: socket.socket, timeout: float) -> None:
    """Wait for the agent's one-line verdict; HandoffRefused unless it is {"ok": true}."""
    sock.settimeout(timeout)
    line = b""
    try:
        while not line.endswith(b"\n") and len(line) < 65536:
            data = sock.recv(4096)
            if not data:
                break
            line += data
    except TimeoutError:
        raise HandoffRefused("no_verdict", f"no verdict from the agent in {timeout} s") from None
    try:
        verdict = json.loads(line)
    except ValueError:
        raise HandoffRefused("no_verdict", "the agent closed without a verdict") from None
    if isinstance(verdict, dict) and verdict.get("ok") is True:
        return
    error = verdict.get("error") if isinstance(verdict, dict) else None
    if not isinstance(error, dict):
        raise HandoffRefused("no_verdict", f"unexpected verdict {line[:200]!r}")
    raise HandoffRefused(str(error.get("code")), str(error.get("message")))


@dataclass
class Attachment:
    """Regions being restored by an agent. Keep it alive while the memory is used."""

    regions: list[Region]
    uffd: int
    conn: socket.socket | None = field(default=None, repr=False)

    @property
    def addr(self) -> int:
        return self.regions[0].base

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def read(self, offset: int, size: int, region: int = 0) -> bytes:
        return _uffd.read_memory(self.regions[region].base + offset, size)

    def close(self) -> None:
        """Unmap the regions, then drop the uffd and the socket."""
        for r in self.regions:
            with contextlib.suppress(OSError):
                _uffd.munmap(r.base, r.size)
        self.regions = []
        with contextlib.suppress(OSError):
            os.close(self.uffd)
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_regions(
    layout: list[tuple[int, int]],
    page_size: int = SYSTEM_PAGE_SIZE,
    bases: list[int] | None = None,
) -> list[Region]:
    """Map one anonymous region per (size, image_offset) pair; at the given base addresses
    when there are any (a moved process's memory keeps its addresses, so its pointers hold)."""
    regions = []
    for i, (size, offset) in enumerate(layout):
        at = bases[i] if bases else 0
        addr = _uffd.mmap_anon(size, hugetlb=page_size != SYSTEM_PAGE_SIZE, addr=at)
        _uffd.madvise(addr, size, MADV_DONTFORK)
        regions.append(Region(addr, size, offset, page_size))
    return regions


def send_handoff(sock: socket.socket, regions: list[Region], uffd: int) -> None:
    body = json.dumps([r.to_json() for r in regions]).encode()
    fds = array.array("i", [uffd])
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def attach(
    socket_path: str,
    size: int | None = None,
    *,
    layout: list[tuple[int, int]] | None = None,
    page_size: int = SYSTEM_PAGE_SIZE,
    features: int = DEFAULT_FEATURES,
    timeout: float = 10.0,
    bases: list[int] | None = None,
) -> Attachment:
    """Map the regions, register them, and hand the uffd to the agent at socket_path.

    Either size (one region at image offset 0) or layout [(size, offset), ...]."""
    if layout is None:
        if size is None:
            raise ValueError("give size or layout")
        layout = [(size, 0)]
    regions = map_regions(layout, page_size, bases)
    if page_size != SYSTEM_PAGE_SIZE:
        features |= _uffd.FEATURE_MISSING_HUGETLBFS
    uffd = _uffd.uffd_create(features)
    try:
        for r in regions:
            _uffd.uffd_register(uffd, r.base, r.size)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect(socket_path)
        send_handoff(sock, regions, uffd)
        read_verdict(sock, timeout)
        sock.settimeout(None)
    except BaseException:
        Attachment(regions, uffd).close()
        raise
    return Attachment(regions, uffd, sock)


def attach_for_snapshot(
    socket_path: str, addr: int, size: int, timeout: float = 10.0
) -> Attachment:
    """Hand an existing, populated region to the agent for a live snapshot: registered in
    write-protect mode only (missing pages are the process's own business), unpopulated
    pages protected too. Keep the Attachment alive until the snapshot completes."""
    uffd = _uffd.uffd_create(_uffd.FEATURE_WP | _uffd.FEATURE_WP_UNPOPULATED)
    region = Region(addr, size, 0, SYSTEM_PAGE_SIZE)
    try:
        _uffd.uffd_register(uffd, addr, size, wp=True, missing=False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect(socket_path)
        send_handoff(sock, [region], uffd)
    except BaseException:
        os.close(uffd)
        raise
    return Attachment([], uffd, sock)
