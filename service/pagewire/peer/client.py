"""Client side of the page service: fetches chunks from a peer agent, each checked on
arrival (remote_export.py), over unary calls and the Bulk and Urgent streams.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire.peer.errors import PeerError, PeerIntegrityError
from pagewire.peer.remote_export import RemoteExport, decode_chunk, rebuild_batch
from pagewire.peer.wire import (
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
# Statuses that mean the connection or the peer failed, not that the request was refused.
TRANSPORT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


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
    """Sends this agent's token to peers that ask for one (access.authenticate)."""

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
                for item in await rebuild_batch(remote, received):
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
        rebuilt = await rebuild_batch(self.remote, received)
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
