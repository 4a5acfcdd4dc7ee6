"""Handoff listener: one Unix socket per session that accepts a workload's uffd.

Speaks Firecracker's UFFD handshake unchanged: one message whose body is the JSON
region layout and whose ancillary data carries exactly one fd, the uffd. The peer
never closes its end, so the body is read until it parses, with caps on size and time.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagewire import _uffd
from pagewire.core.layout import LayoutError, Limits, Region, parse_layout
from pagewire.core.poison import fail_closed
from pagewire.core.proc import is_uffd, process_alive, process_start_time, unregistered_ranges

MAX_BODY = 1 << 20
MAX_FDS = 8
READ_TIMEOUT_S = 5.0


class HandoffError(Exception):
    """A refused handoff; code names the defect."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Handoff:
    uffd: int
    regions: list[Region]
    pid: int
    uid: int
    start_time: int
    uffd_inode: int
    features: int
    conn: socket.socket | None = field(default=None, repr=False)
    verdict_sent: bool = False

    def verdict(self, error: HandoffError | None = None) -> None:
        """Send the workload its one verdict line (once)."""
        if not self.verdict_sent:
            self.verdict_sent = True
            send_verdict(self.conn, error)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.uffd)
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def send_verdict(conn: socket.socket | None, error: HandoffError | None = None) -> None:
    """One JSON line after validation; Firecracker never reads it, pagewire.client does."""
    if conn is None:
        return
    line = (
        {"ok": True} if error is None else {"error": {"code": error.code, "message": error.message}}
    )
    with contextlib.suppress(OSError):
        conn.send(json.dumps(line).encode() + b"\n")


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    if timeout <= 0:
        raise HandoffError("handoff_timeout", "the layout did not arrive in time")
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        raise HandoffError("handoff_timeout", "the layout did not arrive in time") from None
    finally:
        loop.remove_reader(fd)


async def _read_message(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, fds: list[int]
) -> tuple[bytes, list[int]]:
    """Read the layout; fds received are appended to fds as they come, so a caller that
    sees a timeout or an error still closes (and poisons through) them."""
    body = b""
    deadline = time.monotonic() + READ_TIMEOUT_S
    fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while True:
        try:
            data, ancdata, _flags, _addr = conn.recvmsg(65536, fd_space)
        except BlockingIOError:
            await _wait_readable(loop, conn.fileno(), deadline - time.monotonic())
            continue
        fds.extend(_fds_from_ancillary(ancdata))
        body += data
        if not data:
            return body, fds
        if len(body) > MAX_BODY:
            return body, fds
        if _complete_or_broken(body):
            return body, fds


def _complete_or_broken(body: bytes) -> bool:
    """True when body parses, or fails before its end (more bytes cannot fix it)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.end < len(body)  # a truncated character at the end may still complete
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Unterminated string"):
            return False  # reported at the string's start, though it is cut at the end
        return exc.pos < len(text.rstrip())
    except (ValueError, RecursionError):
        return True  # a 5000-digit number or "[" nested 200000 deep: no byte fixes it
    return True


def check_registered(pid: int, regions: list[Region]) -> None:
    """HandoffError unless every region lies in VMAs registered for missing faults."""
    missing = unregistered_ranges(pid, regions)
    if missing and not process_alive(pid):
        raise HandoffError("workload_exited", "the workload exited during the handoff")
    if missing:
        raise HandoffError(
            "not_registered",
            f"region at 0x{missing[0].base:x} is not registered with the uffd in missing mode",
        )


def _validate(
    conn: socket.socket, body: bytes, fds: list[int], limits: Limits, check_registration: bool
) -> Handoff:
    if len(body) > MAX_BODY:
        raise HandoffError("too_large", f"the layout exceeds {MAX_BODY} bytes")
    if not fds:
        raise HandoffError("no_fd", "no file descriptor came with the layout")
    if len(fds) > 1:
        raise HandoffError("extra_fds", f"{len(fds)} file descriptors came; exactly one expected")
    uffd = fds[0]
    if not is_uffd(uffd):
        raise HandoffError("not_uffd", "the file descriptor is not a userfaultfd")
    try:
        regions = parse_layout(body, limits)
    except LayoutError as exc:
        raise HandoffError(exc.code, str(exc)) from None
    except (ValueError, RecursionError, TypeError, OverflowError) as exc:
        # e.g. a size of 5000 digits (int conversion limit) or "[" nested 200000 deep
        raise HandoffError("invalid_json", f"the layout cannot be parsed: {exc}") from None
    pid, uid, _gid = peer_credentials(conn)
    if check_registration:
        check_registered(pid, regions)
    return Handoff(
        uffd=uffd,
        regions=regions,
        pid=pid,
        uid=uid,
        start_time=process_start_time(pid),
        uffd_inode=os.fstat(uffd).st_ino,
        features=_uffd.uffd_features(uffd),
        conn=conn,
    )


async def receive_handoff(
    conn: socket.socket, limits: Limits, *, check_registration: bool = True
) -> Handoff:
    """Read one handoff from an accepted connection; HandoffError names any defect.

    On success the connection stays open (Firecracker expects it to), owned by the
    Handoff. On failure it is closed, and a real uffd is unregistered and closed.
    check_registration=False leaves the (slow, smaps) coverage check to the caller, who
    may run it once the engine is serving, so the first fault does not wait for it."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    fds = list[int]()
    try:
        body, fds = await _read_message(loop, conn, fds)
        return _validate(conn, body, fds, limits, check_registration)
    except HandoffError as exc:
        await asyncio.to_thread(refuse, conn, fds, exc)  # poisoning a large VM takes a while
        raise
    except asyncio.CancelledError:
        refuse(conn, fds, HandoffError("cancelled", "the session ended during the handoff"))
        raise
    except Exception as exc:  # never leak the fd nor leave the workload hanging
        error = HandoffError("handoff_failed", f"reading the handoff failed: {exc}")
        await asyncio.to_thread(refuse, conn, fds, error)
        raise error from None


def refuse_handoff(handoff: Handoff, code: str, message: str = "") -> None:
    """Refuse a handoff that was read whole (a second workload, a uid not allowed)."""
    conn, handoff.conn = handoff.conn, None
    fds = [handoff.uffd] if handoff.uffd >= 0 else []
    handoff.uffd = -1
    error = HandoffError(code, message or f"handoff refused: {code}")
    if conn is None:
        fail_closed(fds, handoff.pid)
        return
    refuse(conn, fds, error)


def refuse(conn: socket.socket, fds: list[int], error: HandoffError) -> None:
    """Fail closed: poison what any uffd that came has registered, close every fd, tell
    the workload why, close the connection."""
    pid = None
    with contextlib.suppress(OSError):
        pid = peer_credentials(conn)[0]
    outcome = fail_closed(fds, pid)
    if outcome:
        error.message += f" (workload memory {outcome})"
    send_verdict(conn, error)
    conn.close()


@dataclass
class SocketSpec:
    path: Path
    uid: int | None = None
    gid: int | None = None
    mode: int = 0o600


def listen(spec: SocketSpec) -> socket.socket:
    """Create the session socket with its owner and mode set before anyone can connect."""
    with contextlib.suppress(FileNotFoundError):
        spec.path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(spec.path))
    finally:
        os.umask(old_umask)
    if spec.uid is not None or spec.gid is not None:
        os.chown(
            spec.path, -1 if spec.uid is None else spec.uid, -1 if spec.gid is None else spec.gid
        )
    os.chmod(spec.path, spec.mode)
    sock.listen(4)
    sock.setblocking(False)
    return sock
