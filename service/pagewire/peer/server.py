"""The page service: serves this agent's exports to peer agents over gRPC (grpc.aio).

Disk reads run in worker threads so the event loop never blocks on the file system.
Each RPC fails alone: a bad request ends its own call with a status, never the server.
Who may call (access.py), how much they may hold (flow.py) and the streaming RPCs' work
(streams.py) live beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagewire import _uffd
from pagewire.exports.chunks import DIGEST_ALGORITHM, FAST_DIGEST_ALGORITHM
from pagewire.exports.export import Export
from pagewire.exports.registry import ExportRegistry
from pagewire.peer.access import audit, authenticate, peer_identity
from pagewire.peer.flow import PeerFlows, PeerLimits
from pagewire.peer.status import Abort, grpc_status, invalid
from pagewire.peer.streams import UrgentPump, bulk_batches, bulk_plan, check_compression
from pagewire.peer.wire import (
    MAX_SUSPECTS,
    SERVER_OPTIONS,
    SERVICE_NAME,
    SUSPECT_METADATA,
    require_secure_or_loopback,
    tls_material,
)
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def suspect_chunks(metadata: Any) -> list[int]:
    """The chunks a peer says failed their digest (a digest complaint on Describe)."""
    for key, value in metadata or ():
        if key == SUSPECT_METADATA and isinstance(value, str):
            items = value.split(",")[:MAX_SUSPECTS]
            return [int(i) for i in items if i.strip().isdigit() and len(i.strip()) < 20]
    return []


def recheck_chunks(export: Export, chunks: list[int]) -> None:
    for index in chunks:
        if not 0 <= index < export.chunks or not export.recheck_chunk(index):
            return


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
        self.flows = PeerFlows(self.limits)  # page bytes in flight, per stream and peer
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
        code, message = grpc_status(exc)
        self._count(method, code)
        audit(method, peer or peer_identity(context), export, code)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort always raises

    def _identify(self, context: grpc.aio.ServicerContext) -> str:
        """The peer's identity once it is authenticated and allowed (access.authenticate)."""
        return authenticate(context, self.limits)

    def _export(self, name: str) -> Export:
        if not name:
            raise invalid("export name is empty")
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
        audit("Describe", peer, export.name, grpc.StatusCode.OK)
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
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the native data channel is off here (--no-native-channel)",
                )
            port, token = self.channel.grant(self._export(request.export), peer)
        except Exception as exc:
            await self._fail("OpenChannel", context, exc, peer, request.export)
        self._count("OpenChannel", grpc.StatusCode.OK)
        audit("OpenChannel", peer, request.export, grpc.StatusCode.OK)
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
        audit("UploadWorkingSet", peer, export.name, grpc.StatusCode.OK, chunks=accepted)
        return pb.WorkingSetReply(accepted=accepted)

    def _check_working_set(self, export: Export, chunks: list[int]) -> list[int]:
        """At most one entry per chunk of the export, at most one change per interval."""
        if len(chunks) > export.chunks:
            raise invalid(
                f"{len(chunks)} chunks in a working set of export {export.name!r}, "
                f"which has {export.chunks}"
            )
        chunks = list(dict.fromkeys(chunks))
        last = self.working_set_at.get(export.name)
        interval = self.limits.working_set_interval_s
        if chunks != export.working_set and last is not None:
            if time.monotonic() - last < interval:
                raise Abort(
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
            compression = check_compression(request.compression)
            batches = iter(bulk_plan(export, request.want, request.max_batch_bytes))
            await asyncio.to_thread(export.check)
            with self.flows.stream(peer) as flow:
                reader = bulk_batches(export, batches, compression, flow, self._read_encoded)
                async with contextlib.aclosing(reader):
                    async for batch in reader:
                        await context.write(batch)
                        chunks_sent += len(batch.chunks)
                        bytes_sent += self._sent(batch)
        except Exception as exc:
            await self._fail("Bulk", context, exc, peer, request.export)
        self._count("Bulk", grpc.StatusCode.OK)
        audit("Bulk", peer, request.export, grpc.StatusCode.OK, chunks_sent, bytes_sent)

    # --- Urgent ---

    async def Urgent(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """Requests are read and served concurrently (streams.UrgentPump); answers are
        written as they are ready. A reader that stops reading stops this stream reading
        requests, and holds at most its budget."""
        peer, export_name, chunks_sent, bytes_sent = "", "", 0, 0
        ended = "CANCELLED"  # a destination ends its urgent stream by cancelling it
        try:
            peer = self._identify(context)
            with self.flows.stream(peer) as flow:
                pump = UrgentPump(self.registry, self._read_encoded, flow, peer)
                pumping = asyncio.create_task(pump.run(request_iterator))
                try:
                    while True:
                        item = await pump.out.get()
                        if item is None:
                            break
                        if isinstance(item, Exception):
                            raise item
                        batch, lease, export_name = item
                        await context.write(batch)
                        flow.written(lease)
                        pump.window.release()
                        chunks_sent += len(batch.chunks)
                        bytes_sent += self._sent(batch)
                        self._count("Urgent", grpc.StatusCode.OK)
                finally:
                    pumping.cancel()
                    with contextlib.suppress(BaseException):
                        await pumping
            ended = "OK"
        except Exception as exc:
            ended = ""  # _fail writes the audit line
            await self._fail("Urgent", context, exc, peer, export_name)
        finally:
            if ended:
                audit("Urgent", peer, export_name, ended, chunks_sent, bytes_sent)


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
