"""Client side of the page service: fetches and verifies chunks from a peer agent.

Every chunk is rebuilt to its full size (zero pages filled in from the zero map) and
checked against the digest the peer published. A peer that sends a wrong index, size or
digest raises PeerIntegrityError and its stream is torn down; callers fetch again on a
new stream (DESIGN.md section 5).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire import _uffd
from pagewire.exports.registry import (
    FAST_DIGEST_ALGORITHM,
    FAST_DIGEST_LEN,
    ChunkGeometry,
    unpack_bits,
)
from pagewire.peer.server import (
    COMMON_OPTIONS,
    MAX_CHUNKS_PER_REQUEST,
    MAX_SUSPECTS,
    MAX_URGENT_BYTES,
    SERVICE_NAME,
    SUSPECT_METADATA,
    require_secure_or_loopback,
    tls_material,
)
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DIGEST_LEN = 32
# Statuses that mean the connection or the peer failed, not that the request was refused.
TRANSPORT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
# A returning source is used within a second of being ready: gRPC's default reconnect
# backoff grows to 120 s (seen: 6 to 12 s of peer_unreachable after a 20 s outage).
# Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the minimum connect timeout
# (20 s by default), and 100 ms fails every connection over a slow link.
RECONNECT_BACKOFF_INITIAL_MS = 100
RECONNECT_BACKOFF_MAX_MS = 500
CLIENT_OPTIONS: list[tuple[str, Any]] = COMMON_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
]
# Verify batches larger than this in a worker thread so the loop keeps serving faults.
INLINE_VERIFY_BYTES = 256 * 1024


class PeerError(Exception):
    """A peer call failed; code is the gRPC status (None for local protocol errors)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> PeerError:
        return cls(f"{exc.code().name}: {exc.details()}", exc.code())


class PeerIntegrityError(PeerError):
    """The peer sent data that does not match what it published (chunk: which one, when
    it failed its digest)."""

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk


# --- the export as seen from here ---------------------------------------------------


@dataclass
class RemoteExport(ChunkGeometry):
    name: str
    size: int
    page_size: int
    chunk_size: int
    zero_map: bytes  # one byte per page, 1 = the page is all zero
    digests: list[bytes]
    generation: str
    working_set: list[int] = field(default_factory=list)
    # xxh3-128 per chunk, what every chunk is checked against; empty from an older source
    # (then sha256 is)
    fast_digests: list[bytes] = field(default_factory=list)

    @classmethod
    def from_proto(cls, desc: Any) -> RemoteExport:
        if desc.digest_algorithm != "sha256":
            raise PeerIntegrityError(f"unsupported digest algorithm {desc.digest_algorithm!r}")
        ps, cs, size = desc.page_size, desc.chunk_size, desc.size
        if ps <= 0 or cs < ps or cs % ps or size <= 0 or size % ps:
            raise PeerIntegrityError(f"bad geometry: size {size} page {ps} chunk {cs}")
        pages, chunks = size // ps, (size + cs - 1) // cs
        if len(desc.zero_map) != (pages + 7) // 8:
            raise PeerIntegrityError(f"zero map of {len(desc.zero_map)} bytes for {pages} pages")
        digests = list(desc.chunk_digests)
        if len(digests) != chunks or any(len(d) != DIGEST_LEN for d in digests):
            raise PeerIntegrityError(f"{len(digests)} digests for {chunks} chunks")
        fast: list[bytes] = []
        if desc.fast_digest_algorithm == FAST_DIGEST_ALGORITHM:
            fast = list(desc.chunk_fast_digests)
            if len(fast) != chunks or any(len(d) != FAST_DIGEST_LEN for d in fast):
                raise PeerIntegrityError(f"{len(fast)} fast digests for {chunks} chunks")
        return cls(
            name=desc.name,
            size=size,
            page_size=ps,
            chunk_size=cs,
            zero_map=unpack_bits(desc.zero_map, pages),
            digests=digests,
            generation=desc.generation,
            working_set=list(desc.working_set),
            fast_digests=fast,
        )


