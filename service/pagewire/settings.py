"""Agent settings: every flag has a PAGEWIRE_* environment twin, validated at start."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAGEWIRE_", extra="forbid")

    http: str = "127.0.0.1:7070"
    grpc: str = "127.0.0.1:7071"
    advertise_grpc: str | None = None
    socket_dir: Path = Path("/run/pagewire/sessions")
    state_dir: Path = Path("/var/lib/pagewire")
    export_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_peers: bool = False
    node_name: str = Field(default_factory=socket.gethostname)
    peer_dns_pattern: str = "{node}:7071"
    max_sessions: int = Field(default=64, ge=1, le=4096)
    max_bytes_in_flight: int = Field(default=256 << 20, ge=1 << 20)
    max_regions: int = Field(default=256, ge=1, le=4096)
    max_session_bytes: int = Field(default=1 << 40, ge=1 << 20)
    native_channel: bool = True
    cache_bytes: int = Field(default=256 << 20, ge=0)
    cache_idle_s: float = Field(default=30.0, ge=0)
    data_port: int = Field(default=7072, ge=0, le=65535)
    chunk_size: int = Field(default=64 << 10, ge=4096, le=4 << 20)
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)
    shutdown_policy: Literal["fail", "handover"] = "fail"
    socket_group: int | None = Field(default=None, ge=0)
    retention_s: float = Field(default=3600.0, ge=0)
    allowed_uids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    log_json: bool = False
    log_level: str = "info"

    @field_validator("export_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(":") if p]
        return value

    @field_validator("allowed_uids", mode="before")
    @classmethod
    def _split_uids(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(u) for u in value.replace(",", " ").split()]
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
        host, _ = split_host_port(self.grpc)
        if not any(tls) and not self.insecure_peers and not is_loopback(host):
            raise ValueError(
                f"plain-text gRPC on {self.grpc} is not loopback: give --tls-cert/--tls-key/"
                "--tls-ca, or --insecure-peers"
            )
        self.export_roots = [Path(os.path.realpath(p)) for p in self.export_roots]
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        return self.token_file.read_text().strip() or None
