"""A session source on a peer agent: urgent stream for demand faults, bulk stream behind it.

Demand faults arrive from the engine as image offsets; each becomes a request for the
chunk that holds it (the prefetch window) on the session's urgent stream, which never
queues behind bulk data. The bulk stream brings every other chunk that still holds a
missing data page; zero pages never cross the network (the engine zero-fills them).
Chunks are verified against the published digests before they are installed. When the
peer is unreachable the session is paused and the agent reconnects with backoff, asking
again for what was in flight; after pause_timeout_s the on_source_lost policy applies.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
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
    from pagewire.sessions.manager import Session

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

# the active remote sources of this agent, by image: who could share chunks
SAME_IMAGE: dict[tuple[str, str, str], set[RemoteSource]] = {}

FailCallback = Callable[["Session", str, str], Awaitable[None]]


class RemoteSource:
    def __init__(
        self,
        client: PeerClient,
        remote: RemoteExport,
        address: str,
        *,
        background: bool,
        prefetch: str,
        on_source_lost: str,
        pause_timeout_s: float,
        fail: FailCallback,
        rpc_latency: Any = None,
        native: bool = False,
        compression: str = "none",
        cache: _uffd.ChunkCache | None = None,
    ) -> None:
        self.client = client
        self.remote = remote
        self.address = address
        self.size = remote.size
        self.zero_map = remote.zero_map
        self.zero_map_page_size = remote.page_size
        self.local_fd = -1
        self.background = background
        self.prefetch = prefetch
        self.on_source_lost = on_source_lost
        self.pause_timeout_s = pause_timeout_s
        self.fail = fail
        self.rpc_latency = rpc_latency
        self.native = native  # try the native data channel first
        # without libzstd here, ask for raw chunks (a compressed one could not be read)
        self.compression = "zstd" if compression == "zstd" and _uffd.zstd_available() else ""
        # the host's chunk cache, used once another session restores the same image: a
        # lone restore does not pay for copies nobody will read
        self.host_cache = cache
        self.cache: _uffd.ChunkCache | None = None
        self.on_channel = False
        self.grant: tuple[int, bytes] | None = None
        # what one install covers: a chunk, or a whole huge page gathered from its chunks
        self.unit_chunks = 1
        self.assembling: dict[int, dict[int, bytes]] = {}
        self.session: Session | None = None
        # the session's engine, kept until stop() so its working-set record can be read
        self.recorder: _uffd.Engine | None = None
        # a recorded working set fetched between session creation and attach, installed
        # before the engine serves its first fault (kept in the host's bounded cache)
        self.staging: asyncio.Task[None] | None = None
        self.staged: list[int] = []
        self.urgent_stream: UrgentStream | None = None
        self.inflight: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = False
        self.integrity_failures = 0
        self.integrity_run = 0  # consecutive digest failures; a good answer resets it
        # urgent chunks in flight, so one session stays within WINDOW_BYTES
        self.urgent_slots = asyncio.Semaphore(max(1, WINDOW_BYTES // 2 // remote.chunk_size))

    def describe(self) -> dict[str, str]:
        return {"peer": self.address, "export": self.remote.name}

    @property
    def transport(self) -> str:
        """Where page data flows now: the engine's native channel, or gRPC."""
        return "native" if self.on_channel else "grpc"

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    def bytes_received(self) -> int:
        return self.client.bytes_received

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect(self) -> None:
        """At session creation: join the image's sessions, and ask the peer for a native
        data channel before any workload attaches."""
        self._join_image()
        if self._replay() and self.host_cache is not None:
            self.staging = asyncio.ensure_future(self._stage_working_set())
        if not self.native:
            return
        try:
            self.grant = await self.client.open_channel(self.remote.name)
        except PeerError as exc:
            log.info("native channel not offered: %s", exc, extra=self._log_extra())

    def attach(self, session: Session) -> None:
        """Demand faults and bulk go over the engine's own TCP channel when the peer
        offers one (connected before the engine starts, so no fault goes the slow way);
        gRPC stays the fallback. Huge pages larger than a chunk are gathered in Python."""
        # before the engine starts: a fault it hands to Python before start() ran must
        # find its session, or its fetch would be dropped and the page never asked again
        self.session = session
        regions = session.handoff.regions if session.handoff else []
        page = max((r.page_size for r in regions), default=0)
        self.unit_chunks = max(1, page // self.remote.chunk_size)
        engine = session.engine
        if engine is not None:  # first-touched chunks, whichever transport brings them
            engine.record_working_set(self.remote.chunk_size, self.remote.size)
            self.recorder = engine
            self._install_staged(engine)
        if self.grant is None or self.unit_chunks > 1 or engine is None:
            return
        cache = self.cache
        port, token = self.grant
        host = self.address.rsplit(":", 1)[0].strip("[]")
        r = self.remote
        try:
            engine.attach_channel(
                host,
                port,
                token,
                r.chunk_size,
                r.size,
                r.page_size,
                r.zero_map,
                b"".join(r.digests),
                background=self.background,
                compression=self.compression == "zstd",
                fast_digests=b"".join(r.fast_digests) or None,
                # a staged working set is on its way already over gRPC
                working_set=None if self.staging else self._replay().tobytes() or None,
            )
        except (OSError, ValueError) as exc:
            log.info("native channel not used: %s", exc, extra=self._log_extra())
            return
        self.on_channel = True
        if cache is not None:
            engine.share_cache(cache)
        log.info("native data channel open", extra={**self._log_extra(), "port": port})

    @property
    def image_key(self) -> tuple[str, str, str]:
        return (self.address, self.remote.name, self.remote.generation)

    def share_cache(self) -> None:
        if self.host_cache is None or self.cache is not None:
            return
        self.cache = self.host_cache
        engine = self._engine()
        if engine is not None and self.on_channel:
            engine.share_cache(self.cache)

    def _join_image(self) -> None:
        """Sessions of one image created on this agent while others are alive share chunks
        through the host's cache; a lone restore does not pay for copies nobody reads."""
        peers = SAME_IMAGE.setdefault(self.image_key, set())
        peers.add(self)
        if len(peers) > 1:
            for source in peers:
                source.share_cache()

    async def _stage_working_set(self) -> None:
        """Fetch the recorded working set into the host's cache before the workload
        attaches (it fills what the cache may hold; the rest comes after attach)."""
        cache, r = self.host_cache, self.remote
        assert cache is not None
        chunks = [c for c in self._replay() if not r.chunk_is_zero(c)]
        stream = self._urgent()

        async def part(indexes: list[int]) -> None:
            got = await stream.fetch(indexes)
            engine = self.recorder  # attached meanwhile: straight in
            for index in indexes:
                if engine is not None and engine.state == "running":
                    engine.install(index * r.chunk_size, got[index], _uffd.PREFETCH)
                else:  # kept as each part lands: attach may come any time
                    cache.put(r.digests[index], got[index])
                    self.staged.append(index)

        try:
            await asyncio.gather(*(part(chunks[i : i + 16]) for i in range(0, len(chunks), 16)))
        except PeerError as exc:
            log.info("working set not staged: %s", exc, extra=self._log_extra())

    def _install_staged(self, engine: _uffd.Engine) -> None:
        """Before the engine starts: install the staged working set in one burst (what is
        still on its way is installed as it lands)."""
        cache, r = self.host_cache, self.remote
        staged, self.staged = self.staged, []
        if cache is None:
            return
        for index in staged:
            data = cache.get(r.digests[index], r.chunk_len(index))
            if data is not None:
                engine.install(index * r.chunk_size, data, _uffd.PREFETCH)

    def _replay(self) -> array.array[int]:
        """The recorded working set to install first (prefetch "working_set")."""
        if self.prefetch != "working_set":
            return array.array("Q")
        return array.array("Q", (c for c in self.remote.working_set if c < self.remote.chunks))

    async def start(self, session: Session) -> None:
        self.session = session
        replay = self._replay()
        if replay and not self.on_channel:  # the native channel asks for it itself
            self._spawn(self._fetch(list(replay), _uffd.PREFETCH))
        if self.background and not self.on_channel:
            self._spawn(self._bulk())

    def _channel_lost(self) -> None:
        """The engine dropped its channel and handed its pages back: gRPC takes over."""
        self.on_channel = False
        engine = self._engine()
        reason = (engine.channel or {}).get("down_reason") if engine else ""
        log.warning(
            "native channel lost (%s); continuing over gRPC", reason, extra=self._log_extra()
        )
        if self.background:
            self._spawn(self._bulk())

    def on_requests(self, session: Session, offsets: list[int]) -> None:
        if self.on_channel:
            self._channel_lost()
        chunks = sorted(
            {c for off in offsets for c in self._unit(off // self.remote.chunk_size)}
            - self.inflight
        )
        if chunks:
            self.inflight.update(chunks)
            self._spawn(self._fetch(chunks, _uffd.PREFETCH))  # asked-for pages count as faults

    # ---- installing -----------------------------------------------------

    def _engine(self) -> _uffd.Engine | None:
        return self.session.engine if self.session is not None else None

    def _unit(self, index: int) -> range:
        first = index - index % self.unit_chunks
        return range(first, min(first + self.unit_chunks, self.remote.chunks))

    def _install(self, index: int, chunk: bytes, kind: int) -> bool:
        """Install a verified chunk, or hold it until its huge page is whole."""
        engine = self._engine()
        if engine is None or engine.state != "running":
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
        if session.state == "running":
            session.state = "paused"
            session.paused_since = time.monotonic()
            log.warning("source unreachable, session paused: %s", exc, extra=self._log_extra())
        since = session.paused_since or time.monotonic()
        if self.on_source_lost == "sigbus" and time.monotonic() - since >= self.pause_timeout_s:
            await self.fail(session, "source_lost", f"the source {self.address} was lost: {exc}")
            return True
        return False

    def _resumed(self) -> None:
        self.integrity_run = 0
        session = self.session
        if session is not None and session.state == "paused":
            session.state = "running"
            session.paused_since = None
            log.info("source reachable again, session resumed", extra=self._log_extra())

    async def _upload_working_set(self) -> None:
        """A completed session leaves its first-touch record with the export, for the next
        session with prefetch "working_set"."""
        recorder, self.recorder = self.recorder, None
        session = self.session
        if recorder is None or session is None or session.state != "completed":
            return
        # what was replayed stays (faults there were few because it was replayed)
        chunks = list(dict.fromkeys([*self._replay(), *recorder.working_set()]))
        if not chunks:
            return
        try:
            await self.client.upload_working_set(self.remote.name, chunks)
        except PeerError as exc:
            log.info("working set not uploaded: %s", exc, extra=self._log_extra())

    async def stop(self) -> None:
        if self.staging is not None:
            self.staging.cancel()
        await self._upload_working_set()
        self.stopped = True
        peers = SAME_IMAGE.get(self.image_key, set())
        peers.discard(self)
        if not peers:
            SAME_IMAGE.pop(self.image_key, None)
        if self.cache is not None:
            self.cache.release(id(self))
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.urgent_stream is not None:
            await self.urgent_stream.close()
        await self.client.close()
