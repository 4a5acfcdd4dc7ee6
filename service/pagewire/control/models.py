"""Request and response bodies of the REST API (pydantic; unknown fields rejected)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pagewire.exports.errors import NAME_PATTERN, NAME_RULE

SessionState = Literal["awaiting_attach", "running", "paused", "completed", "failed", "cancelled"]
ACTIVE_STATES = ("awaiting_attach", "running", "paused")
TIMESTAMP_FIELDS = ("created_at", "attached_at", "completed_at")


def rfc3339(value: object) -> object:
    """Epoch seconds as an RFC 3339 UTC string (the one timestamp style of the API)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="microseconds")
    return value


def epoch_seconds(value: object) -> float | None:
    """An RFC 3339 timestamp (or epoch seconds) as epoch seconds; None if absent."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def with_rfc3339(status: dict[str, Any]) -> dict[str, Any]:
    """A status dict with its epoch-second timestamps as RFC 3339 strings."""
    return {k: rfc3339(v) if k in TIMESTAMP_FIELDS else v for k, v in status.items()}


Timestamp = Annotated[str, BeforeValidator(rfc3339)]
ExportName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        description=f"export name: {NAME_RULE}",
        json_schema_extra={"pattern": NAME_PATTERN},
    ),
]


class Strict(BaseModel):
    """Unknown fields refused; no coercion ("yes" is not a boolean, "5" not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise PydanticCustomError("invalid_path", "a path may not contain a NUL byte")
    return value


FilePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]


class PathSource(Strict):
    path: FilePath


class PeerSource(Strict):
    peer: str = Field(min_length=3, max_length=512, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
    export: ExportName


class NodeSource(Strict):
    node: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.\-]*)$")
    export: ExportName


class SocketOptions(Strict):
    uid: int | None = Field(default=None, ge=0, le=2**32 - 2)
    gid: int | None = Field(default=None, ge=0, le=2**32 - 2)
    mode: str = Field(default="0600", pattern=r"^0?[0-7]{3}$")

    @field_validator("mode")
    @classmethod
    def _no_world(cls, value: str) -> str:
        if int(value, 8) & 0o007:
            raise ValueError("the socket may not be open to every user (mode xx0 at most)")
        return value


def _source_kind(value: object) -> str | None:
    keys = value if isinstance(value, dict) else vars(value) if isinstance(value, BaseModel) else {}
    return next((k for k in ("path", "peer", "node") if k in keys), None)


Source = Annotated[
    Annotated[PathSource, Tag("path")]
    | Annotated[PeerSource, Tag("peer")]
    | Annotated[NodeSource, Tag("node")],
    Discriminator(
        _source_kind,
        custom_error_type="invalid_source",
        custom_error_message="source needs {path}, {peer, export} or {node, export}",
    ),
]


class SessionRequest(Strict):
    source: Source
    prefetch: Literal["around", "none", "working_set"] = "around"
    background: bool = True
    on_source_lost: Literal["wait", "sigbus"] = "wait"
    compression: Literal["none", "zstd"] = "none"
    pause_timeout_s: float = Field(default=30.0, gt=0, le=86400)
    attach_timeout_s: float = Field(default=60.0, gt=0, le=86400)
    socket: SocketOptions | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str


class Faults(BaseModel):
    local: int
    remote: int
    zero: int


class Latency(BaseModel):
    p50: float | None
    p99: float | None
    max: float | None


class SessionStatus(BaseModel):
    id: str
    state: SessionState
    source: dict[str, str]
    socket: str
    pages_total: int
    pages_present: int
    pages_zero: int
    pages_removed: int
    faults: Faults
    pages_prefetched: int
    pages_background: int
    bytes_received: int
    fault_latency_seconds: Latency
    created_at: Timestamp
    attached_at: Timestamp | None
    completed_at: Timestamp | None
    error: ErrorInfo | None
    workload_pid: int | None = None
    page_size: int | None = None
    transport: Literal["local", "grpc", "native"] = "local"


class SessionList(BaseModel):
    sessions: list[SessionStatus]


class ProcessRange(Strict):
    start: int = Field(ge=0, lt=1 << 57)
    size: int = Field(gt=0, le=1 << 40)


class ExportRequest(Strict):
    """A file under an export root ({name, path}), or a running process's memory
    ({name, pid} for all its private writable memory, or with listed ranges)."""

    name: ExportName
    path: FilePath | None = None
    pid: int | None = Field(default=None, gt=0, le=1 << 22)
    ranges: list[ProcessRange] | None = Field(default=None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _one_source(self) -> ExportRequest:
        if (self.path is None) == (self.pid is None):
            raise ValueError("give exactly one of path or pid")
        if self.ranges is not None and self.pid is None:
            raise ValueError("ranges go with pid")
        return self


class SnapshotRequest(Strict):
    """A live snapshot: the file it is written to (under an export root) and the name of
    the export it becomes."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    path: FilePath
    attach_timeout_s: float = Field(default=60.0, gt=0, le=86400)
