"""The agent's shared state: settings, sessions, exports, peer service."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc

from pagewire import __version__, _uffd
from pagewire.agent.settings import Settings, split_host_port
from pagewire.control.metrics import create_registry
from pagewire.control.models import NodeSource, PeerSource, SessionRequest
from pagewire.core import filework
from pagewire.core.errors import Conflict, InvalidRequest, NotFound, PagewireError, PeerUnavailable
from pagewire.exports.registry import ExportRegistry
from pagewire.exports.snapshots import SnapshotManager
from pagewire.peer.channel import ChannelLimits, ChannelServer
from pagewire.peer.client import PeerClient
from pagewire.peer.errors import PeerError
from pagewire.peer.flow import PeerLimits
from pagewire.peer.server import PageServicer, PeerServer, serve_peers
from pagewire.sessions.manager import SessionManager
from pagewire.sessions.recovery import recover
from pagewire.sessions.remote import RemoteSource

PEER_ERRORS: dict[grpc.StatusCode, tuple[type[PagewireError], str]] = {
    grpc.StatusCode.NOT_FOUND: (NotFound, "export_not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (Conflict, "export_stale"),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidRequest, "invalid_export"),
    grpc.StatusCode.UNAUTHENTICATED: (PeerUnavailable, "peer_refused"),
    grpc.StatusCode.PERMISSION_DENIED: (PeerUnavailable, "peer_refused"),
}


class AgentState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionManager(settings, self.remote_source)
        self.token = settings.token()
        self.started_at = time.time()
        self.exports: ExportRegistry | None = None
        self.peer_server: PeerServer | None = None
        self.grpc_address: str = settings.advertise_grpc or settings.grpc
        self.metrics, self.rpc_latency = create_registry(self)
        self.janitor: asyncio.Task[None] | None = None
        self.channel: ChannelServer | None = None
        self.cache = _uffd.ChunkCache(settings.cache_bytes) if settings.cache_bytes else None
        self.idle_since = time.monotonic()
        self.snapshots: SnapshotManager | None = None

    async def start(self) -> None:
        self.sessions.prepare_dirs()
        s = self.settings
        filework.configure(s.file_work_threads, s.file_work_timeout_s)
        self.exports = ExportRegistry(
            s.state_dir,
            s.export_roots,
            s.chunk_size,
            max_exports=s.max_exports,
            live_export_uids=s.live_export_uids,
        )
        self.exports.load()
        host, _ = split_host_port(s.grpc)
        if s.native_channel:
            self.channel = ChannelServer(
                host, s.data_port, channel_limits(s), tls=tls_paths(s), allow=s.peer_allow
            )
        self.peer_server = await serve_peers(
            self.exports,
            s.grpc,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            tls_ca=s.tls_ca,
            insecure_peers=s.insecure_peers,
            servicer=PageServicer(self.exports, self.channel, PeerLimits.from_settings(s)),
        )
        if s.advertise_grpc is None:
            self.grpc_address = f"{host}:{self.peer_server.port}"
        # one refusal counter for session and snapshot sockets
        self.snapshots = SnapshotManager(s, self.exports, self.sessions.count_rejection)
        await recover(self.sessions)
        self.janitor = asyncio.get_running_loop().create_task(self._expire_sessions())

    async def _expire_sessions(self) -> None:
        interval = max(0.5, min(60.0, self.settings.retention_s / 4))
        while True:
            await asyncio.sleep(min(interval, max(0.5, self.settings.cache_idle_s / 2)))
            self.sessions.expire(time.time())
            if self.snapshots is not None:
                self.snapshots.expire(time.time())
            self._drop_idle_cache()

    def _drop_idle_cache(self) -> None:
        """An idle agent gives its chunk cache back (its memory, not its counters)."""
        if any(s.active for s in self.sessions.sessions.values()):
            self.idle_since = time.monotonic()
        elif (
            self.cache is not None
            and time.monotonic() - self.idle_since >= self.settings.cache_idle_s
        ):
            self.cache.clear()

    def peer_client(self, address: str) -> PeerClient:
        s = self.settings
        return PeerClient(
            address,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            tls_ca=s.tls_ca,
            insecure_peers=s.insecure_peers,
            token=self.token,
        )

    async def remote_source(self, request: SessionRequest) -> RemoteSource:
        src = request.source
        if isinstance(src, PeerSource):
            address = src.peer
        elif isinstance(src, NodeSource):
            address = self.settings.peer_dns_pattern.format(node=src.node)
        else:
            raise InvalidRequest("invalid_source", "not a peer source")
        export = src.export
        try:
            client = self.peer_client(address)
        except ValueError as exc:
            raise InvalidRequest("insecure_peer", str(exc)) from None
        try:
            with self.rpc_latency.labels("Describe").time():
                remote = await client.describe(export, timeout=10.0)
        except PeerError as exc:
            await client.close()
            kind, code = PEER_ERRORS.get(exc.code, (PeerUnavailable, "peer_unreachable"))  # type: ignore[arg-type]
            raise kind(code, f"peer {address}: {exc}") from None
        return RemoteSource(
            client,
            remote,
            address,
            background=request.background,
            prefetch=request.prefetch,
            on_source_lost=request.on_source_lost,
            pause_timeout_s=request.pause_timeout_s,
            fail=self.sessions.fail,
            rpc_latency=self.rpc_latency.labels("Urgent"),
            native=self.settings.native_channel,
            tls=tls_paths(self.settings),
            compression=request.compression,
            cache=self.cache,
        )

    async def stop(self) -> None:
        await self.sessions.shutdown()

    async def close(self) -> None:
        if self.janitor is not None:
            self.janitor.cancel()
        if self.peer_server is not None:
            await self.peer_server.stop(grace=1.0)
            self.peer_server = None
        if self.exports is not None:
            with contextlib.suppress(Exception):
                self.exports.close()
        if self.channel is not None:
            self.channel.close()

    def readiness(self) -> dict[str, bool]:
        return {
            "engine": True,
            "grpc": self.peer_server is not None,
            "accepting": not (self.sessions.shutting_down or self.sessions.draining),
            "file_pool": filework.pool().healthy(),
            # no session without its record: after a failed write, probe until one works
            "state_dir": self.sessions.records.writable or self.sessions.records.probe(),
        }

    def info(self) -> dict[str, Any]:
        from pagewire.core.layout import SYSTEM_PAGE_SIZE, huge_page_sizes

        names = [n for n in dir(_uffd) if n.startswith("FEATURE_")]
        offered = [n[8:].lower() for n in names if _uffd.API_FEATURES_SUPPORTED & getattr(_uffd, n)]
        return {
            "node": self.settings.node_name,
            "version": __version__,
            "page_size": SYSTEM_PAGE_SIZE,
            "huge_page_sizes": sorted(huge_page_sizes()),
            "uffd_features": sorted(offered),
            "grpc_address": self.grpc_address,
            "tls": self.settings.tls_enabled,
            "export_roots": [str(p) for p in self.settings.export_roots],
            "sessions_active": sum(1 for s in self.sessions.sessions.values() if s.active),
            "draining": self.sessions.draining,
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def tls_paths(s: Settings) -> tuple[str, str, str] | None:
    """The agent's certificate, key and CA, which the native channel uses as gRPC does."""
    if s.tls_cert is None or s.tls_key is None or s.tls_ca is None:
        return None
    return str(s.tls_cert), str(s.tls_key), str(s.tls_ca)


def channel_limits(s: Settings) -> ChannelLimits:
    return ChannelLimits(
        max_conns=s.channel_max_conns,
        peer_conns=s.channel_peer_conns,
        pending_per_peer=s.channel_pending_per_peer,
        hello_timeout_s=s.channel_hello_timeout_s,
        grants=s.channel_grants,
        peer_grants=s.channel_peer_grants,
        grant_ttl_s=s.channel_grant_ttl_s,
    )
