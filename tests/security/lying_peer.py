"""A peer speaking pagewire's proto whose OpenChannel refusal carries a forged log line
(newline, terminal escapes) in its error details.

usage: python -m tests.security.lying_peer STATE_DIR IMAGE EXPORT_NAME ADDRESS
Prints the port it listens on, then serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
from pagewire.exports.registry import ExportRegistry
from pagewire.peer.server import PageServicer, serve_peers

DETAILS = "no\n00:00:00 error   pagewire.agent: FORGED by a peer \x1b[2J\x1b[31m\r\x07"


class Lying(PageServicer):
    async def OpenChannel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, DETAILS)


async def main() -> None:
    state, image, name, address = sys.argv[1:5]
    registry = ExportRegistry(Path(state), [Path(image).parent])
    registry.publish(name, image)
    peer = await serve_peers(registry, address, insecure_peers=True, servicer=Lying(registry))
    print(peer.port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
