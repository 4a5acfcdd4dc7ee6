"""Who is asking, and may they: a peer's identity (its certificate's SANs under mTLS, else
its address), the SAN allowlist (--peer-allow), the bearer token of plain-text peers, and
the audit line written for every peer call."""

from __future__ import annotations

import fnmatch
import hmac
import logging
from typing import Any

import grpc

from pagewire.peer.flow import PeerLimits
from pagewire.peer.status import Abort
from pagewire.peer.wire import host_is_loopback

# the name it logged under before the split, so audit lines stay the same
log = logging.getLogger("pagewire.peer.server")


def authenticate(context: grpc.aio.ServicerContext, limits: PeerLimits) -> str:
    """The peer's identity once it is authenticated and allowed; raises
    UNAUTHENTICATED or PERMISSION_DENIED."""
    identity = peer_identity(context)
    if identity.startswith("san:"):
        sans = identity[4:].split(",")
        allow = limits.allow
        if allow and not any(fnmatch.fnmatchcase(n, p) for n in sans for p in allow):
            raise Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"peer certificate {sans} matches no --peer-allow entry",
            )
        return identity
    token = limits.token
    host = identity[3:]  # a bare host (no port), or a unix: address
    loopback = host.startswith(("unix:", "unix-abstract:")) or host_is_loopback(host)
    if token is not None and not (limits.anonymous_loopback and loopback):
        if not _bearer_ok(context.invocation_metadata(), token):
            raise Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this agent has a token: peers send it as 'authorization: Bearer <token>'",
            )
    return identity


def peer_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: "san:" and its certificate's SANs under mTLS, else "ip:" and its
    address (not yet checked: see authenticate)."""
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


def audit(
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


def _peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest[1 : rest.find("]")] if rest.startswith("[") else rest.rpartition(":")[0]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer
