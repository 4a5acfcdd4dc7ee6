"""A recorded working set fetched between session creation and attach.

The engine needs the workload's uffd, so it exists only from attach on; until then the
chunks of the recorded set are fetched and kept here, verified, and installed in one burst
before the engine serves its first fault. They come over the native channel's stage
connection when the peer granted a channel (one request at the channel's rate), else over
gRPC in parts (none started after attach). What is still on its way at attach is installed
as it lands; the engine's
channel asks only for the rest, and what a failed stage never brought is handed back to be
fetched over gRPC. Everything here runs on the event loop but the native fetch itself.

Memory: what all sessions of this agent hold staged is bounded together by the host
cache's size (`--cache-bytes`), and a stage asks for at most 4096 chunks (one request).
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagewire import _uffd
from pagewire.peer.errors import PeerError

if TYPE_CHECKING:
    from pagewire.peer.client import UrgentStream
    from pagewire.peer.remote_export import RemoteExport

log = logging.getLogger("pagewire.sessions.staging")

MAX_CHUNKS = 4096  # the native channel's largest request
GRPC_PARTS = 4  # gRPC parts (16 chunks each) on their way at once
GRPC_PART_CHUNKS = 16
# native fetches block a thread each (a slow peer for up to the engine's deadline): their
# own threads, so they never hold up the default executor's file work
FETCHERS = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pagewire-stage")

Install = Callable[[int, "bytes | memoryview"], object]


class Budget:
    """Bytes staged by all sessions of this agent (one event loop: no lock)."""

    used = 0

    @classmethod
    def take(cls, want: int, limit: int) -> int:
        granted = max(0, min(want, limit - cls.used))
        cls.used += granted
        return granted


class WorkingSetStage:
    def __init__(
        self, remote: RemoteExport, chunks: list[int], limit: int, log_extra: dict[str, str]
    ) -> None:
        self.remote = remote
        self.log_extra = log_extra
        wanted = [c for c in chunks if not remote.chunk_is_zero(c)][:MAX_CHUNKS]
        self.reserved = Budget.take(len(wanted) * remote.chunk_size, limit)
        self.chunks = wanted[: self.reserved // remote.chunk_size]
        self.kept: dict[int, bytes | memoryview] = {}
        self.on_the_way: set[int] = set()
        self.landed: set[int] = set()  # kept or installed
        self.install: Install | None = None  # set at attach
        self.owed: set[int] = set()  # on the way at attach: the engine does not ask for them
        self.fetching = True
        self.bytes_received = 0  # on the stage connection (gRPC's count in its client's)
        self.started = time.monotonic()
        self.closed = False

    async def over_native(
        self, host: str, port: int, token: bytes, tls: tuple[str, ...]
    ) -> list[int]:
        """Fetch the set on the stage connection; returns the chunks that did not come."""
        r = self.remote
        cert, key, ca = tls or (None, None, None)
        self.on_the_way.update(self.chunks)
        error, got, data = "", b"", b""
        loop = asyncio.get_running_loop()
        try:
            got, data, reason, self.bytes_received = await loop.run_in_executor(
                FETCHERS, lambda: _uffd.stage_chunks(
                    host, port, token, r.chunk_size, r.size, r.page_size, r.zero_map,
                    r.joined_digests, array.array("Q", self.chunks).tobytes(),
                    fast_digests=r.joined_fast_digests or None,
                    tls_cert=cert, tls_key=key, tls_ca=ca,
                ),
            )  # fmt: skip
            error = reason or ""
        except (OSError, ValueError, MemoryError) as exc:
            error = str(exc)
        finally:
            self.on_the_way.clear()
        view, size = memoryview(data), r.chunk_size
        indexes = array.array("Q", got)
        self.land({c: view[n * size : n * size + r.chunk_len(c)] for n, c in enumerate(indexes)})
        if error:
            log.info("working set staged in part (%d of %d): %s", len(indexes),
                     len(self.chunks), error, extra=self.log_extra)  # fmt: skip
        return self.fetched()

    async def over_grpc(self, stream: UrgentStream) -> list[int]:
        """Fetch the set in parts over gRPC; returns the chunks that did not come."""
        in_flight = asyncio.Semaphore(GRPC_PARTS)

        async def part(indexes: list[int]) -> None:
            async with in_flight:
                if self.closed or self.install is not None:  # attached: the engine asks
                    return
                self.on_the_way.update(indexes)
                try:
                    self.land(await stream.fetch(indexes))
                finally:
                    self.on_the_way.difference_update(indexes)

        step = GRPC_PART_CHUNKS
        try:
            await asyncio.gather(
                *(part(self.chunks[i : i + step]) for i in range(0, len(self.chunks), step))
            )
        except PeerError as exc:
            log.info("working set not staged: %s", exc, extra=self.log_extra)
        return self.fetched()

    def fetched(self) -> list[int]:
        """The fetch is over: the chunks attach left to it that did not come. Once attached
        too, what is kept is in and the budget goes back."""
        self.fetching = False
        log.info("working set staged: %d of %d chunks in %.0f ms", len(self.landed),
                 len(self.chunks), (time.monotonic() - self.started) * 1000,
                 extra=self.log_extra)  # fmt: skip
        missing = [c for c in self.owed if c not in self.landed]
        if self.install is not None:
            self.close()
        return missing

    def land(self, got: dict[int, bytes] | dict[int, memoryview]) -> None:
        """Install what landed once attached, else keep it for attach."""
        if self.closed:
            return
        self.landed.update(got)
        if self.install is None:
            self.kept.update(got)
            return
        for index, data in got.items():
            self.install(index, data)

    def attach(self, install: Install) -> None:
        """Before the engine starts: install what is kept in one burst; what is on its way
        goes in as it lands."""
        self.install = install
        self.owed = set(self.on_the_way)
        kept, self.kept = self.kept, {}
        for index, data in kept.items():
            install(index, data)
        if not self.fetching:
            self.close()

    def close(self) -> None:
        """The session ended (or its set is in): drop what is kept, free the budget."""
        self.closed = True
        self.kept = {}
        Budget.used -= self.reserved
        self.reserved = 0
