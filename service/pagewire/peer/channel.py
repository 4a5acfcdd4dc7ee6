"""The source side of the native data channel: exports registered with the C server and
one-session grants handed out over gRPC (OpenChannel).

Under mTLS the channel is TLS 1.3 with the agent's own certificate, key and CA: the client
checks the source's certificate names the host it dialled, the source checks the client's
chains to the CA and matches --peer-allow, then the token is checked as on plain text.

A grant is a random 16-byte token good for one urgent and one bulk connection until it
expires. Grants are bounded per peer and in all; they are indexed by token (here and in C)
and by export, so expiry and withdraw never scan every grant."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from pagewire import _uffd
from pagewire.exports.errors import ExportInvalid, ExportStale
from pagewire.exports.export import Export


class ChannelBusy(Exception):
    """Too many grants (per peer or in all): gRPC status RESOURCE_EXHAUSTED."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ChannelLimits:
    max_conns: int = 256
    peer_conns: int = 128
    pending_per_peer: int = 16
    hello_timeout_s: float = 2.0
    grants: int = 4096
    peer_grants: int = 256
    # a grant is made at session creation and used when the workload attaches
    grant_ttl_s: float = 60.0


@dataclass
class _Grant:
    expires: float
    peer: str
    export: str


class ChannelServer:
    def __init__(
        self,
        host: str,
        port: int = 0,
        limits: ChannelLimits | None = None,
        *,
        tls: tuple[str, str, str] | None = None,
        allow: list[str] | None = None,
    ) -> None:
        """Listen on host:port; with tls (cert, key, CA paths) every connection is TLS 1.3
        and the client's certificate must chain to the CA and match allow (--peer-allow)."""
        cert, key, ca = tls or (None, None, None)
        self.tls = tls is not None
        try:
            self.server = _uffd.DataServer(host, port, cert, key, ca, tuple(allow or ()))
        except OSError as exc:
            if exc.strerror is None:  # the module's own message names the port and cause
                raise
            raise OSError(
                exc.errno, f"native data channel: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        self.limits = limits or ChannelLimits()
        self.server.set_limits(
            self.limits.max_conns,
            self.limits.peer_conns,
            self.limits.pending_per_peer,
            max(1, round(self.limits.hello_timeout_s * 1000)),
        )
        self.ids: dict[tuple[str, str], int] = {}
        self._free_ids: list[int] = []
        self.grants: dict[bytes, _Grant] = {}
        self._by_expiry: deque[tuple[float, bytes]] = deque()
        self._by_peer: Counter[str] = Counter()
        self._by_export: dict[str, set[bytes]] = {}
        # grant runs on the event loop, withdraw wherever the registry's caller runs
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server.port

    def _new_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop()
        return len(self.ids) + len(self._free_ids)

    def _register(self, export: Export) -> int:
        key = (export.name, export.generation)
        if key in self.ids:
            return self.ids[key]
        fd = os.open(export.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not export.identity.matches(fd):
                export.mark_stale()
                raise ExportStale(f"export {export.name!r} is stale: its file changed")
            export_id = self._new_id()
            self.server.add_export(
                export_id, fd, export.size, export.page_size, export.chunk_size, export.zero_map
            )
        finally:
            os.close(fd)
        self.ids[key] = export_id
        return export_id

    def grant(self, export: Export, peer: str = "") -> tuple[int, bytes]:
        if not export.backed_by_file:
            raise ExportInvalid("a live process export is served over gRPC only")
        export.check()
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            self._check_room(peer)
            export_id = self._register(export)
            token = secrets.token_bytes(16)
            self.server.grant(token, export_id, self.limits.grant_ttl_s)
            expires = now + self.limits.grant_ttl_s
            self.grants[token] = _Grant(expires, peer, export.name)
            self._by_expiry.append((expires, token))
            self._by_peer[peer] += 1
            self._by_export.setdefault(export.name, set()).add(token)
        return self.port, token

    def _check_room(self, peer: str) -> None:
        if len(self.grants) >= self.limits.grants:
            raise ChannelBusy(
                f"{len(self.grants)} native channel grants are live, the limit "
                "(--channel-grants); use gRPC or retry when some expire"
            )
        if self._by_peer[peer] >= self.limits.peer_grants:
            raise ChannelBusy(
                f"peer {peer} holds {self._by_peer[peer]} native channel grants, the limit "
                "(--channel-peer-grants)"
            )

    def _expire(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now:
            _, token = self._by_expiry.popleft()
            if self._forget(token):
                self.server.revoke(token)

    def _forget(self, token: bytes) -> bool:
        grant = self.grants.pop(token, None)
        if grant is None:
            return False
        self._by_peer[grant.peer] -= 1
        if self._by_peer[grant.peer] <= 0:
            del self._by_peer[grant.peer]
        tokens = self._by_export.get(grant.export)
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self._by_export[grant.export]
        return True

    def withdraw(self, export: Export) -> None:
        """The export is withdrawn: its fd closes, its grants are revoked and its live
        connections dropped (the C server does all three for each registered id)."""
        with self._lock:
            for key in [k for k in self.ids if k[0] == export.name]:
                export_id = self.ids.pop(key)
                self.server.remove_export(export_id)
                self._free_ids.append(export_id)
            for token in list(self._by_export.get(export.name, ())):
                self._forget(token)

    def bytes_sent(self) -> int:
        return self.server.stats()["bytes_sent"]

    def stats(self) -> dict[str, int]:
        return {**self.server.stats(), **self.server.limit_stats()}

    def close(self) -> None:
        self.server.close()
