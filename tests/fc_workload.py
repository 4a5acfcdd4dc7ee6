"""A workload that sets up its memory exactly as Firecracker does, as its own process.

Firecracker maps guest memory anonymous and private in (here) two regions, creates a uffd
asking only for UFFD_FEATURE_EVENT_REMOVE (it has a balloon), registers every region in
MISSING mode, and sends one message: the JSON array of mappings with both page-size keys
(each in bytes) and the uffd as SCM_RIGHTS. It never closes the socket, never reads a
reply, and keeps its own copy of the uffd open for the life of the VM. It never
negotiates UFFD_FEATURE_POISON, which is why the agent must probe for the ioctl.

Takes the flags of pagewire.tools.workload that the fault suite uses, so the two kinds are
interchangeable in a test. Reports by exit status: 0 when every byte matched the image
(removed ranges zero), 2 on any mismatch (zeros where data belongs included), and death
by SIGBUS shows as -7 to the parent. Prints one JSON line with what it saw.

usage: python tests/fc_workload.py --socket S --size N [--verify IMAGE] [--order ...]
       [--threads N] [--remove off:len,...] [--ready-file F --go-file G] [--exit-after N]
       [--page-size 2097152]   (guest memory in huge pages, as "huge_pages": "2M" does)
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import socket
import sys
import time

from pagewire import _uffd
from pagewire.core.layout import SYSTEM_PAGE_SIZE, Region
from pagewire.tools.workload import parse_pairs, touch, touch_order, verify, wait_for_go

MADV_DONTNEED = 4
EXIT_MISMATCH = 2
EXIT_EARLY = 3
FEATURES = {
    "firecracker": _uffd.FEATURE_EVENT_REMOVE,
    "client": _uffd.FEATURE_EVENT_REMOVE
    | (_uffd.FEATURE_POISON if _uffd.API_FEATURES_SUPPORTED & _uffd.FEATURE_POISON else 0),
}


def firecracker_handoff(
    sock_path: str, size: int, page_size: int = SYSTEM_PAGE_SIZE
) -> tuple[list[Region], int, socket.socket]:
    """Two regions (the second at image offset size/2), EVENT_REMOVE only, both keys."""
    half = size // 2 - (size // 2) % page_size
    layout = [(half, 0), (size - half, half)]
    huge = page_size != SYSTEM_PAGE_SIZE
    regions = [Region(_uffd.mmap_anon(n, hugetlb=huge), n, off, page_size) for n, off in layout]
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    mappings = []
    for r in regions:
        _uffd.uffd_register(uffd, r.base, r.size)
        mappings.append(
            {
                "base_host_virt_addr": r.base,
                "size": r.size,
                "offset": r.offset,
                "page_size": page_size,
                "page_size_kib": page_size,  # Firecracker's name; the value is bytes
            }
        )
    body = json.dumps(mappings, separators=(",", ":")).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
    return regions, uffd, sock  # both stay open for the life of the "VM"


DEFECTS = [
    "beyond_image",
    "overlapping_regions",
    "too_many_regions",
    "not_registered",
    "extra_fds",
    "too_large",
    "handoff_timeout",
    "deep_nesting",
    "huge_number",
]

# the code the agent names for each defect
FC_DEFECT_CODES = {d: d for d in DEFECTS} | {
    "deep_nesting": "invalid_json",
    "huge_number": "invalid_json",
}


def bad_handoff(sock_path: str, size: int, defect: str, features: int) -> list[Region]:
    """Register two regions as Firecracker does, then send a handoff with this defect.
    Returns the registered regions; socket and uffd stay open (leaked on purpose)."""
    half = size // 2
    regions = [Region(_uffd.mmap_anon(half), half, off, SYSTEM_PAGE_SIZE) for off in (0, half)]
    uffd = _uffd.uffd_create(features)
    for r in regions if defect != "not_registered" else regions[:1]:
        _uffd.uffd_register(uffd, r.base, r.size)
    items = [r.to_json() for r in regions]
    fds = [uffd]
    tail = b""
    if defect == "beyond_image":
        items[1]["offset"] = 1 << 40
    elif defect == "overlapping_regions":
        items[1]["base_host_virt_addr"] = items[0]["base_host_virt_addr"]
    elif defect == "too_many_regions":
        items = [dict(items[0], size=SYSTEM_PAGE_SIZE) for _ in range(5000)]
    elif defect == "extra_fds":
        fds = [os.open("/dev/null", os.O_RDONLY), uffd]
    body = json.dumps(items).encode()
    if defect == "too_large":
        body, tail = b"[" + b" " * 65536, b" " * (2 << 20)
    elif defect == "handoff_timeout":
        body = body[: len(body) // 2]  # then silence, socket held open
    elif defect == "deep_nesting":
        body = b"[" * 200000
    elif defect == "huge_number":
        body = body.replace(f'"size": {half}'.encode(), b'"size": ' + b"9" * 5000, 1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if tail:
        with contextlib.suppress(OSError):
            sock.sendall(tail)
    KEEP.append(sock)
    return regions


KEEP: list[socket.socket] = []


def read_verdict(sock: socket.socket) -> str:
    sock.settimeout(20)
    with contextlib.suppress(OSError):
        return sock.recv(4096).decode(errors="replace").strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fc_workload")
    p.add_argument("--socket", required=True)
    p.add_argument("--size", type=lambda s: int(s, 0), required=True)
    p.add_argument("--order", choices=["random", "sequential", "none"], default="random")
    p.add_argument("--threads", type=int, default=2, help="vCPU threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--remove", default="", help="offset:length,... balloon madvise mid-run")
    p.add_argument("--verify", help="image path to compare against")
    p.add_argument("--exit-after", type=int, default=-1, help="exit after touching N pages")
    p.add_argument("--ready-file")
    p.add_argument("--go-file")
    p.add_argument("--page-size", type=int, default=SYSTEM_PAGE_SIZE, help="2097152: huge")
    p.add_argument("--defect", choices=DEFECTS, help="send this bad handoff, then touch")
    p.add_argument(
        "--features",
        choices=["firecracker", "client"],
        default="firecracker",
        help="the uffd features of a --defect handoff (client: what pagewire.client asks)",
    )
    a = p.parse_args(argv)
    if a.defect:
        features = FEATURES[a.features]
        regions = bad_handoff(a.socket, a.size, a.defect, features)
        if a.features == "client":  # pagewire.client reads the verdict; Firecracker does not
            print(json.dumps({"verdict": read_verdict(KEEP[0])}), flush=True)
        for r in regions:  # fail closed means SIGBUS here, never zeros and never a hang
            if a.defect == "not_registered" and r is not regions[0]:
                continue  # not registered: the workload's own plain memory
            data = _uffd.read_memory(r.base, 8)
            print(json.dumps({"read": data.hex(), "offset": r.offset}), flush=True)
        return EXIT_MISMATCH
    order = touch_order(a.size // a.page_size, a.order, a.seed)  # ready before the handoff
    regions, _uffd_fd, _sock = firecracker_handoff(a.socket, a.size, a.page_size)
    # one page index space over both regions, in image order
    starts = [0]
    for r in regions:
        starts.append(starts[-1] + r.size // a.page_size)
    if starts[-1] != a.size // a.page_size:
        order = touch_order(starts[-1], a.order, a.seed)
    removed = parse_pairs(a.remove)

    def touch_pages(indexes: list[int]) -> list[int]:
        lat: list[int] = []
        for i, r in enumerate(regions):
            mine = [k - starts[i] for k in indexes if starts[i] <= k < starts[i + 1]]
            lat += touch(r.base, a.page_size, mine, a.threads, False)
        return lat

    t0 = time.monotonic()
    if a.exit_after >= 0:
        touch_pages(order[: a.exit_after])
        os._exit(EXIT_EARLY)
    half = len(order) // 2
    lat = touch_pages(order[:half])
    for offset, length in removed:  # the balloon inflates while the guest runs
        _uffd.madvise(regions[0].base + offset, length, MADV_DONTNEED)
    wait_for_go(a.ready_file, a.go_file)
    lat += touch_pages(order[half:])
    report: dict[str, object] = {
        "pid": os.getpid(),
        "kind": "firecracker",
        "pages": starts[-1],
        "touched": len(lat),
        "touch_s": round(time.monotonic() - t0, 6),
    }
    ok = True
    if a.verify:
        ok, detail = verify(regions, a.verify, removed)
        report["verified"], report["detail"] = ok, detail
    print(json.dumps(report), flush=True)
    return 0 if ok else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
