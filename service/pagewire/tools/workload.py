"""A test and demo workload: attach a region through pagewire.client, touch it, verify it.

Run as a separate process: python -m pagewire.tools.workload --socket S --size N ...
Prints one JSON line with what it saw; exits 2 when --verify finds a wrong byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

from pagewire import _uffd
from pagewire.client import MADV_DONTNEED, HandoffRefused, attach
from pagewire.core.layout import SYSTEM_PAGE_SIZE

EXIT_MISMATCH = 2  # --verify found a byte that differs from the image
EXIT_REFUSED = 4  # the agent refused the handoff


def command(socket_path: str, size: int, *args: str) -> list[str]:
    """The command line that runs this workload as its own process."""
    return [
        sys.executable,
        "-m",
        "pagewire.tools.workload",
        "--socket",
        socket_path,
        "--size",
        str(size),
        *args,
    ]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in filter(None, text.split(",")):
        a, b = item.split(":")
        pairs.append((int(a, 0), int(b, 0)))
    return pairs


def touch_order(pages: int, order: str, seed: int) -> list[int]:
    if order == "none":
        return []
    indexes = list(range(pages))
    if order == "random":
        random.Random(seed).shuffle(indexes)
    return indexes


def touch(base: int, page_size: int, order: list[int], threads: int, write: bool) -> list[int]:
    shares = [order[i::threads] for i in range(threads)]
    results: list[list[int]] = [[] for _ in range(threads)]

    def run(i: int) -> None:
        results[i] = _uffd.touch_pages(base, page_size, shares[i], write=write)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [ns for r in results for ns in r]  # sorted once, after the timed touch


def verify(att_regions: list, image: str, removed: list[tuple[int, int]]) -> tuple[bool, str]:
    fd = os.open(image, os.O_RDONLY)
    try:
        for index, r in enumerate(att_regions):
            holes = sorted((o, n) for o, n in removed if 0 <= o < r.size) if index == 0 else []
            pos = 0
            for start, length in holes + [(r.size, 0)]:
                if start > pos:
                    diff = _uffd.memory_equals_file(r.base + pos, start - pos, fd, r.offset + pos)
                    if diff >= 0:
                        return False, f"region {index}: byte {pos + diff} differs from the image"
                if length:
                    data = _uffd.read_memory(r.base + start, length)
                    if data.count(0) != length:
                        return False, f"region {index}: removed range at {start} is not zero"
                pos = max(pos, start + length)
    finally:
        os.close(fd)
    return True, "byte-exact"


def wait_for_go(ready_file: str | None, go_file: str | None) -> None:
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(str(os.getpid()))
    while go_file and not os.path.exists(go_file):
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagewire-workload")
    p.add_argument("--socket", required=True)
    p.add_argument("--size", type=lambda s: int(s, 0))
    p.add_argument("--layout", help="size:offset,... (one region each)")
    p.add_argument(
        "--page-size",
        type=lambda s: int(s, 0),
        default=None,
        help="region page size (2097152 maps 2 MiB hugetlb pages)",
    )
    p.add_argument("--order", choices=["random", "sequential", "none"], default="random")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write each touched page")
    p.add_argument("--remove", default="", help="offset:length,... madvise(DONTNEED) mid-touch")
    p.add_argument("--verify", help="image path to compare against")
    p.add_argument("--exit-after", type=int, default=-1, help="exit after touching N pages")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to wait before verifying")
    p.add_argument("--madvise-after", action="store_true", help="madvise once more at the end")
    p.add_argument("--ready-file", help="create this file after touching the first half")
    p.add_argument("--go-file", help="wait for this file before touching the second half")
    a = p.parse_args(argv)
    layout = parse_pairs(a.layout) if a.layout else None
    # the order is ready before the handoff, as a VM's vCPUs are: the restore's clock
    # starts at the handoff, and a shuffle of a 1 GiB region's pages costs ~0.1 s of CPU
    expected = (a.size or 0) // (a.page_size or SYSTEM_PAGE_SIZE)
    order = touch_order(expected, a.order, a.seed)
    try:
        att = attach(
            a.socket, a.size, layout=layout, **({"page_size": a.page_size} if a.page_size else {})
        )
    except HandoffRefused as exc:
        print(json.dumps({"refused": exc.code, "message": exc.message}), flush=True)
        return EXIT_REFUSED
    base, page_size = att.regions[0].base, att.regions[0].page_size
    pages = att.regions[0].size // page_size
    if pages != expected:  # a layout: the first region is not the whole size
        order = touch_order(pages, a.order, a.seed)
    removed = parse_pairs(a.remove)
    t0 = time.monotonic()
    if a.exit_after >= 0:
        _uffd.touch_pages(base, page_size, order[: a.exit_after])
        time.sleep(0.3)  # let the agent finish taking the handoff, then vanish
        os._exit(3)
    first = _uffd.touch_pages(base, page_size, order[:1])
    half = len(order) // 2
    lat = first + touch(base, page_size, order[1:half], a.threads, a.write)
    for offset, length in removed:
        _uffd.madvise(base + offset, length, MADV_DONTNEED)
    wait_for_go(a.ready_file, a.go_file)
    lat += touch(base, page_size, order[half:], a.threads, a.write)
    touch_s = time.monotonic() - t0
    lat.sort()
    if a.hold:
        time.sleep(a.hold)
    report: dict[str, object] = {
        "pid": os.getpid(),
        "pages": pages,
        "touched": len(lat),
        "touch_s": round(touch_s, 6),
        "first_touch_us": round(first[0] / 1000, 2) if first else None,
        "p50_us": round(lat[len(lat) // 2] / 1000, 2) if lat else None,
        "p99_us": round(lat[int(len(lat) * 0.99)] / 1000, 2) if lat else None,
    }
    if a.verify:  # a write touch stores the byte it read, so the image still holds
        ok, detail = verify(att.regions, a.verify, removed)
        report["verified"], report["detail"] = ok, detail
    if a.madvise_after:
        t = time.monotonic()
        _uffd.madvise(base, page_size * 16, MADV_DONTNEED)
        report["madvise_after_s"] = round(time.monotonic() - t, 6)
    print(json.dumps(report), flush=True)
    att.close()
    return 0 if report.get("verified", True) else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
