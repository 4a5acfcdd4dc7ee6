"""Where a session's pages come from: the Source protocol, the local file source, and the
type of the factory that opens a source on a peer."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pagewire import _uffd
from pagewire.control.models import PathSource, SessionRequest
from pagewire.core.errors import InvalidRequest
from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.core.paths import open_beneath

if TYPE_CHECKING:
    from pagewire.sessions.session import Session


class Source(Protocol):
    """Where a session's pages come from."""

    size: int
    zero_map: bytes  # one byte per page of zero_map_page_size, 1 = zero
    zero_map_page_size: int
    local_fd: int  # >= 0 when the engine reads the image itself

    @property
    def transport(self) -> str: ...  # "local", or where a peer's data flows now

    def describe(self) -> dict[str, str]: ...
    async def connect(self) -> None: ...
    def attach(self, session: Session) -> None: ...
    async def start(self, session: Session) -> None: ...
    def on_requests(self, session: Session, offsets: list[int]) -> None: ...
    async def stop(self) -> None: ...
    def bytes_received(self) -> int: ...


def is_remote(request: SessionRequest) -> bool:
    """Its pages come from a peer (they cross the network)."""
    return not isinstance(request.source, PathSource)


# opens the source of a peer or node request (the agent's composition root provides it)
SourceFactory = Callable[[SessionRequest], Awaitable[Source]]


class PassiveSource:
    """A source Python has nothing to do for: every hook is a no-op."""

    size = 0
    zero_map = b""
    zero_map_page_size = 0
    local_fd = -1
    transport = "local"

    def describe(self) -> dict[str, str]:
        return {}

    async def connect(self) -> None:
        return None

    def attach(self, session: Session) -> None:
        return None

    async def start(self, session: Session) -> None:
        return None

    def on_requests(self, session: Session, offsets: list[int]) -> None:
        return None

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        return None

    def bytes_received(self) -> int:
        return 0


class LocalSource(PassiveSource):
    """A file under an export root: the engine reads it with pread, Python does nothing."""

    def __init__(self, path: Path, fd: int, size: int, zero_map: bytes) -> None:
        self.path = path
        self.local_fd = fd
        self.size = size
        self.zero_map = zero_map
        self.zero_map_page_size = SYSTEM_PAGE_SIZE

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def close(self) -> None:
        if self.local_fd >= 0:
            os.close(self.local_fd)
            self.local_fd = -1


def open_local_source(path: str, roots: list[Path]) -> LocalSource:
    """A local image, opened beneath an export root (paths.open_beneath); blocking."""
    opened = open_beneath(roots, path)
    fd = opened.fd
    try:
        size = os.fstat(fd).st_size
        if size == 0 or size % SYSTEM_PAGE_SIZE:
            raise InvalidRequest(
                "invalid_image", f"{path}: size must be a positive multiple of the page size"
            )
        return LocalSource(opened.path, fd, size, _uffd.zero_map(fd, size, SYSTEM_PAGE_SIZE))
    except BaseException:
        os.close(fd)
        raise
