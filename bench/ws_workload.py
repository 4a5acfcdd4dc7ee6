"""The workload of bench/working_set.py, a process of its own (it imports the installed
pagewire, with its native module): attach, touch the working set (the pages of randomly
chosen chunks, in a random order, 2 threads), wait for the go file, verify, print JSON.

usage: python bench/ws_workload.py SOCKET SIZE SEED CHUNKS IMAGE GO_FILE
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time

from pagewire import _uffd
from pagewire.client import attach

CHUNK = 64 << 10
PAGE = 4096


def workload_role(socket_path: str, size: int, seed: int, chunks: int, image: str, go: str) -> None:
    """Attach, touch the working set, wait for the go file, verify, print JSON."""
    att = attach(socket_path, size)
    base = att.regions[0].base
    rng = random.Random(seed)
    picked = rng.sample(range(size // CHUNK), chunks)
    pages = [c * (CHUNK // PAGE) + i for c in picked for i in range(CHUNK // PAGE)]
    rng.shuffle(pages)
    t0 = time.monotonic()
    first_ns = _uffd.touch_pages(base, PAGE, pages[:1])[0]
    halves = [pages[0::2], pages[1::2]]
    workers = [
        threading.Thread(target=_uffd.touch_pages, args=(base, PAGE, half)) for half in halves
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    touch_s = time.monotonic() - t0
    while not os.path.exists(go):
        time.sleep(0.01)
    fd = os.open(image, os.O_RDONLY)
    diff = _uffd.memory_equals_file(base, size, fd, 0)
    os.close(fd)
    report = {"touch_s": round(touch_s, 6), "first_touch_us": round(first_ns / 1000, 1)}
    print(json.dumps({**report, "pages": len(pages), "verified": diff < 0}))
    att.close()


if __name__ == "__main__":
    sock, size, seed, chunks, image, go = sys.argv[1:7]
    workload_role(sock, int(size), int(seed), int(chunks), image, go)
