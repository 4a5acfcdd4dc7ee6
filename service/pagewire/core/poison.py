"""Failing closed on a uffd we will not serve: poison every missing page of the ranges it
registered (SIGBUS on touch, never zeros, never a hang), or, on a kernel without
UFFDIO_POISON, kill the workload through its pidfd."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal

from pagewire import _uffd
from pagewire.core.proc import is_uffd, process_start_time, registered_vmas

log = logging.getLogger("pagewire.core.handoff")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class PoisonUnsupported(Exception):
    """The kernel has no UFFDIO_POISON (before 6.6)."""


def poison_registered(uffd: int, pid: int) -> int:
    """Poison every missing page of every range this uffd has registered in pid, so the
    workload gets SIGBUS on touch (never zeros, never a hang). Ranges registered with
    another uffd answer ENOENT and are left alone. Returns pages poisoned."""
    poisoned = 0
    for start, end, page in registered_vmas(pid):
        try:
            poisoned += _uffd.uffd_poison(uffd, start, end - start, page)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise PoisonUnsupported(str(exc)) from None
    return poisoned


def kill_through_pidfd(pid: int, start_time: int | None = None) -> bool:
    """SIGKILL pid through a pidfd (checked against its start time): the only fail-closed
    answer where the kernel cannot poison. True if the signal was sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if start_time is not None and process_start_time(pid) != start_time:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def fail_closed(fds: list[int], pid: int | None) -> str:
    """A refused handoff: poison through every fd that is a uffd, then close every fd.
    Returns what the workload was given ('' when no uffd came)."""
    uffds = [fd for fd in fds if is_uffd(fd)]
    if not uffds or not pid:
        _close_all(fds)
        return ""
    outcome = "poisoned"
    try:
        for fd in uffds:
            poison_registered(fd, pid)
    except PoisonUnsupported:
        outcome = "killed" if kill_through_pidfd(pid) else "not killed"
        log.warning("kernel lacks UFFDIO_POISON: workload %d %s through its pidfd", pid, outcome)
    finally:
        _close_all(fds)
    return outcome
