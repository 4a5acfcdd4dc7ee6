"""The gRPC status a failed peer call answers with: the one place an error of this agent
becomes a status for a peer (control/errors.py is its HTTP twin)."""

from __future__ import annotations

import logging

import grpc

from pagewire.exports.errors import (
    ChunkOutOfRange,
    ExportInvalid,
    ExportNotFound,
    ExportStale,
    ExportVerifying,
)
from pagewire.peer.channel import ChannelBusy

# the name it logged under before the split, so log lines stay the same
log = logging.getLogger("pagewire.peer.server")


class Abort(Exception):
    """End the call with this status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def grpc_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, Abort):
        return exc.code, exc.message
    if isinstance(exc, ChannelBusy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
    if isinstance(exc, ExportNotFound):
        return grpc.StatusCode.NOT_FOUND, exc.message
    if isinstance(exc, ChunkOutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE, exc.message
    if isinstance(exc, ExportVerifying):  # reloaded after a restart: retry shortly
        return grpc.StatusCode.UNAVAILABLE, exc.message
    if isinstance(exc, ExportStale):
        return grpc.StatusCode.FAILED_PRECONDITION, exc.message
    if isinstance(exc, ExportInvalid):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    log.exception("page service: unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
