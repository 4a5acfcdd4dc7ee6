"""What both ends of the page service agree on: its name, message and request limits, the
gRPC channel options, and the transport policy (mTLS, or plain text on loopback only)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

SERVICE_NAME = "pagewire.v1.PageService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CHUNKS_PER_REQUEST = 1024
# Bound on count * chunk_size of one urgent request, so its answer fits in one message.
MAX_URGENT_BYTES = 48 * 1024 * 1024
DEFAULT_BATCH_BYTES = 1024 * 1024
MAX_BATCH_BYTES = 8 * 1024 * 1024

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


# --- transport security ------------------------------------------------------------


def host_is_loopback(host: str) -> bool:
    """True if a host name or IP address is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_is_loopback(address: str) -> bool:
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
    if not insecure_peers and not address_is_loopback(address):
        raise ValueError(
            f"plain-text gRPC on {address} is allowed only on loopback: "
            "give tls_cert, tls_key and tls_ca (mTLS), or insecure_peers=True"
        )


# A destination that got a chunk failing its digest names it in this metadata key on a
# Describe call; the source re-reads and re-hashes at most this many of them.
SUSPECT_METADATA = "pagewire-suspect-chunks"
MAX_SUSPECTS = 16
