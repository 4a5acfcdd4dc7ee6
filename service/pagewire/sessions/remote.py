"""A session source on a peer agent: its lifecycle as a Source, the native data channel,
and the working set.

At creation it joins the other sessions of its image (they share the host's chunk
cache), asks the peer for a native data channel and stages a recorded working set. At
attach the engine opens that channel, which then carries faults and bulk; when there is
none, or it is lost, the gRPC lanes (lanes.py) take over. A completed session leaves its
first-touch record with the export for the next one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from pagewire import _uffd
from pagewire.peer.client import PeerClient
from pagewire.peer.errors import PeerError
from pagewire.peer.remote_export import RemoteExport
from pagewire.sessions.lanes import ChunkLanes, FailCallback
from pagewire.sessions.staging import WorkingSetStage

if TYPE_CHECKING:
    from collections.abc import Collection

    from pagewire.sessions.session import Session

log = logging.getLogger("pagewire.sessions.remote")


# the active remote sources of this agent, by image: who could share chunks
SAME_IMAGE: dict[tuple[str, str, str], set[RemoteSource]] = {}


class RemoteSource(ChunkLanes):
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
        tls: tuple[str, str, str] | None = None,
        compression: str = "none",
        cache: _uffd.ChunkCache | None = None,
    ) -> None:
        super().__init__(
            client,
            remote,
            address,
            background=background,
            on_source_lost=on_source_lost,
            pause_timeout_s=pause_timeout_s,
            fail=fail,
            rpc_latency=rpc_latency,
            compression=compression,
        )
        self.size = remote.size
        self.zero_map = remote.zero_map
        self.zero_map_page_size = remote.page_size
        self.local_fd = -1
        self.prefetch = prefetch
        self.native = native  # try the native data channel first
        self.tls = tls  # (cert, key, ca) paths: the channel is TLS 1.3, as gRPC is mTLS
        # the host's chunk cache, used once another session restores the same image: a
        # lone restore does not pay for copies nobody will read
        self.host_cache = cache
        self.on_channel = False
        self.grant: tuple[int, bytes] | None = None
        # the session's engine, kept until stop() so its working-set record can be read
        self.recorder: _uffd.Engine | None = None
        # a recorded working set fetched between session creation and attach, installed
        # before the engine serves its first fault
        self.stage: WorkingSetStage | None = None
        self.staging: asyncio.Task[None] | None = None

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
        staged = self.stage.bytes_received if self.stage is not None else 0
        return self.client.bytes_received + staged

    async def connect(self) -> None:
        """At session creation: join the image's sessions, and ask the peer for a native
        data channel before any workload attaches."""
        self._join_image()
        if self.native:
            try:
                self.grant = await self.client.open_channel(self.remote.name)
            except PeerError as exc:
                log.info("native channel not offered: %s", exc, extra=self._log_extra())
        replay = list(self._replay())
        if replay and self.host_cache is not None:  # staged up to the cache's size
            limit = self.host_cache.stats()["capacity"]
            self.stage = WorkingSetStage(self.remote, replay, limit, self._log_extra())
            self.staging = asyncio.ensure_future(self._stage(self.stage))

    async def _stage(self, stage: WorkingSetStage) -> None:
        if self.grant is not None:
            port, token = self.grant
            missing = await stage.over_native(self._host(), port, token, self.tls or ())
        else:
            missing = await stage.over_grpc(self._urgent())
        if missing:  # attach left them to staging, which did not bring them
            self._spawn(self._fetch(missing, _uffd.PREFETCH))

    def attach(self, session: Session) -> None:
        """Demand faults and bulk go over the engine's own TCP channel when the peer
        offers one (connected before the engine starts, so no fault goes the slow way);
        gRPC stays the fallback. A huge page larger than a chunk is gathered from its chunks
        (in the engine on the channel, in Python over gRPC) and installed whole."""
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
            if self.stage is not None:
                self.stage.attach(lambda index, data: self._install(index, data, _uffd.PREFETCH))
        if self.grant is None or engine is None:
            return
        cache = self.cache
        port, token = self.grant
        host = self._host()
        r = self.remote
        cert, key, ca = self.tls or (None, None, None)
        try:
            engine.attach_channel(
                host,
                port,
                token,
                r.chunk_size,
                r.size,
                r.page_size,
                r.zero_map,
                r.joined_digests,
                background=self.background,
                compression=self.compression == "zstd",
                fast_digests=r.joined_fast_digests or None,
                # what staging installed is skipped; the channel brings the rest
                working_set=self._replay(skip=self._staged()).tobytes() or None,
                tls_cert=cert,
                tls_key=key,
                tls_ca=ca,
            )
        except (OSError, ValueError) as exc:
            log.info("native channel not used: %s", exc, extra=self._log_extra())
            return
        self.on_channel = True
        if cache is not None:
            engine.share_cache(cache)
        extra = {**self._log_extra(), "port": port, "tls": self.tls is not None}
        log.info("native data channel open", extra=extra)

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

    def _host(self) -> str:
        """The peer's host: the native channel is dialled where gRPC was."""
        return self.address.rsplit(":", 1)[0].strip("[]")

    def _staged(self) -> set[int]:
        """Chunks staging brought or is still bringing: not asked for again."""
        stage = self.stage
        return stage.landed | stage.on_the_way if stage is not None else set()

    def _replay(self, skip: Collection[int] = ()) -> array.array[int]:
        """The recorded working set to install first (prefetch "working_set")."""
        if self.prefetch != "working_set":
            return array.array("Q")
        chunks, n = self.remote.working_set, self.remote.chunks
        return array.array("Q", (c for c in chunks if c < n and c not in skip))

    async def start(self, session: Session) -> None:
        self.session = session
        replay = self._replay(skip=self._staged())
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
        if self.stage is not None:
            self.stage.close()
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
