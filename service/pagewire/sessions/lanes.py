"""The gRPC data path of a remote source: an urgent lane for demand faults, a bulk lane
behind it, the host's chunk cache, installs (a huge page gathered from its chunks), and
retry with backoff that pauses the session while the peer is unreachable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pagewire import _uffd
from pagewire.exports.chunks import pack_bits, unpack_bits
from pagewire.peer.client import PeerClient, UrgentStream
from pagewire.peer.errors import PeerError, PeerIntegrityError
from pagewire.peer.remote_export import RemoteExport

if TYPE_CHECKING:
    from pagewire.sessions.session import Session

log = logging.getLogger("pagewire.sessions.remote")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.5  # a returning source is used within a second of being ready
# Consecutive chunks failing their digest from one source before it counts as lost (the
# session pauses and on_source_lost applies after pause_timeout_s): one bad chunk is a
# glitch fetched again, a run of them is a source serving wrong data.
INTEGRITY_FAILURES_LOST = 3
BULK_BATCH_BYTES = 1 << 20
URGENT_DEADLINE_S = 3.0  # a fault's chunk that takes longer means the peer is in trouble
BULK_IDLE_S = 5.0  # a bulk stream silent this long is dead (keepalive backs this up)
CLAIM_WINDOW = 128  # chunks one session claims at a time, so sessions spread over an image
# chunks one Bulk stream asks for: the want map is taken again after each, so chunks that
# faults brought meanwhile are not fetched twice (bytes received stay near the data pages)
BULK_WINDOW = 256
WINDOW_BYTES = 4 << 20  # what one session may have in flight (reserved at admission)

FailCallback = Callable[["Session", str, str], Awaitable[None]]


class ChunkLanes:
    """Fetches chunks over gRPC and installs them into the session's engine."""

    def __init__(
        self,
        client: PeerClient,
        remote: RemoteExport,
        address: str,
        *,
        background: bool,
        on_source_lost: str,
        pause_timeout_s: float,
        fail: FailCallback,
        rpc_latency: Any,
        compression: str,
    ) -> None:
        self.client = client
        self.remote = remote
        self.address = address
        self.background = background
        self.on_source_lost = on_source_lost
        self.pause_timeout_s = pause_timeout_s
        self.fail = fail
        self.rpc_latency = rpc_latency
        # without libzstd here, ask for raw chunks (a compressed one could not be read)
        self.compression = "zstd" if compression == "zstd" and _uffd.zstd_available() else ""
        self.cache: _uffd.ChunkCache | None = None
        # what one install covers: a chunk, or a whole huge page gathered from its chunks
        self.unit_chunks = 1
        self.assembling: dict[int, dict[int, bytes | memoryview]] = {}
        self.session: Session | None = None
        self.urgent_stream: UrgentStream | None = None
        self.inflight: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = False
        self.integrity_failures = 0
        self.integrity_run = 0  # consecutive digest failures; a good answer resets it
        # urgent chunks in flight, so one session stays within WINDOW_BYTES
        self.urgent_slots = asyncio.Semaphore(max(1, WINDOW_BYTES // 2 // remote.chunk_size))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- installing -----------------------------------------------------

    def _engine(self) -> _uffd.Engine | None:
        return self.session.engine if self.session is not None else None

    def _unit(self, index: int) -> range:
        first = index - index % self.unit_chunks
        return range(first, min(first + self.unit_chunks, self.remote.chunks))

    def _install(self, index: int, chunk: bytes | memoryview, kind: int) -> bool:
        """Install a verified chunk, or hold it until its huge page is whole."""
        engine = self._engine()  # created: a staged working set goes in before start
        if engine is None or engine.state not in ("created", "running"):
            return False
        if self.cache is not None:
            self.cache.put(self.remote.digests[index], chunk)
        if self.unit_chunks == 1:
            engine.install(index * self.remote.chunk_size, chunk, kind)
            return True
        unit = self._unit(index)
        parts = self.assembling.setdefault(unit.start, {})
        parts[index] = chunk
        for c in unit:  # chunks that are all zero never come: their bytes are known
            if c not in parts and self.remote.chunk_is_zero(c):
                parts[c] = bytes(self.remote.chunk_len(c))
        if len(parts) == len(unit):
            del self.assembling[unit.start]
            engine.install(
                unit.start * self.remote.chunk_size, b"".join(parts[c] for c in unit), kind
            )
        return True

    # ---- urgent lane ----------------------------------------------------

    def _urgent(self) -> UrgentStream:
        if self.urgent_stream is None or self.urgent_stream.closed:
            self.urgent_stream = self.client.urgent(self.remote, self.compression)
        return self.urgent_stream

    async def _fetch(self, chunks: list[int], kind: int) -> None:
        try:
            async with self.urgent_slots:
                await self._with_retry(lambda: self._fetch_once(chunks, kind))
        finally:
            self.inflight.difference_update(chunks)

    def _from_cache(self, chunks: list[int], kind: int) -> list[int]:
        """Install what the host's cache holds; returns the chunks still to fetch."""
        if self.cache is None:
            return chunks
        left = []
        for index in chunks:
            data = self.cache.get(self.remote.digests[index], self.remote.chunk_len(index))
            if data is None:
                left.append(index)
            else:
                self._install(index, data, kind)
        return left

    async def _fetch_once(self, chunks: list[int], kind: int) -> None:
        chunks = self._from_cache(chunks, kind)
        if not chunks:
            return
        started = time.monotonic()
        stream = self._urgent()
        try:
            got = await asyncio.wait_for(stream.fetch(chunks), URGENT_DEADLINE_S)
        except TimeoutError:
            await stream.close()  # the answers in flight are asked for again on a new stream
            raise PeerError(f"no answer from {self.address} in {URGENT_DEADLINE_S} s") from None
        if self.rpc_latency is not None:
            self.rpc_latency.observe(time.monotonic() - started)
        for index in chunks:
            if index in got:
                self._install(index, got[index], kind)

    # ---- bulk lane --------------------------------------------------------

    async def _bulk(self) -> None:
        await self._with_retry(self._bulk_once)

    async def _bulk_once(self) -> None:
        engine = self._engine()
        while engine is not None and engine.state == "running":
            want, deferred = self._want_from_cache(
                self._bulk_window(engine.wanted_chunks(self.remote.chunk_size, self.remote.size))
            )
            if not any(want):
                if not deferred:
                    return
                await asyncio.sleep(0.02)  # another session is bringing these
                engine = self._engine()
                continue
            chunks = self.client.bulk(self.remote, want, BULK_BATCH_BYTES, self.compression)
            try:
                while True:
                    try:
                        index, chunk = await asyncio.wait_for(anext(chunks), BULK_IDLE_S)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise PeerError(f"bulk stream from {self.address} went silent") from None
                    if not self._install(index, chunk, _uffd.BACKGROUND):
                        return
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            engine = self._engine()

    def _bulk_window(self, want: bytes) -> bytes:
        """The next BULK_WINDOW wanted chunks, less those an urgent fetch is bringing."""
        flags = bytearray(unpack_bits(want, self.remote.chunks))
        for index in self.inflight:
            flags[index] = 0
        kept, index = 0, flags.find(1)
        while index >= 0 and kept < BULK_WINDOW:
            kept += 1
            index = flags.find(1, index + 1)
        if index >= 0:
            flags[index:] = bytes(len(flags) - index)
        return pack_bits(bytes(flags))

    def _want_from_cache(self, want: bytes) -> tuple[bytes, int]:
        """The want bitmap less what the host's cache installs right away and what another
        session is fetching (claimed, it will land in the cache); with how many deferred."""
        if self.cache is None:
            return want, 0
        flags = unpack_bits(want, self.remote.chunks)  # one byte per chunk
        bits = bytearray(len(want))  # only what this pass claims
        deferred = claimed = 0
        index = flags.find(1)
        while index >= 0 and claimed < CLAIM_WINDOW:  # the rest waits for the next pass
            state, data = self.cache.claim(
                self.remote.digests[index], self.remote.chunk_len(index), id(self)
            )
            if state == _uffd.CACHE_ABSENT:  # ours to fetch
                bits[index // 8] |= 1 << (index % 8)
                claimed += 1
            elif data is not None:
                self._install(index, data, _uffd.BACKGROUND)
            else:
                deferred += 1
            index = flags.find(1, index + 1)
        return bytes(bits), deferred

    # ---- source loss ------------------------------------------------------

    async def _with_retry(self, attempt: Callable[[], Awaitable[None]]) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stopped and self._engine() is not None:
            try:
                await attempt()
                self._resumed()
                return
            except PeerIntegrityError as exc:
                self.integrity_failures += 1
                self.integrity_run += 1
                log.warning(
                    "peer sent a bad chunk (%d in a row); fetching again: %s",
                    self.integrity_run,
                    exc,
                    extra=self._log_extra(),
                )
                if exc.chunk is not None:
                    self._spawn(self._complain(exc.chunk))
                if self.integrity_run >= INTEGRITY_FAILURES_LOST and await self._paused(exc):
                    return
            except PeerError as exc:
                if await self._paused(exc):
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _complain(self, chunk: int) -> None:
        """Tell the source which chunk failed its digest: it re-reads and re-hashes it, and
        marks the export stale if its file no longer matches (then Describe says so)."""
        try:
            await self.client.describe(self.remote.name, timeout=5.0, suspects=[chunk])
        except PeerError as exc:
            log.warning("digest complaint answered: %s", exc, extra=self._log_extra())

    def _log_extra(self) -> dict[str, str]:
        return {"session": self.session.id if self.session else "", "peer": self.address}

    async def _paused(self, exc: PeerError) -> bool:
        """Mark the session paused; apply the policy once the pause lasts too long.
        Returns True when the session was ended."""
        session = self.session
        if session is None or not session.active:
            return True
        if session.pause():
            log.warning("source unreachable, session paused: %s", exc, extra=self._log_extra())
        since = session.paused_since or time.monotonic()
        if self.on_source_lost == "sigbus" and time.monotonic() - since >= self.pause_timeout_s:
            await self.fail(session, "source_lost", f"the source {self.address} was lost: {exc}")
            return True
        return False

    def _resumed(self) -> None:
        self.integrity_run = 0
        session = self.session
        if session is not None and session.resume():
            log.info("source reachable again, session resumed", extra=self._log_extra())
