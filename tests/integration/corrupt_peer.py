"""A test peer speaking pagewire's proto that corrupts the first chunks it sends.

usage: corrupt_peer.py STATE_DIR IMAGE EXPORT_NAME ADDRESS BAD_CHUNKS
Prints the port it listens on, then serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagewire.exports.export import Export
from pagewire.exports.registry import ExportRegistry
from pagewire.peer.server import PageServicer, serve_peers


class Corrupting(PageServicer):
    def __init__(self, registry: ExportRegistry, bad: int) -> None:
        super().__init__(registry)
        self.bad = bad

    def _read(self, export: Export, indexes: list[int], read: Callable[[int], bytes]) -> list[Any]:
        chunks = super()._read(export, indexes, read)
        for chunk in chunks:
            if chunk.data and self.bad > 0:
                self.bad -= 1
                chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
        return chunks


async def main() -> None:
    state, image, name, address, bad = sys.argv[1:6]
    registry = ExportRegistry(Path(state), [Path(image).parent])
    registry.publish(name, image)
    peer = await serve_peers(
        registry, address, insecure_peers=True, servicer=Corrupting(registry, int(bad))
    )
    print(peer.port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
