"""An export: a named, read-only memory image this agent serves to peers.

Serving re-checks the file's identity (exports/identity.py) with fstat on every read: a
changed file marks the export stale and it refuses to serve (DESIGN.md section 5,
integrity). The record is what the registry keeps as JSON under
<state_dir>/exports/<name>.json.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.exports.chunks import (
    DIGEST_ALGORITHM,
    DIGEST_LEN,
    FAST_DIGEST_ALGORITHM,
    FAST_DIGEST_LEN,
    ChunkGeometry,
    pack_bits,
    unpack_bits,
)
from pagewire.exports.errors import ChunkOutOfRange, ExportNotFound, ExportStale, ExportVerifying
from pagewire.exports.identity import FileIdentity

# the name it logged under before the split, so log lines stay the same
log = logging.getLogger("pagewire.exports.registry")

RECORD_VERSION = 1
STATE_READY = "ready"
STATE_STALE = "stale"
STATE_VERIFYING = "verifying"  # reloaded after a restart, its digests being computed again


@dataclass(eq=False)
class Export(ChunkGeometry):
    # a file the agent can reopen (records persist, the native channel serves it); a live
    # process export is neither
    backed_by_file: ClassVar[bool] = True
    name: str
    path: str
    size: int
    page_size: int
    chunk_size: int
    zero_map: bytes  # one byte per page, 1 = the page is all zero
    digests: list[bytes]
    identity: FileIdentity
    created_at: float
    state: str = STATE_READY
    working_set: list[int] = field(default_factory=list)
    # xxh3-128 per chunk (empty for a record from before it existed: peers check sha256)
    fast_digests: list[bytes] = field(default_factory=list, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _on_stale: Callable[[Export], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _readers: int = field(default=0, repr=False)
    _closed: bool = field(default=False, repr=False)
    _bitmap: bytes | None = field(default=None, repr=False)

    @property
    def zero_bitmap(self) -> bytes:
        """The zero map as an LSB-first bitmap, 1 bit per page (the proto form)."""
        if self._bitmap is None:
            self._bitmap = pack_bits(self.zero_map)
        return self._bitmap

    @property
    def generation(self) -> str:
        return self.identity.generation(self.name)

    def to_json(self) -> dict[str, Any]:
        self.refresh_state()
        return {
            "name": self.name,
            "path": self.path,
            "size": self.size,
            "page_size": self.page_size,
            "chunk_size": self.chunk_size,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "chunks": self.chunks,
            "state": self.state,
            "created_at": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
        }

    # --- serving ---

    def check(self) -> None:
        """Raise ExportStale unless the open file is still the published one (ExportVerifying
        while it is verified after a restart)."""
        if self.state == STATE_VERIFYING:
            raise ExportVerifying(f"export {self.name!r} is being verified after a restart")
        if self.state != STATE_READY:
            raise ExportStale(f"export {self.name!r} is stale: its file changed")
        if self._fd is None:
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: its file cannot be opened")
        if not self.identity.matches(self._fd):
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: its file changed")

    def refresh_state(self) -> None:
        """Check identity on read, so a changed file shows stale before a peer tries it."""
        if self.state == STATE_READY and not self._closed:
            try:
                self.check()
            except (ExportStale, ExportVerifying):
                pass

    def mark_stale(self) -> None:
        with self._lock:
            if self.state == STATE_STALE:
                return
            self.state = STATE_STALE
        log.warning("export %s is stale: %s changed since it was published", self.name, self.path)
        if self._on_stale is not None:
            self._on_stale(self)

    def recheck_chunk(self, index: int) -> bool:
        """A peer complained that this chunk failed its digest: read it again from the
        file and hash it; the export is marked stale if the file no longer matches what
        was published (disk corruption keeps size and mtime). True if it still matches."""
        self._check_index(index)
        length = self.chunk_len(index)
        data = self._read(length, lambda fd: os.pread(fd, length, index * self.chunk_size))
        if hashlib.sha256(data).digest() == self.digests[index]:
            return True
        log.warning("export %s: chunk %d no longer matches its digest", self.name, index)
        self.mark_stale()
        return False

    def read_chunk(self, index: int) -> bytes:
        """The chunk's non-zero pages, concatenated in order (empty for a zero chunk)."""
        runs = self._data_runs(index)
        want = sum(n for _, n in runs)
        return self._read(want, lambda fd: b"".join(os.pread(fd, n, off) for off, n in runs))

    def read_chunk_full(self, index: int) -> bytes:
        """The whole chunk, zero pages included."""
        self._check_index(index)
        first, last = self.chunk_pages(index)
        off, length = first * self.page_size, (last - first) * self.page_size
        return self._read(length, lambda fd: os.pread(fd, length, off))

    def _data_runs(self, index: int) -> list[tuple[int, int]]:
        """(offset, length) of each run of non-zero pages in a chunk."""
        self._check_index(index)
        first, last = self.chunk_pages(index)
        ps = self.page_size
        runs: list[tuple[int, int]] = []
        page = first
        while page < last:
            start = self.zero_map.find(0, page, last)
            if start < 0:
                break
            stop = self.zero_map.find(1, start, last)
            stop = last if stop < 0 else stop
            runs.append((start * ps, (stop - start) * ps))
            page = stop
        return runs

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.chunks:
            raise ChunkOutOfRange(
                f"chunk {index} out of range: export {self.name!r} has {self.chunks} chunks"
            )

    def _read(self, length: int, reader: Callable[[int], bytes]) -> bytes:
        fd = self._acquire()
        try:
            self.check()
            data = reader(fd)
            self.check()  # a write during the read would otherwise go out as published data
        finally:
            self._release()
        if len(data) != length:
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: short read")
        return data

    def _acquire(self) -> int:
        with self._lock:
            if self._closed or self._fd is None:
                raise ExportNotFound(f"export {self.name!r} was withdrawn")
            self._readers += 1
            return self._fd

    def _release(self) -> None:
        with self._lock:
            self._readers -= 1
            self._close_if_idle()

    def close(self) -> None:
        """Close the file once no read is in flight."""
        with self._lock:
            self._closed = True
            self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closed and self._readers == 0 and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- persistence ---

    def record(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "name": self.name,
            "path": self.path,
            "size": self.size,
            "page_size": self.page_size,
            "chunk_size": self.chunk_size,
            "identity": {
                "dev": self.identity.dev,
                "ino": self.identity.ino,
                "size": self.identity.size,
                "mtime_ns": self.identity.mtime_ns,
            },
            "zero_bitmap": base64.b64encode(self.zero_bitmap).decode(),
            "digest_algorithm": DIGEST_ALGORITHM,
            "digests": [d.hex() for d in self.digests],
            "fast_digest_algorithm": FAST_DIGEST_ALGORITHM,
            "fast_digests": [d.hex() for d in self.fast_digests],
            "state": self.state,
            "working_set": self.working_set,
            "created_at": self.created_at,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Export:
        if rec.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {rec.get('version')!r}")
        size, page_size = int(rec["size"]), int(rec["page_size"])
        exp = cls(
            name=str(rec["name"]),
            path=str(rec["path"]),
            size=size,
            page_size=page_size,
            chunk_size=int(rec["chunk_size"]),
            zero_map=unpack_bits(base64.b64decode(rec["zero_bitmap"]), size // page_size),
            digests=[bytes.fromhex(d) for d in rec["digests"]],
            identity=FileIdentity(**{k: int(v) for k, v in rec["identity"].items()}),
            created_at=float(rec["created_at"]),
            state=str(rec["state"]),
            working_set=[int(c) for c in rec.get("working_set", [])],
        )
        if len(exp.digests) != exp.chunks or any(len(d) != DIGEST_LEN for d in exp.digests):
            raise ValueError("digest list does not match the export's geometry")
        if page_size != SYSTEM_PAGE_SIZE or size <= 0 or size % page_size:
            raise ValueError(f"size {size} or page size {page_size} does not fit this host")
        if exp.chunk_size < page_size or exp.chunk_size & (exp.chunk_size - 1):
            raise ValueError(f"chunk size {exp.chunk_size} is not a power of two")
        if any(not 0 <= c < exp.chunks for c in exp.working_set):
            raise ValueError("the working set names chunks outside the export")
        if rec.get("fast_digest_algorithm") == FAST_DIGEST_ALGORITHM:
            fast = [bytes.fromhex(d) for d in rec.get("fast_digests", [])]
            if len(fast) != exp.chunks or any(len(d) != FAST_DIGEST_LEN for d in fast):
                raise ValueError("fast digest list does not match the export's geometry")
            exp.fast_digests = fast
        return exp