def decode_chunk(remote: RemoteExport, chunk: Any, compression: str) -> bytes:
    """A chunk message's data pages, decompressed if the peer compressed them."""
    if not chunk.encoding:
        return bytes(chunk.data)
    if chunk.encoding != "zstd" or compression != "zstd":
        raise PeerIntegrityError(f"chunk {chunk.index}: unexpected encoding {chunk.encoding!r}")
    if not 0 <= chunk.index < remote.chunks:
        raise PeerIntegrityError(f"chunk index {chunk.index} out of range")
    try:
        return _uffd.zstd_decompress(chunk.data, remote.chunk_data_len(chunk.index))
    except ValueError as exc:
        raise PeerIntegrityError(f"chunk {chunk.index}: {exc}") from None


def rebuild_chunk(remote: RemoteExport, index: int, data: bytes) -> bytes:
    """Full chunk from its non-zero pages, verified against the published digest."""
    if not 0 <= index < remote.chunks:
        raise PeerIntegrityError(f"chunk index {index} out of range ({remote.chunks} chunks)")
    first, last = remote.chunk_pages(index)
    ps = remote.page_size
    flags = remote.zero_map[first:last]
    expected = flags.count(0) * ps
    if len(data) != expected:
        raise PeerIntegrityError(f"chunk {index}: {len(data)} bytes, expected {expected}")
    if expected == len(flags) * ps:
        chunk = data
    else:
        buf = bytearray(len(flags) * ps)
        src = memoryview(data)
        used = 0
        page = flags.find(0)
        while page >= 0:
            stop = flags.find(1, page)
            stop = len(flags) if stop < 0 else stop
            n = (stop - page) * ps
            buf[page * ps : stop * ps] = src[used : used + n]
            used += n
            page = flags.find(0, stop)
        chunk = bytes(buf)
    if not chunk_matches(remote, index, chunk):
        raise PeerIntegrityError(f"chunk {index}: digest mismatch", chunk=index)
    return chunk


def chunk_matches(remote: RemoteExport, index: int, chunk: bytes) -> bool:
    """The chunk is what the peer published: its fast digest, or sha256 from an older peer."""
    if remote.fast_digests:
        return _uffd.xxh128(chunk) == remote.fast_digests[index]
    return hashlib.sha256(chunk).digest() == remote.digests[index]


def _rebuild_all(remote: RemoteExport, chunks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(i, rebuild_chunk(remote, i, d)) for i, d in chunks]


async def _rebuild_batch(
    remote: RemoteExport, chunks: list[tuple[int, bytes]]
) -> list[tuple[int, bytes]]:
    if sum(len(d) for _, d in chunks) <= INLINE_VERIFY_BYTES:
        return _rebuild_all(remote, chunks)
    return await asyncio.to_thread(_rebuild_all, remote, chunks)


# --- latency ------------------------------------------------------------------------


