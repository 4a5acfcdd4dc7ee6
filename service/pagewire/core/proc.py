"""What /proc says about a process: its start time, whether it lives, its uffd-registered
mappings (smaps VmFlags 'um'), and whether an fd of ours is a userfaultfd."""

from __future__ import annotations

import os
from pathlib import Path

from pagewire.core.layout import SYSTEM_PAGE_SIZE, Region


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: start time in clock ticks after boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int) -> bool:
    """False for a process that is gone or already a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def is_uffd(fd: int) -> bool:
    try:
        return "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def read_registered_vmas(pid: int) -> list[tuple[int, int, int]]:
    """(start, end, page size) of every mapping of pid registered for missing faults with
    some uffd (smaps VmFlags 'um'). OSError when smaps cannot be read."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    vmas: list[tuple[int, int, int]] = []
    start = end = 0
    page = SYSTEM_PAGE_SIZE
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            first, last = head.split("-")
            start, end, page = int(first, 16), int(last, 16), SYSTEM_PAGE_SIZE
        elif line.startswith("KernelPageSize:"):
            page = int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:") and " um" in line:
            vmas.append((start, end, page))
    return vmas


def registered_vmas(pid: int) -> list[tuple[int, int, int]]:
    """read_registered_vmas, or nothing when smaps cannot be read."""
    try:
        return read_registered_vmas(pid)
    except OSError:
        return []


def uncovered(regions: list[Region], vmas: list[tuple[int, int, int]]) -> list[Region]:
    """The regions that the given registered mappings do not cover entirely."""
    spans = sorted((lo, hi) for lo, hi, _page in vmas)
    bad = []
    for r in regions:
        pos = r.base
        for lo, hi in spans:
            if lo <= pos < hi:
                pos = hi
        if pos < r.end:
            bad.append(r)
    return bad


def unregistered_ranges(pid: int, regions: list[Region]) -> list[Region]:
    """Regions not fully covered by VMAs registered for missing faults (smaps 'um')."""
    try:
        vmas = read_registered_vmas(pid)
    except OSError:
        return []  # not readable here: the engine will find out on the first install
    return uncovered(regions, vmas)
