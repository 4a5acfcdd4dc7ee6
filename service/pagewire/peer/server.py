"""The page service: serves this agent's exports to peer agents over gRPC (grpc.aio).

Disk reads run in worker threads so the event loop never blocks on the file system.
Each RPC fails alone: a bad request ends its own call with a status, never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hmac
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagewire import _uffd
from pagewire.agent.settings import is_loopback as host_is_loopback
from pagewire.exports.registry import (
    DIGEST_ALGORITHM,
    FAST_DIGEST_ALGORITHM,
    ChunkOutOfRange,
    Export,
    ExportInvalid,
    ExportNotFound,
    ExportRegistry,
    ExportStale,
    ExportVerifying,
    bitmap_len,
    unpack_bits,
)
from pagewire.peer.channel import ChannelBusy
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "pagewire.v1.PageService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CHUNKS_PER_REQUEST = 1024
# Bound on count * chunk_size of one urgent request, so its answer fits in one message.
MAX_URGENT_BYTES = 48 * 1024 * 1024
DEFAULT_BATCH_BYTES = 1024 * 1024
MAX_BATCH_BYTES = 8 * 1024 * 1024
# Urgent requests of one stream being read at once; the stream stops reading beyond it.
URGENT_WINDOW = 64

COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Peers ping every 2 s; the server's default minimum (5 min) would answer with GOAWAY.
# so_reuseport=0: a second agent on the same port fails to bind instead of sharing it
SERVER_OPTIONS: list[tuple[str, Any]] = COMMON_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


# --- digest complaints -------------------------------------------------------------

# A destination that got a chunk failing its digest names it in this metadata key on a
# Describe call; the source re-reads and re-hashes at most this many of them.
SUSPECT_METADATA = "pagewire-suspect-chunks"
MAX_SUSPECTS = 16


def suspect_chunks(metadata: Any) -> list[int]:
    for key, value in metadata or ():
        if key == SUSPECT_METADATA and isinstance(value, str):
            items = value.split(",")[:MAX_SUSPECTS]
            return [int(i) for i in items if i.strip().isdigit() and len(i.strip()) < 20]
    return []


def recheck_chunks(export: Any, chunks: list[int]) -> None:
    for index in chunks:
        if not 0 <= index < export.chunks or not export.recheck_chunk(index):
            return


# --- transport security ------------------------------------------------------------


def is_loopback(address: str) -> bool:
    """True if a host:port (or [v6]:port, or unix:path) address can only be reached locally."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    address = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("["):
        host = address[1 : address.find("]")]
    else:
        host = address.rpartition(":")[0] if ":" in address else address
    return host_is_loopback(host)


def tls_material(
    tls_cert: str | Path | None, tls_key: str | Path | None, tls_ca: str | Path | None
) -> tuple[bytes, bytes, bytes] | None:
    """(cert, key, ca) file contents, or None when TLS is not configured."""
    given = [p is not None for p in (tls_cert, tls_key, tls_ca)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("mTLS needs all of tls_cert, tls_key and tls_ca")
    assert tls_cert is not None and tls_key is not None and tls_ca is not None
    return Path(tls_cert).read_bytes(), Path(tls_key).read_bytes(), Path(tls_ca).read_bytes()


def require_secure_or_loopback(address: str, insecure_peers: bool) -> None:
    if not insecure_peers and not is_loopback(address):
        raise ValueError(
            f"plain-text gRPC on {address} is allowed only on loopback: "
            "give tls_cert, tls_key and tls_ca (mTLS), or insecure_peers=True"
        )


INLINE_READ_BYTES = 256 * 1024


# --- who may read, and how much they may make this agent hold -------------------------


@dataclass(frozen=True)
class PeerLimits:
    """What peers may do here; the defaults are the agent's (settings.py)."""

    stream_bytes: int = 16 << 20  # page bytes one stream may have read and not yet sent
    peer_bytes: int = 64 << 20  # ... all streams of one peer
    total_bytes: int = 256 << 20  # ... all peers
    peer_streams: int = 64  # Bulk and Urgent streams open per peer
    wait_s: float = 10.0  # how long a stream waits for the peer or agent budget
    working_set_interval_s: float = 10.0  # per export
    token: str | None = None  # plain-text peers send it as "authorization: Bearer <token>"
    anonymous_loopback: bool = False  # ... except loopback peers when this is set
    allow: tuple[str, ...] = ()  # mTLS: SAN patterns allowed to read; empty: any

    @classmethod
    def from_settings(cls, s: Any) -> PeerLimits:
        return cls(
            stream_bytes=s.serve_stream_bytes,
            peer_bytes=s.serve_peer_bytes,
            total_bytes=s.serve_bytes,
            peer_streams=s.serve_peer_streams,
            wait_s=s.serve_wait_s,
            working_set_interval_s=s.working_set_interval_s,
            token=s.token(),
            anonymous_loopback=s.peer_anonymous_loopback,
            allow=tuple(s.peer_allow),
        )


class ByteBudget:
    """Bytes taken and not yet given back, at most capacity; takers wait in order. A take
    larger than the capacity takes all of it (one oversized message still goes through)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, n: int) -> int | None:
        n = min(n, self.capacity)
        if self._waiters or self.used + n > self.capacity:
            return None
        self.used += n
        return n

    async def take(self, n: int) -> int:
        got = self.try_take(n)
        if got is not None:
            return got
        n = min(n, self.capacity)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(n)  # granted, but the taker was cancelled meanwhile
            self._wake()
            raise
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
            elif self.used + n <= self.capacity:
                self._waiters.popleft()
                self.used += n
                waiter.set_result(None)
            else:
                break


@dataclass
class _Peer:
    """One peer's open streams and page bytes in flight (forgotten when both are zero)."""

    budget: ByteBudget
    streams: int = 0


Lease = tuple[int, int, int]  # bytes taken from the stream's, the peer's and the agent's budget


@dataclass
class _Flow:
    """One stream's share of its own budget, its peer's and the agent's. A message holds
    its lease while it is read and written; once written, gRPC may still hold it (one
    message per stream, until the reader makes room), so its peer and agent share is
    kept until the next write of the stream completes."""

    stream: ByteBudget
    peer: ByteBudget
    agent: ByteBudget
    wait_s: float
    held: list[Lease] = field(default_factory=list)
    in_grpc: Lease = (0, 0, 0)

    def _shares(self, n: int) -> tuple[int, int]:
        """What a message of n bytes takes from the peer and agent budgets: never more
        than they can give beside this stream's message in gRPC (no self-deadlock)."""
        _, b, c = self.in_grpc
        return min(n, self.peer.capacity - b), min(n, self.agent.capacity - c)

    def try_take(self, n: int) -> Lease | None:
        nb, nc = self._shares(n)
        a = self.stream.try_take(n)
        if a is None:
            return None
        b = self.peer.try_take(nb)
        c = self.agent.try_take(nc) if b is not None else None
        if b is None or c is None:
            self.stream.give(a)
            if b is not None:
                self.peer.give(b)
            return None
        self.held.append((a, b, c))
        return a, b, c

    async def take(self, n: int) -> Lease:
        """Waits for the reader (the stream budget) as long as it takes, and for the peer
        and agent budgets up to wait_s: then RESOURCE_EXHAUSTED."""
        nb, nc = self._shares(n)
        a = await self.stream.take(n)
        b = self.peer.try_take(nb)  # the usual case, without a timer task
        c = self.agent.try_take(nc) if b is not None else None
        try:
            if b is None:
                b = await asyncio.wait_for(self.peer.take(nb), self.wait_s)
            if c is None:
                c = await asyncio.wait_for(self.agent.take(nc), self.wait_s)
        except BaseException as exc:
            self.stream.give(a)
            if b is not None:
                self.peer.give(b)
            if not isinstance(exc, TimeoutError):
                raise
            which = (
                "this peer's (--serve-peer-bytes)" if b is None else "the agent's (--serve-bytes)"
            )
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"page data in flight is at {which} limit for {self.wait_s:g} s; retry later",
            ) from None
        self.held.append((a, b, c))
        return a, b, c

    def give(self, lease: Lease) -> None:
        """A message that was not written after all."""
        self.held.remove(lease)
        self._give(lease)

    def written(self, lease: Lease) -> None:
        """gRPC took the message: the stream's share is free, the peer's and agent's move
        to the message in gRPC (the one before it has left)."""
        self.held.remove(lease)
        a, b, c = lease
        self.stream.give(a)
        self._give(self.in_grpc)
        self.in_grpc = (0, b, c)

    def _give(self, lease: Lease) -> None:
        a, b, c = lease
        self.stream.give(a)
        self.peer.give(b)
        self.agent.give(c)

    def close(self) -> None:
        while self.held:
            self.give(self.held[-1])
        self._give(self.in_grpc)
        self.in_grpc = (0, 0, 0)


def _peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest[1 : rest.find("]")] if rest.startswith("[") else rest.rpartition(":")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


# --- the servicer ------------------------------------------------------------------


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, _Abort):
        return exc.code, exc.message
    if isinstance(exc, ChannelBusy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
    if isinstance(exc, ExportNotFound):
        return grpc.StatusCode.NOT_FOUND, exc.message
    if isinstance(exc, ChunkOutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE, exc.message
    if isinstance(exc, ExportVerifying):  # reloaded after a restart: retry shortly
        return grpc.StatusCode.UNAVAILABLE, exc.message
    if isinstance(exc, ExportStale):
        return grpc.StatusCode.FAILED_PRECONDITION, exc.message
    if isinstance(exc, ExportInvalid):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    log.exception("page service: unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _invalid(message: str) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class PageServicer(pb_grpc.PageServiceServicer):
    """Serves an ExportRegistry. Counters are plain attributes the agent reads."""

    def __init__(
        self, registry: ExportRegistry, channel: Any = None, limits: PeerLimits | None = None
    ) -> None:
        self.registry = registry
        self.channel = channel  # a ChannelServer when the native data channel is offered
        self.limits = limits or PeerLimits()
        self.bytes_sent = 0
        self.chunks_sent = 0
        # final status name -> count; an urgent stream counts once per request answered
        self.requests_by_status: dict[str, int] = defaultdict(int)
        self.requests_by_method: dict[tuple[str, str], int] = defaultdict(int)
        self.budget = ByteBudget(self.limits.total_bytes)
        self.peers: dict[str, _Peer] = {}
        self.working_set_at: dict[str, float] = {}
        registry.withdraw_hooks.append(self._withdrawn)

    def _withdrawn(self, export: Export) -> None:
        self.working_set_at.pop(export.name, None)
        if self.channel is not None:
            self.channel.withdraw(export)

    # --- helpers ---

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.requests_by_status[code.name] += 1
        self.requests_by_method[(method, code.name)] += 1

    async def _fail(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        exc: Exception,
        peer: str = "",
        export: str = "",
    ) -> NoReturn:
        code, message = _status(exc)
        self._count(method, code)
        _audit(method, peer or _identity(context), export, code)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort always raises

    # --- who is asking ---

    def _identify(self, context: grpc.aio.ServicerContext) -> str:
        """The peer's identity once it is authenticated and allowed; raises
        UNAUTHENTICATED or PERMISSION_DENIED."""
        identity = _identity(context)
        if identity.startswith("san:"):
            sans = identity[4:].split(",")
            allow = self.limits.allow
            if allow and not any(fnmatch.fnmatchcase(n, p) for n in sans for p in allow):
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"peer certificate {sans} matches no --peer-allow entry",
                )
            return identity
        token = self.limits.token
        loopback = is_loopback(identity[3:])
        if token is not None and not (self.limits.anonymous_loopback and loopback):
            if not _bearer_ok(context.invocation_metadata(), token):
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this agent has a token: peers send it as 'authorization: Bearer <token>'",
                )
        return identity

    @contextlib.contextmanager
    def _stream(self, peer: str) -> Iterator[_Flow]:
        """A Bulk or Urgent stream of peer: counted against its stream limit; page bytes it
        reads are leased from its own, its peer's and the agent's budget."""
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = _Peer(ByteBudget(self.limits.peer_bytes))
        if state.streams >= self.limits.peer_streams:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"peer {peer} has {state.streams} streams open, the limit (--serve-peer-streams)",
            )
        state.streams += 1
        flow = _Flow(
            ByteBudget(self.limits.stream_bytes), state.budget, self.budget, self.limits.wait_s
        )
        try:
            yield flow
        finally:
            flow.close()
            state.streams -= 1
            if state.streams == 0 and state.budget.used == 0:
                del self.peers[peer]

    def _export(self, name: str) -> Export:
        if not name:
            raise _invalid("export name is empty")
        return self.registry.get(name)

    def _read(self, export: Export, indexes: list[int], read: Callable[[int], bytes]) -> list[Any]:
        return [pb.Chunk(index=i, data=read(i)) for i in indexes]

    def _read_encoded(self, export: Export, indexes: list[int], compression: str) -> list[Any]:
        """Chunks as _read gives them, zstd-compressed where asked for and it pays."""
        chunks = self._read(export, indexes, export.read_chunk)
        if compression == "zstd" and _uffd.zstd_available():
            for chunk in chunks:
                if len(chunk.data) >= 4096:
                    packed = _uffd.zstd_compress(chunk.data)
                    if len(packed) < len(chunk.data) * 7 // 8:
                        chunk.data, chunk.encoding = packed, "zstd"
        return chunks

    @staticmethod
    def _check_compression(value: str) -> str:
        if value not in ("", "zstd"):
            raise _invalid(f'compression {value!r} is not offered ("" or "zstd")')
        return value

    def _sent(self, batch: Any) -> int:
        n = sum(len(c.data) for c in batch.chunks)
        self.chunks_sent += len(batch.chunks)
        self.bytes_sent += n
        return n

    # --- Describe ---

    async def Describe(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = ""
        try:
            peer = self._identify(context)
            export = self._export(request.export)
            suspects = suspect_chunks(context.invocation_metadata())
            if suspects:  # a peer's digest complaint: re-read, re-hash, stale if changed
                await asyncio.to_thread(recheck_chunks, export, suspects)
            await asyncio.to_thread(export.check)
        except Exception as exc:
            await self._fail("Describe", context, exc, peer, request.export)
        self._count("Describe", grpc.StatusCode.OK)
        _audit("Describe", peer, export.name, grpc.StatusCode.OK)
        return pb.ExportDescription(
            name=export.name,
            size=export.size,
            page_size=export.page_size,
            chunk_size=export.chunk_size,
            zero_map=export.zero_bitmap,
            chunk_digests=export.digests,
            digest_algorithm=DIGEST_ALGORITHM,
            generation=export.generation,
            working_set=export.working_set,
            chunk_fast_digests=export.fast_digests,
            fast_digest_algorithm=FAST_DIGEST_ALGORITHM if export.fast_digests else "",
        )

    # --- OpenChannel ---

    async def OpenChannel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = ""
        try:
            peer = self._identify(context)
            if self.channel is None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the native data channel is off here (mTLS, or disabled)",
                )
            port, token = self.channel.grant(self._export(request.export), peer)
        except Exception as exc:
            await self._fail("OpenChannel", context, exc, peer, request.export)
        self._count("OpenChannel", grpc.StatusCode.OK)
        _audit("OpenChannel", peer, request.export, grpc.StatusCode.OK)
        return pb.ChannelGrant(port=port, token=token)

    # --- UploadWorkingSet ---

    async def UploadWorkingSet(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = ""
        try:
            peer = self._identify(context)
            export = self._export(request.export)
            chunks = self._check_working_set(export, list(request.chunks))
            if chunks == export.working_set:
                accepted = len(chunks)  # nothing changes: the record is not rewritten
            else:
                self.working_set_at[export.name] = time.monotonic()
                accepted = await asyncio.to_thread(
                    self.registry.set_working_set, request.export, chunks
                )
        except Exception as exc:
            await self._fail("UploadWorkingSet", context, exc, peer, request.export)
        self._count("UploadWorkingSet", grpc.StatusCode.OK)
        _audit("UploadWorkingSet", peer, export.name, grpc.StatusCode.OK, chunks=accepted)
        return pb.WorkingSetReply(accepted=accepted)

    def _check_working_set(self, export: Export, chunks: list[int]) -> list[int]:
        """At most one entry per chunk of the export, at most one change per interval."""
        if len(chunks) > export.chunks:
            raise _invalid(
                f"{len(chunks)} chunks in a working set of export {export.name!r}, "
                f"which has {export.chunks}"
            )
        chunks = list(dict.fromkeys(chunks))
        last = self.working_set_at.get(export.name)
        interval = self.limits.working_set_interval_s
        if chunks != export.working_set and last is not None:
            if time.monotonic() - last < interval:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the working set of {export.name!r} changed less than {interval:g} s ago "
                    "(--working-set-interval-s)",
                )
        return chunks

    # --- Bulk ---

    async def Bulk(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        peer, chunks_sent, bytes_sent = "", 0, 0
        try:
            peer = self._identify(context)
            export = self._export(request.export)
            compression = self._check_compression(request.compression)
            batches = iter(self._bulk_plan(export, request.want, request.max_batch_bytes))
            await asyncio.to_thread(export.check)
            with self._stream(peer) as flow:
                reader = self._bulk_batches(export, batches, compression, flow)
                async with contextlib.aclosing(reader):
                    async for batch in reader:
                        await context.write(batch)
                        chunks_sent += len(batch.chunks)
                        bytes_sent += self._sent(batch)
        except Exception as exc:
            await self._fail("Bulk", context, exc, peer, request.export)
        self._count("Bulk", grpc.StatusCode.OK)
        _audit("Bulk", peer, request.export, grpc.StatusCode.OK, chunks_sent, bytes_sent)

    async def _bulk_batches(
        self, export: Export, batches: Iterator[list[int]], compression: str, flow: _Flow
    ) -> AsyncGenerator[Any, None]:
        """Batches read one ahead (the disk and the network overlap) within the flow's
        budget; a batch's lease is given back once the caller has written it."""
        pending: tuple[asyncio.Task[list[Any]], tuple[int, int, int]] | None = None

        def start(indexes: list[int], lease: tuple[int, int, int]) -> None:
            nonlocal pending
            task = asyncio.create_task(
                asyncio.to_thread(self._read_encoded, export, indexes, compression)
            )
            pending = (task, lease)

        try:
            indexes = next(batches, None)
            if indexes is not None:
                start(indexes, await flow.take(self._batch_bytes(export, indexes)))
            while pending is not None:
                task, lease = pending
                pending = None
                chunks = await task
                following = next(batches, None)
                ahead = None
                if following is not None:
                    ahead = flow.try_take(self._batch_bytes(export, following))
                    if ahead is not None:
                        start(following, ahead)
                yield pb.ChunkBatch(chunks=chunks)
                flow.written(lease)
                if following is not None and ahead is None:
                    start(following, await flow.take(self._batch_bytes(export, following)))
        finally:
            if pending is not None:
                pending[0].cancel()

    @staticmethod
    def _batch_bytes(export: Export, indexes: list[int]) -> int:
        return sum(export.chunk_data_len(i) for i in indexes)

    def _bulk_plan(self, export: Export, want: bytes, max_batch_bytes: int) -> list[list[int]]:
        """Wanted non-zero chunks in index order, grouped up to max_batch_bytes of data."""
        if len(want) != bitmap_len(export.chunks):
            raise _invalid(
                f"want bitmap is {len(want)} bytes, export {export.name!r} with "
                f"{export.chunks} chunks needs {bitmap_len(export.chunks)}"
            )
        if max_batch_bytes > MAX_BATCH_BYTES:
            raise _invalid(f"max_batch_bytes {max_batch_bytes} is over {MAX_BATCH_BYTES}")
        limit = max_batch_bytes or DEFAULT_BATCH_BYTES
        flags = unpack_bits(want, export.chunks)
        plan: list[list[int]] = []
        batch: list[int] = []
        size = 0
        index = flags.find(1)
        while index >= 0:
            n = export.chunk_data_len(index)
            if n:
                if batch and size + n > limit:
                    plan.append(batch)
                    batch, size = [], 0
                batch.append(index)
                size += n
            index = flags.find(1, index + 1)
        if batch:
            plan.append(batch)
        return plan

    # --- Urgent ---

    async def Urgent(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """Requests are read and served concurrently (up to URGENT_WINDOW, and within the
        flow's budget); answers are written as they are ready. A reader that stops reading
        stops this stream reading requests, and holds at most its budget."""
        peer, export_name, chunks_sent, bytes_sent = "", "", 0, 0
        ended = "CANCELLED"  # a destination ends its urgent stream by cancelling it
        try:
            peer = self._identify(context)
            with self._stream(peer) as flow:
                out: asyncio.Queue[Any] = asyncio.Queue()
                window = asyncio.Semaphore(URGENT_WINDOW)
                pump = asyncio.create_task(
                    self._urgent_pump(request_iterator, out, window, flow, peer)
                )
                try:
                    while True:
                        item = await out.get()
                        if item is None:
                            break
                        if isinstance(item, Exception):
                            raise item
                        batch, lease, export_name = item
                        await context.write(batch)
                        flow.written(lease)
                        window.release()
                        chunks_sent += len(batch.chunks)
                        bytes_sent += self._sent(batch)
                        self._count("Urgent", grpc.StatusCode.OK)
                finally:
                    pump.cancel()
                    with contextlib.suppress(BaseException):
                        await pump
            ended = "OK"
        except Exception as exc:
            ended = ""  # _fail writes the audit line
            await self._fail("Urgent", context, exc, peer, export_name)
        finally:
            if ended:
                _audit("Urgent", peer, export_name, ended, chunks_sent, bytes_sent)

    async def _urgent_pump(
        self,
        requests: AsyncIterator[Any],
        out: asyncio.Queue[Any],
        window: asyncio.Semaphore,
        flow: _Flow,
        peer: str,
    ) -> None:
        """Reads requests and serves each in its own task; None on out marks the end."""
        workers: set[asyncio.Task[None]] = set()
        try:
            export: Export | None = None
            async for request in requests:
                if export is None:
                    export = self._urgent_export(export, request)
                    _audit("Urgent", peer, export.name, "OPEN")
                export = self._urgent_export(export, request)
                self._check_urgent(export, request)
                await window.acquire()
                lease = await flow.take(self._batch_bytes(export, list(request.chunks)))
                task = asyncio.create_task(self._urgent_one(export, request, out, lease, flow))
                workers.add(task)
                task.add_done_callback(workers.discard)
            if workers:
                await asyncio.gather(*workers)
            out.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out.put_nowait(exc)
        finally:
            for task in workers:
                task.cancel()

    def _urgent_export(self, current: Export | None, request: Any) -> Export:
        if current is None:
            if not request.export:
                raise _invalid("the first urgent request must name the export")
            return self.registry.get(request.export)
        if request.export and request.export != current.name:
            raise _invalid(f"stream is for export {current.name!r}, not {request.export!r}")
        return current

    def _check_urgent(self, export: Export, request: Any) -> None:
        count = len(request.chunks)
        if count > MAX_CHUNKS_PER_REQUEST:
            raise _invalid(f"{count} chunks in one request; at most {MAX_CHUNKS_PER_REQUEST}")
        if count * export.chunk_size > MAX_URGENT_BYTES:
            raise _invalid(f"{count} chunks of {export.chunk_size} bytes exceed one message")
        for index in request.chunks:
            if index >= export.chunks:
                raise ChunkOutOfRange(
                    f"chunk {index} out of range: export {export.name!r} has {export.chunks} chunks"
                )

    async def _urgent_one(
        self,
        export: Export,
        request: Any,
        out: asyncio.Queue[Any],
        lease: tuple[int, int, int],
        flow: _Flow,
    ) -> None:
        try:
            indexes = list(request.chunks)
            compression = self._check_compression(request.compression)
            if len(indexes) * export.chunk_size <= INLINE_READ_BYTES:
                # a demand fault waits on this: a thread hop costs more than a cached pread
                chunks = self._read_encoded(export, indexes, compression)
            else:
                chunks = await asyncio.to_thread(self._read_encoded, export, indexes, compression)
            out.put_nowait(
                (pb.ChunkBatch(request_id=request.request_id, chunks=chunks), lease, export.name)
            )
        except asyncio.CancelledError:
            flow.give(lease)
            raise
        except Exception as exc:
            flow.give(lease)
            out.put_nowait(exc)


def _identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: "san:" and its certificate's SANs under mTLS, else "ip:" and its
    address (not yet checked: see PageServicer._identify)."""
    auth = context.auth_context()
    if auth.get("transport_security_type") == [b"ssl"]:
        sans = auth.get("x509_subject_alternative_name", [])
        return "san:" + ",".join(v.decode(errors="replace") for v in sans)
    return "ip:" + _peer_host(context.peer())


def _bearer_ok(metadata: Any, token: str) -> bool:
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(given, expected)
    return False


def _audit(
    method: str,
    peer: str,
    export: str,
    status: grpc.StatusCode | str,
    chunks: int | None = None,
    nbytes: int | None = None,
) -> None:
    """One line per peer call (and one when a stream opens): who read or wrote what."""
    extra: dict[str, Any] = {"peer": peer, "export": export, "rpc": method}
    extra["status"] = status if isinstance(status, str) else status.name
    if chunks is not None:
        extra["chunks"] = chunks
    if nbytes is not None:
        extra["bytes"] = nbytes
    log.info("peer access", extra=extra)


# --- the server --------------------------------------------------------------------


@dataclass
class PeerServer:
    server: grpc.aio.Server
    servicer: PageServicer
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def serve_peers(
    registry: ExportRegistry,
    address: str,
    *,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_ca: str | Path | None = None,
    insecure_peers: bool = False,
    servicer: PageServicer | None = None,
) -> PeerServer:
    """Start the page service and health service on address; returns the parts and port."""
    material = tls_material(tls_cert, tls_key, tls_ca)
    if material is None:
        require_secure_or_loopback(address, insecure_peers)
    servicer = servicer or PageServicer(registry)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_PageServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if material is None:
            port = server.add_insecure_port(address)
        else:
            cert, key, ca = material
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = server.add_secure_port(address, creds)
    except RuntimeError:
        port = 0  # grpc raises where older versions returned 0
    if port == 0 and not address.startswith("unix"):
        raise OSError(
            errno.EADDRINUSE,
            f"gRPC cannot listen on {address}: the port is taken (or the address is not "
            "this host's)",
        )
    if material is not None and not servicer.limits.allow:
        log.warning("mTLS without --peer-allow: every certificate of the CA may read every export")
    await server.start()
    for name in (SERVICE_NAME, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "page service listening on %s (port %d, %s)",
        address,
        port,
        "mTLS" if material else "plain text",
    )
    return PeerServer(server, servicer, health_servicer, port)
