"""Move a process's heap to a new process on another agent, post-copy.

A linked structure with real pointers lives in memory mapped at a fixed address. The
`source` process builds it and waits; its agent exports the process's memory; the
`dest` process maps the same addresses through pagewire.client, attached to a session
on another agent, and walks the structure: every pointer still leads where it should.

    python examples/heap_move.py source ADDR NODES          # prints its pid, then waits
    # on the source host:       POST /v1/exports {"name": "heap", "pid": PID,
    #                                             "ranges": [{"start": ADDR, "size": N}]}
    # on the destination host:  POST /v1/sessions {"source": {"peer": ..., "export": "heap"}}
    python examples/heap_move.py dest SOCKET ADDR SIZE NODES  # prints the walk's result
"""

from __future__ import annotations

import json
import struct
import sys
import time

from pagewire import _uffd
from pagewire.client import attach

NODE = struct.Struct("<QQQ")  # next pointer, value, checksum of the two
ARENA = 4 << 20


def build(addr: int, nodes: int) -> None:
    """Nodes scattered over the arena, linked in a shuffled order; the head at addr."""
    _uffd.mmap_anon(ARENA, addr=addr)
    slots = [addr + 64 + ((i * 7919) % (ARENA // 64 - 2)) * 64 for i in range(nodes)]
    for i, here in enumerate(slots):
        nxt = slots[i + 1] if i + 1 < nodes else 0
        value = i * i + 7
        _uffd.write_memory(here, NODE.pack(nxt, value, nxt ^ value))
    _uffd.write_memory(addr, struct.pack("<Q", slots[0]))


def walk(addr: int) -> dict[str, int]:
    node = struct.unpack("<Q", _uffd.read_memory(addr, 8))[0]
    count = total = 0
    while node:
        nxt, value, check = NODE.unpack(_uffd.read_memory(node, NODE.size))
        if check != nxt ^ value:
            raise SystemExit(f"node at 0x{node:x} is corrupt")
        count, total, node = count + 1, total + value, nxt
    return {"nodes": count, "sum": total}


def main() -> int:
    mode = sys.argv[1]
    if mode == "source":
        addr, nodes = int(sys.argv[2], 0), int(sys.argv[3])
        build(addr, nodes)
        print(
            json.dumps({"pid": __import__("os").getpid(), "size": ARENA, **walk(addr)}), flush=True
        )
        while True:
            time.sleep(3600)
    sock, addr, size, nodes = sys.argv[2], int(sys.argv[3], 0), int(sys.argv[4]), int(sys.argv[5])
    region = attach(sock, size, bases=[addr])
    result = walk(addr)
    expected = sum(i * i + 7 for i in range(nodes))
    print(
        json.dumps({**result, "expected_sum": expected, "ok": result["sum"] == expected}),
        flush=True,
    )
    region.close()
    return 0 if result["sum"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
