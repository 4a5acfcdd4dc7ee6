"""A workload that keeps writing while it is snapshotted.

Each write stamps a page with (page, seq), seq rising by one per write; the log of pages
written, in order, goes to LOG at the end. usage: snapshot_writer.py SOCKET PAGES LOG GO
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time

from pagewire import _uffd
from pagewire.client import attach_for_snapshot

STAMP = struct.Struct("<QQ")
PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    sock, pages, log_path, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    base = _uffd.mmap_anon(pages * PAGE)
    for p in range(pages - pages // 8):  # the last eighth is never touched before
        _uffd.write_memory(base + p * PAGE, STAMP.pack(p, 0))
    att = attach_for_snapshot(sock, base, pages * PAGE)
    rng = random.Random(3)
    log: list[int] = []
    started = time.monotonic()
    while not os.path.exists(go) or len(log) < 2000:
        p = rng.randrange(pages)
        log.append(p)
        _uffd.write_memory(base + p * PAGE, STAMP.pack(p, len(log)))
        if time.monotonic() - started > 60:
            break
    expected: dict[int, int] = {}
    for seq, p in enumerate(log, 1):
        expected[p] = seq
    wrong = 0
    for p in range(pages):
        page, seq = STAMP.unpack(_uffd.read_memory(base + p * PAGE, STAMP.size))
        want = (p, expected[p]) if p in expected else ((p, 0) if p < pages - pages // 8 else (0, 0))
        wrong += (page, seq) != want
    with open(log_path, "w") as f:
        json.dump(log, f)
    print(json.dumps({"writes": len(log), "final_memory_wrong_pages": wrong}), flush=True)
    att.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
