"""What a call to a peer agent fails with (the client side of the page service)."""

from __future__ import annotations

import grpc


class PeerError(Exception):
    """A peer call failed; code is the gRPC status (None for local protocol errors)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> PeerError:
        return cls(f"{exc.code().name}: {exc.details()}", exc.code())


class PeerIntegrityError(PeerError):
    """The peer sent data that does not match what it published (chunk: which one, when
    it failed its digest)."""

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk
