"""Replay of Firecracker's UFFD handshake and behaviour, as a separate workload process.

Firecracker maps guest memory anonymous and private, creates a non-blocking uffd with
EVENT_REMOVE (it has a balloon), registers every region in MISSING mode, and sends one
message: the serde_json array of GuestRegionUffdMapping (both page-size keys, each in
bytes) with the uffd as SCM_RIGHTS. It never closes the socket and expects no reply.
vCPU threads then fault pages in while the balloon madvises ranges away.

usage: fc_replay.py SOCKET IMAGE SIZE REMOVE_RANGES(offset:len,...) BALLOONED_MARKER
The marker file is created once the balloon's madvise calls have returned.
"""

from __future__ import annotations

import array
import json
import os
import random
import socket
import sys
import threading
import time

from pagewire import _uffd

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_DONTNEED = 4


def registered(addr: int) -> bool:
    """Whether the mapping holding addr is registered with a uffd in missing mode (the
    two regions may have been merged into one mapping)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= addr < end
            elif line.startswith("VmFlags:") and inside:
                return " um" in line
    return False


def handshake(sock_path: str, size: int) -> tuple[socket.socket, list[int]]:
    """Firecracker's side: two anonymous regions registered MISSING on a uffd with only
    EVENT_REMOVE, their layout and the uffd sent in one message. Returns the socket
    (kept open, as Firecracker does) and the regions' base addresses."""
    half = size // 2
    # two guest memory regions, the second starting at image offset `half`
    bases = [_uffd.mmap_anon(half), _uffd.mmap_anon(size - half)]
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    mappings = []
    for base, length, offset in ((bases[0], half, 0), (bases[1], size - half, half)):
        _uffd.uffd_register(uffd, base, length)
        mappings.append(
            {
                "base_host_virt_addr": base,
                "size": length,
                "offset": offset,
                "page_size": PAGE,
                "page_size_kib": PAGE,
            }
        )
    body = json.dumps(mappings, separators=(",", ":")).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
    return sock, bases


def main() -> int:
    sock_path, image, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    removes = [tuple(int(x, 0) for x in r.split(":")) for r in sys.argv[4].split(",") if r]
    half = size // 2
    sock, bases = handshake(sock_path, size)  # the socket stays open for the life of the "VM"

    pages = list(range(half // PAGE))
    random.Random(7).shuffle(pages)
    vcpus = [
        threading.Thread(target=_uffd.touch_pages, args=(bases[0], PAGE, pages[i::2]))
        for i in range(2)
    ]
    for t in vcpus:
        t.start()
    for offset, length in removes:  # the balloon inflates while vCPUs fault
        _uffd.madvise(bases[0] + offset, length, MADV_DONTNEED)
    open(sys.argv[5], "w").close()
    for t in vcpus:
        t.join()

    fd = os.open(image, os.O_RDONLY)
    wrong = []
    pos = 0
    for offset, length in sorted(removes) + [(half, 0)]:
        if offset > pos and _uffd.memory_equals_file(bases[0] + pos, offset - pos, fd, pos) >= 0:
            wrong.append(pos)
        if length and _uffd.read_memory(bases[0] + offset, length).count(0) != length:
            wrong.append(offset)
        pos = max(pos, offset + length)
    if _uffd.memory_equals_file(bases[1], size - half, fd, half) >= 0:
        wrong.append(half)
    deadline = time.monotonic() + 30
    while (registered(bases[0]) or registered(bases[1])) and time.monotonic() < deadline:
        time.sleep(0.01)
    completed = not registered(bases[0]) and not registered(bases[1])
    t0 = time.monotonic()
    _uffd.madvise(bases[0], 64 * PAGE, MADV_DONTNEED)
    madvise_s = time.monotonic() - t0
    print(json.dumps({"wrong": wrong, "unregistered": completed, "madvise_after_s": madvise_s}))
    sys.stdout.flush()
    time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
