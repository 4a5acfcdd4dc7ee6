"""A recorded working set fetched between session creation and attach.

The engine needs the workload's uffd, so it exists only from attach on; until then the
chunks of the recorded set are fetched and kept here, verified, and installed in one burst
before the engine serves its first fault. They come over the native channel's stage
connection when the peer granted a channel (one stream at the channel's rate), else over
gRPC in parts. A part still on its way at attach is installed as it lands; the engine's
channel asks only for the rest. At most the host cache's size is staged per session.
"""

from __future__ import annotations

import array
import asyncio
import logging
import threading
from typing import TYPE_CHECKING

from pagewire import _uffd
from pagewire.peer.errors import PeerError

if TYPE_CHECKING:
    from pagewire.peer.client import UrgentStream
    from pagewire.peer.remote_export import RemoteExport

log = logging.getLogger("pagewire.sessions.staging")

# gRPC parts (16 chunks each) on their way at once
GRPC_PARTS = 4
GRPC_PART_CHUNKS = 16


class WorkingSetStage:
    def __init__(
        self, remote: RemoteExport, chunks: list[int], budget: int, log_extra: dict[str, str]
    ) -> None:
        self.remote = remote
        chunks = [c for c in chunks if not remote.chunk_is_zero(c)]
        self.chunks = chunks[: budget // remote.chunk_size]
        self.log_extra = log_extra
        self.lock = threading.Lock()  # a landing part against attach taking what is kept
        self.kept: dict[int, bytes | memoryview] = {}
        self.on_the_way: set[int] = set()
        self.engine: _uffd.Engine | None = None
        self.over = False  # the engine's channel brings the rest: start no further part

    async def over_native(self, host: str, port: int, token: bytes, tls: tuple[str, ...]) -> None:
        r = self.remote
        cert, key, ca = tls or (None, None, None)
        self.on_the_way.update(self.chunks)
        try:
            got, data, error = await asyncio.to_thread(
                _uffd.stage_chunks, host, port, token, r.chunk_size, r.size, r.page_size,
                r.zero_map, b"".join(r.digests), array.array("Q", self.chunks).tobytes(),
                fast_digests=b"".join(r.fast_digests) or None,
                tls_cert=cert, tls_key=key, tls_ca=ca,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            error, got, data = str(exc), b"", b""
        indexes, view, size = array.array("Q", got), memoryview(data), r.chunk_size
        landed = {c: view[n * size : n * size + r.chunk_len(c)] for n, c in enumerate(indexes)}
        await asyncio.to_thread(self.keep, landed)
        self.on_the_way.clear()
        if error:
            log.info("working set staged in part (%d of %d): %s", len(indexes),
                     len(self.chunks), error, extra=self.log_extra)  # fmt: skip

    async def over_grpc(self, stream: UrgentStream) -> None:
        in_flight = asyncio.Semaphore(GRPC_PARTS)

        async def part(indexes: list[int]) -> None:
            async with in_flight:
                if self.over:
                    return
                self.on_the_way.update(indexes)
                try:
                    self.keep(await stream.fetch(indexes))
                finally:
                    self.on_the_way.difference_update(indexes)

        step = GRPC_PART_CHUNKS
        try:
            await asyncio.gather(
                *(part(self.chunks[i : i + step]) for i in range(0, len(self.chunks), step))
            )
        except PeerError as exc:
            log.info("working set not staged: %s", exc, extra=self.log_extra)

    def keep(self, got: dict[int, bytes] | dict[int, memoryview]) -> None:
        """Install what landed once the engine exists, else keep it for attach."""
        with self.lock:
            engine = self.engine
            if engine is None:
                self.kept.update(got)
            elif engine.state in ("created", "running"):
                for index, data in got.items():
                    engine.install(index * self.remote.chunk_size, data, _uffd.PREFETCH)

    def attach(self, engine: _uffd.Engine) -> None:
        """Before the engine starts: install what is kept in one burst; what is on its way
        goes in as it lands."""
        with self.lock:
            self.engine = engine
            kept, self.kept = self.kept, {}
            for index, data in kept.items():
                engine.install(index * self.remote.chunk_size, data, _uffd.PREFETCH)