class LatencyHistogram:
    """Urgent round-trip seconds: cumulative buckets (Prometheus style) and recent samples."""

    BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

    def __init__(self, keep: int = 4096) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # last bucket is +Inf
        self.count = 0
        self.sum = 0.0
        self.samples: deque[float] = deque(maxlen=keep)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.samples.append(seconds)

    def quantile(self, q: float) -> float | None:
        """Quantile of the recent samples, None if there are none."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the client ---------------------------------------------------------------------


class _BearerToken(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Sends this agent's token to peers that ask for one (peer_server._identify)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class PeerClient:
    """A channel to one peer agent; cheap to share between sessions."""

    def __init__(
        self,
        address: str,
        *,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_ca: str | Path | None = None,
        insecure_peers: bool = False,
        token: str | None = None,
    ) -> None:
        material = tls_material(tls_cert, tls_key, tls_ca)
        self.address = address
        interceptors = [_BearerToken(token)] if token else None
        if material is None:
            require_secure_or_loopback(address, insecure_peers)
            self.channel = grpc.aio.insecure_channel(
                address, options=CLIENT_OPTIONS, interceptors=interceptors
            )
        else:
            cert, key, ca = material
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self.channel = grpc.aio.secure_channel(
                address, creds, options=CLIENT_OPTIONS, interceptors=interceptors
            )
        self.stub = pb_grpc.PageServiceStub(self.channel)
        self.bytes_received = 0
        self.integrity_failures = 0
        # streams opened after an earlier stream of this client broke
        self.reconnects = 0
        self.urgent_latency = LatencyHistogram()
        self._broken = False

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _stream_opened(self) -> None:
        if self._broken:
            self.reconnects += 1
            self._broken = False

    def _stream_broke(self, exc: BaseException) -> None:
        """Count a stream ended by the peer or the network (not by a refused request)."""
        if isinstance(exc, PeerIntegrityError):
            self.integrity_failures += 1
            log.warning("peer %s: %s", self.address, exc)
            self._broken = True
        elif not isinstance(exc, PeerError) or exc.code in TRANSPORT_CODES or exc.code is None:
            self._broken = True

    # --- unary calls ---

    async def describe(
        self, export: str, timeout: float | None = 30.0, suspects: list[int] | None = None
    ) -> RemoteExport:
        """The export's description; suspects names chunks that failed their digest, which
        the source re-reads and re-hashes (marking the export stale if its file changed)."""
        metadata = (
            (SUSPECT_METADATA, ",".join(map(str, suspects[:MAX_SUSPECTS]))) if suspects else None
        )
        try:
            desc = await self.stub.Describe(
                pb.DescribeRequest(export=export),
                timeout=timeout,
                metadata=(metadata,) if metadata else None,
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerError.from_rpc(exc) from None
        try:
            return RemoteExport.from_proto(desc)
        except PeerIntegrityError as exc:
            self._stream_broke(exc)
            raise

    async def open_channel(self, export: str, timeout: float | None = 10.0) -> tuple[int, bytes]:
        """(port, token) of the peer's native data channel for one session."""
        try:
            grant = await self.stub.OpenChannel(
                pb.OpenChannelRequest(export=export), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerError.from_rpc(exc) from None
        return int(grant.port), bytes(grant.token)

    async def upload_working_set(
        self, export: str, chunks: Iterable[int], timeout: float | None = 30.0
    ) -> int:
        request = pb.WorkingSet(export=export, chunks=list(chunks))
        try:
            reply = await self.stub.UploadWorkingSet(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise PeerError.from_rpc(exc) from None
        return int(reply.accepted)

    async def health(self, service: str = SERVICE_NAME, timeout: float | None = 5.0) -> str:
        """The peer's health status name, e.g. "SERVING"."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise PeerError.from_rpc(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # --- streams ---

    def urgent(self, remote: RemoteExport, compression: str = "") -> UrgentStream:
        """Open an urgent stream for one session (call from the event loop)."""
        return UrgentStream(self, remote, compression)

    async def bulk(
        self, remote: RemoteExport, want: bytes, max_batch_bytes: int = 0, compression: str = ""
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (index, full chunk) for the wanted non-zero chunks, in index order."""
        request = pb.BulkRequest(
            export=remote.name, want=want, max_batch_bytes=max_batch_bytes, compression=compression
        )
        self._stream_opened()
        call = self.stub.Bulk(request)
        last = -1
        try:
            async for batch in call:
                received = []
                for chunk in batch.chunks:
                    self._check_bulk_index(remote, want, last, chunk.index)
                    last = chunk.index
                    self.bytes_received += len(chunk.data)
                    received.append((chunk.index, decode_chunk(remote, chunk, compression)))
                for item in await _rebuild_batch(remote, received):
                    yield item
        except grpc.aio.AioRpcError as exc:
            error = PeerError.from_rpc(exc)
            self._stream_broke(error)
            raise error from None
        except PeerIntegrityError as exc:
            self._stream_broke(exc)
            raise
        finally:
            call.cancel()

    @staticmethod
    def _check_bulk_index(remote: RemoteExport, want: bytes, last: int, index: int) -> None:
        if index <= last or index >= remote.chunks:
            raise PeerIntegrityError(f"bulk chunk {index} out of order or range (after {last})")
        if not want[index // 8] >> (index % 8) & 1:
            raise PeerIntegrityError(f"bulk chunk {index} was not asked for")


@dataclass
class _Pending:
    chunks: list[int]
    future: asyncio.Future[dict[int, bytes]]
    started: float


class UrgentStream:
    """One bidirectional Urgent call; many fetches may be outstanding at once."""

    def __init__(self, client: PeerClient, remote: RemoteExport, compression: str = "") -> None:
        self.client = client
        self.remote = remote
        self.compression = compression
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._write_lock = asyncio.Lock()
        self._error: BaseException | None = None
        client._stream_opened()
        self._call = client.stub.Urgent()
        self._reader = asyncio.create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def fetch(self, chunks: list[int]) -> dict[int, bytes]:
        """Full, verified bytes of each chunk; raises PeerError if the stream breaks."""
        if not chunks:
            return {}
        parts = self._split(list(dict.fromkeys(chunks)))
        results = await asyncio.gather(*(self._request(part) for part in parts))
        merged: dict[int, bytes] = {}
        for r in results:
            merged.update(r)
        return merged

    def _split(self, chunks: list[int]) -> list[list[int]]:
        by_bytes = MAX_URGENT_BYTES // self.remote.chunk_size
        per_request = max(1, min(MAX_CHUNKS_PER_REQUEST, by_bytes))
        return [chunks[i : i + per_request] for i in range(0, len(chunks), per_request)]

    async def _request(self, chunks: list[int]) -> dict[int, bytes]:
        if self._error is not None:
            raise self._error
        request_id = next(self._ids)
        future: asyncio.Future[dict[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(chunks, future, time.monotonic())
        request = pb.ChunkRequest(
            export=self.remote.name,
            request_id=request_id,
            chunks=chunks,
            compression=self.compression,
        )
        try:
            async with self._write_lock:
                await self._call.write(request)
        except grpc.aio.AioRpcError as exc:
            self._teardown(PeerError.from_rpc(exc))
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            # the call ended before the reader saw why: report the call's own status
            code, details = await self._call.code(), await self._call.details()
            self._teardown(PeerError(f"{code.name}: {details}", code))
        return await future

    async def _read_loop(self) -> None:
        try:
            while True:
                batch = await self._call.read()
                if batch is grpc.aio.EOF:
                    raise PeerError("urgent stream closed by the peer")
                await self._answer(batch)
        except asyncio.CancelledError:
            self._teardown(PeerError("urgent stream closed"), broken=False)
            raise
        except grpc.aio.AioRpcError as exc:
            self._teardown(PeerError.from_rpc(exc))
        except Exception as exc:
            self._teardown(exc)

    async def _answer(self, batch: Any) -> None:
        pending = self._pending.get(batch.request_id)
        if pending is None:
            raise PeerIntegrityError(f"answer to unknown request {batch.request_id}")
        received = [(c.index, decode_chunk(self.remote, c, self.compression)) for c in batch.chunks]
        self.client.bytes_received += sum(len(c.data) for c in batch.chunks)  # wire bytes
        if sorted(i for i, _ in received) != sorted(pending.chunks):
            raise PeerIntegrityError(
                f"request {batch.request_id}: got chunks {[i for i, _ in received]}, "
                f"asked for {pending.chunks}"
            )
        rebuilt = await _rebuild_batch(self.remote, received)
        del self._pending[batch.request_id]
        self.client.urgent_latency.observe(time.monotonic() - pending.started)
        if not pending.future.done():  # the caller may have given up (cancelled)
            pending.future.set_result(dict(rebuilt))

    def _teardown(self, exc: BaseException, broken: bool = True) -> None:
        """Fail every outstanding fetch and cancel the call; the stream is unusable."""
        if self._error is not None:
            return
        self._error = exc
        if broken:
            self.client._stream_broke(exc)
        self._call.cancel()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(exc)
        self._pending.clear()

    async def close(self) -> None:
        """Half-close and stop reading; outstanding fetches fail with PeerError."""
        if self._error is None:
            self._error = PeerError("urgent stream closed")
            self._call.cancel()
            for pending in self._pending.values():
                if not pending.future.done():
                    pending.future.set_exception(self._error)
            self._pending.clear()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
