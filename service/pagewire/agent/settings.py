"""Agent settings: every flag has a PAGEWIRE_* environment twin, validated at start."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pagewire.peer.wire import host_is_loopback


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PAGEWIRE_", extra="forbid", use_attribute_docstrings=True
    )

    http: str = "127.0.0.1:7070"
    """HOST:PORT (or unix:/path) of the REST API"""
    grpc: str = "127.0.0.1:7071"
    """HOST:PORT of the peer gRPC service"""
    advertise_grpc: str | None = None
    """gRPC address peers should use to reach this agent"""
    socket_dir: Path = Path("/run/pagewire/sessions")
    """directory of session sockets"""
    state_dir: Path = Path("/var/lib/pagewire")
    """directory of export and session records"""
    export_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """directory exports and local sources must lie under; repeatable (the env twin is
    colon-separated)"""
    token_file: Path | None = None
    """file holding the REST bearer token"""
    _token: str | None = PrivateAttr(default=None)
    tls_cert: Path | None = None
    """PEM certificate for peer mTLS"""
    tls_key: Path | None = None
    """PEM key for peer mTLS"""
    tls_ca: Path | None = None
    """PEM CA bundle peers are checked against"""
    insecure_peers: bool = False
    """allow plain-text gRPC off loopback"""
    node_name: str = Field(default_factory=socket.gethostname)
    """this node's name"""
    peer_dns_pattern: str = "{node}:7071"
    """how a node name becomes a gRPC address, e.g. '{node}.pagewire.pagewire.svc:7071'"""
    max_sessions: int = Field(default=64, ge=1, le=4096)
    """concurrent sessions (429 too_many_sessions beyond)"""
    max_bytes_in_flight: int = Field(default=256 << 20, ge=1 << 20)
    """bytes fetched from peers but not yet installed"""
    max_regions: int = Field(default=256, ge=1, le=4096)
    """memory regions one handoff may carry"""
    max_session_bytes: int = Field(default=1 << 40, ge=1 << 20)
    """bytes one session may restore"""
    native_channel: bool = True
    """carry page data over the native data channel (TLS 1.3 under mTLS), else gRPC only"""
    cache_bytes: int = Field(default=256 << 20, ge=0)
    """per-host chunk cache shared by sessions, 0 to turn it off"""
    cache_idle_s: float = Field(default=30.0, ge=0)
    """seconds an unused cache entry is kept"""
    data_port: int = Field(default=7072, ge=0, le=65535)
    """TCP port of the native data channel, 0 for any; peers dial it on the host they
    dialled for gRPC"""
    chunk_size: int = Field(default=64 << 10, ge=4096, le=4 << 20)
    """chunk size of new exports in bytes (a power of two)"""
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)
    """seconds running sessions get on SIGTERM"""
    shutdown_policy: Literal["fail", "handover"] = "fail"
    """after the grace period: fail what is left (SIGBUS), or leave it registered for the next
    agent to take back"""
    socket_group: int | None = Field(default=None, ge=0)
    """gid allowed to enter the socket dir, then mode 0710"""
    retention_s: float = Field(default=3600.0, ge=0)
    """seconds ended sessions are kept"""
    allowed_uids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    """uid allowed to hand over a uffd (SO_PEERCRED); repeatable (the env twin is
    comma-separated)"""
    log_json: bool = False
    """JSON logs, one object a line"""
    log_level: str = "info"
    """debug, info or warning"""
    max_exports: int = Field(default=1024, ge=1, le=65536)
    """exports held open at once; more answer 429 too_many_exports"""
    max_snapshots: int = Field(default=16, ge=1, le=4096)
    """snapshots awaiting attach or copying at once; more answer 429 too_many_snapshots"""
    file_work_threads: int = Field(default=4, ge=1, le=64)
    """threads that open and hash files under the export roots"""
    file_work_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    """seconds a request waits for opening or hashing a file (503 file_work_timeout)"""
    live_export_uids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    """uid whose processes may be frozen and exported live; repeatable; none by default"""
    # the REST front door (httpguard.py): bounds a client meets before any route runs
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    """largest REST request body (413 body_too_large)"""
    http_body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """seconds a REST body may take to arrive (408 body_timeout)"""
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """seconds a REST request's headers may take to arrive (408 header_timeout)"""
    http_idle_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    """seconds an idle keep-alive REST connection stays open"""
    max_http_connections: int = Field(default=1024, ge=1, le=65536)
    """open REST connections, all clients together (lowered to half the fd limit)"""
    max_http_connections_per_client: int = Field(default=256, ge=1, le=65536)
    """open REST connections from one client address"""
    http_backlog: int = Field(default=1024, ge=1, le=65535)
    """REST listen backlog: connections the kernel queues for the agent"""
    log_repeat_limit: int = Field(default=10, ge=0)
    """lines a minute one repeated log message may write, 0 for no limit"""
    # peer service (gRPC): page bytes read for peers and not yet sent, per stream, per peer
    # and for the agent; concurrent streams per peer; how long a taker waits
    serve_stream_bytes: int = Field(default=16 << 20, ge=1 << 20)
    """page bytes one peer stream may have read and not yet sent"""
    serve_peer_bytes: int = Field(default=64 << 20, ge=1 << 20)
    """page bytes in flight to one peer"""
    serve_bytes: int = Field(default=256 << 20, ge=1 << 20)
    """page bytes in flight to all peers"""
    serve_peer_streams: int = Field(default=64, ge=1, le=65536)
    """concurrent Bulk and Urgent streams per peer (RESOURCE_EXHAUSTED beyond)"""
    serve_wait_s: float = Field(default=10.0, gt=0, le=3600)
    """seconds a stream waits for the peer or agent budget, then RESOURCE_EXHAUSTED"""
    # native data channel (source side): connections, hello deadline, grants
    channel_max_conns: int = Field(default=256, ge=2, le=1024)
    """native data channel connections in all"""
    channel_peer_conns: int = Field(default=128, ge=2, le=1024)
    """native data channel connections per peer address"""
    channel_pending_per_peer: int = Field(default=16, ge=1, le=1024)
    """data connections per peer address still waiting to say hello"""
    channel_hello_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """seconds a data connection has to say hello"""
    channel_grants: int = Field(default=4096, ge=1, le=1 << 20)
    """unused native channel grants in all"""
    channel_peer_grants: int = Field(default=256, ge=1, le=1 << 20)
    """unused native channel grants per peer"""
    channel_grant_ttl_s: float = Field(default=60.0, gt=0, le=3600)
    """seconds a native channel grant lives"""
    # who may read: certificate SANs allowed (mTLS), anonymous loopback reads (no token)
    peer_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """certificate SAN (DNS name, IP, URI; * wildcards) allowed to read exports over mTLS;
    repeatable; any certificate of the CA when empty"""
    peer_anonymous_loopback: bool = False
    """with --token-file, still let loopback peers read without the token"""
    working_set_interval_s: float = Field(default=10.0, ge=0, le=86400)
    """seconds between working-set changes accepted per export"""

    @field_validator("export_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(":") if p]
        return value

    @field_validator("allowed_uids", "live_export_uids", mode="before")
    @classmethod
    def _split_uids(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(u) for u in value.replace(",", " ").split()]
        return value

    @field_validator("peer_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        if isinstance(value, str):
            return value.replace(",", " ").split()
        return value

    @field_validator("http")
    @classmethod
    def _http_address(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value[5:].startswith("/"):
                raise ValueError("unix socket paths must be absolute (unix:/path)")
            return value
        split_host_port(value)
        return value

    @field_validator("grpc")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("chunk_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("chunk_size must be a power of two")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(tls) and not all(tls):
            raise ValueError("--tls-cert, --tls-key and --tls-ca go together")
        for path in [p for p in tls if p] + ([self.token_file] if self.token_file else []):
            if not path.is_file():
                raise ValueError(f"{path} does not exist")
        if self.token_file is not None:
            self._token = read_token(self.token_file)
        host, _ = split_host_port(self.grpc)
        if not any(tls) and not self.insecure_peers and not host_is_loopback(host):
            raise ValueError(
                f"plain-text gRPC on {self.grpc} is not loopback: give --tls-cert/--tls-key/"
                "--tls-ca, or --insecure-peers"
            )
        for root in self.export_roots:
            if not root.is_dir():
                raise ValueError(f"export root {root} is not a directory")
        if self.peer_allow and not any(tls):
            raise ValueError("--peer-allow names certificate SANs: it needs mTLS (--tls-*)")
        self.export_roots = [Path(os.path.realpath(p)) for p in self.export_roots]
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def token(self) -> str | None:
        """The bearer token, read once when the settings were checked."""
        return self._token


def read_token(path: Path) -> str:
    """The bearer token in path; an empty or unreadable file stops the agent (never auth off)."""
    try:
        token = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"token file {path} cannot be read as UTF-8 text: {exc}") from None
    if not token:
        raise ValueError(
            f"token file {path} is empty: put a token in it, or omit --token-file for no auth"
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"token file {path}: the token must be one word of printable text")
    return token
