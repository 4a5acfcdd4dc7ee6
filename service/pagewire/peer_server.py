"""The page service: serves this agent's exports to peer agents over gRPC (grpc.aio).

Disk reads run in worker threads so the event loop never blocks on the file system.
Each RPC fails alone: a bad request ends its own call with a status, never the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagewire import _uffd
from pagewire.exports import (
    DIGEST_ALGORITHM,
    ChunkOutOfRange,
    Export,
    ExportInvalid,
    ExportNotFound,
    ExportRegistry,
    ExportStale,
    bitmap_len,
    unpack_bits,
)
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc
from pagewire.settings import is_loopback as host_is_loopback

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
SERVER_OPTIONS: list[tuple[str, Any]] = COMMON_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
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

# --- the servicer ------------------------------------------------------------------


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, _Abort):
        return exc.code, exc.message
    if isinstance(exc, ExportNotFound):
        return grpc.StatusCode.NOT_FOUND, exc.message
    if isinstance(exc, ChunkOutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE, exc.message
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

    def __init__(self, registry: ExportRegistry, channel: Any = None) -> None:
        self.registry = registry
        self.channel = channel  # a ChannelServer when the native data channel is offered
        self.bytes_sent = 0
        self.chunks_sent = 0
        # final status name -> count; an urgent stream counts once per request answered
        self.requests_by_status: dict[str, int] = defaultdict(int)
        self.requests_by_method: dict[tuple[str, str], int] = defaultdict(int)

    # --- helpers ---

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.requests_by_status[code.name] += 1
        self.requests_by_method[(method, code.name)] += 1

    async def _fail(
        self, method: str, context: grpc.aio.ServicerContext, exc: Exception
    ) -> NoReturn:
        code, message = _status(exc)
        self._count(method, code)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort always raises

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

    def _sent(self, batch: Any) -> None:
        self.chunks_sent += len(batch.chunks)
        self.bytes_sent += sum(len(c.data) for c in batch.chunks)

    # --- Describe ---

    async def Describe(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            export = self._export(request.export)
            suspects = suspect_chunks(context.invocation_metadata())
            if suspects:  # a peer's digest complaint: re-read, re-hash, stale if changed
                await asyncio.to_thread(recheck_chunks, export, suspects)
            await asyncio.to_thread(export.check)
        except Exception as exc:
            await self._fail("Describe", context, exc)
        self._count("Describe", grpc.StatusCode.OK)
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
        )

    # --- OpenChannel ---

    async def OpenChannel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if self.channel is None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the native data channel is off here (mTLS, or disabled)",
                )
            port, token = self.channel.grant(self._export(request.export))
        except Exception as exc:
            await self._fail("OpenChannel", context, exc)
        self._count("OpenChannel", grpc.StatusCode.OK)
        return pb.ChannelGrant(port=port, token=token)

    # --- UploadWorkingSet ---

    async def UploadWorkingSet(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._export(request.export)
            accepted = await asyncio.to_thread(
                self.registry.set_working_set, request.export, list(request.chunks)
            )
        except Exception as exc:
            await self._fail("UploadWorkingSet", context, exc)
        self._count("UploadWorkingSet", grpc.StatusCode.OK)
        return pb.WorkingSetReply(accepted=accepted)

    # --- Bulk ---

    async def Bulk(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        pending: asyncio.Task[list[Any]] | None = None
        try:
            export = self._export(request.export)
            compression = self._check_compression(request.compression)
            batches = iter(self._bulk_plan(export, request.want, request.max_batch_bytes))
            await asyncio.to_thread(export.check)

            def start() -> asyncio.Task[list[Any]] | None:
                indexes = next(batches, None)
                if indexes is None:
                    return None
                return asyncio.create_task(
                    asyncio.to_thread(self._read_encoded, export, indexes, compression)
                )

            # read one batch ahead so the disk and the network overlap
            pending = start()
            while pending is not None:
                chunks = await pending
                pending = start()
                batch = pb.ChunkBatch(chunks=chunks)
                self._sent(batch)
                yield batch
        except Exception as exc:
            await self._fail("Bulk", context, exc)
        finally:
            if pending is not None:
                pending.cancel()
        self._count("Bulk", grpc.StatusCode.OK)

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
    ) -> AsyncIterator[Any]:
        out: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(URGENT_WINDOW)
        pump = asyncio.create_task(self._urgent_pump(request_iterator, out, window))
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    await self._fail("Urgent", context, item)
                self._sent(item)
                self._count("Urgent", grpc.StatusCode.OK)
                yield item
                window.release()
        finally:
            pump.cancel()

    async def _urgent_pump(
        self, requests: AsyncIterator[Any], out: asyncio.Queue[Any], window: asyncio.Semaphore
    ) -> None:
        """Reads requests and serves each in its own task; None on out marks the end."""
        workers: set[asyncio.Task[None]] = set()
        try:
            export: Export | None = None
            async for request in requests:
                export = self._urgent_export(export, request)
                self._check_urgent(export, request)
                await window.acquire()
                task = asyncio.create_task(self._urgent_one(export, request, out))
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

    async def _urgent_one(self, export: Export, request: Any, out: asyncio.Queue[Any]) -> None:
        try:
            indexes = list(request.chunks)
            compression = self._check_compression(request.compression)
            if len(indexes) * export.chunk_size <= INLINE_READ_BYTES:
                # a demand fault waits on this: a thread hop costs more than a cached pread
                chunks = self._read_encoded(export, indexes, compression)
            else:
                chunks = await asyncio.to_thread(self._read_encoded, export, indexes, compression)
            out.put_nowait(pb.ChunkBatch(request_id=request.request_id, chunks=chunks))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out.put_nowait(exc)


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
    if material is None:
        port = server.add_insecure_port(address)
    else:
        cert, key, ca = material
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        port = server.add_secure_port(address, creds)
    if port == 0 and not address.startswith("unix"):
        raise OSError(f"cannot listen on {address}")
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
