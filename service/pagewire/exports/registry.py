"""Exports: named, read-only memory images this agent serves to peers.

Publishing scans the file once (pread in chunk-size pieces, holes skipped with
SEEK_DATA/SEEK_HOLE) to build the zero-page map and, per chunk, a sha256 digest (the
export's identity and the chunk cache's key) and an XXH3-128 digest (what destinations check
every chunk against on the hot path; README "Integrity"). The
record is kept as JSON under <state_dir>/exports/<name>.json. Serving re-checks the file's
identity (device, inode, size, mtime) with fstat on every read: a changed file marks the
export stale and it refuses to serve (DESIGN.md section 5, integrity).
"""

from __future__ import annotations

import base64
import builtins
import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pagewire import _uffd
from pagewire.core.paths import BeneathFile, PathError, open_beneath

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_CHUNK_SIZE = 64 * 1024
DIGEST_ALGORITHM = "sha256"
FAST_DIGEST_ALGORITHM = "xxh3-128"
FAST_DIGEST_LEN = 16
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
RECORD_VERSION = 1
STATE_READY = "ready"
STATE_STALE = "stale"
STATE_VERIFYING = "verifying"  # reloaded after a restart, its digests being computed again


class ExportError(Exception):
    """Base of the errors the REST and gRPC layers map to a status."""

    code = "export_error"
    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ExportNotFound(ExportError, LookupError):
    code = "export_not_found"
    http_status = 404


class ExportExists(ExportError):
    code = "export_exists"
    http_status = 409


class ExportLimit(ExportError):
    code = "too_many_exports"
    http_status = 429


class ExportInvalid(ExportError, ValueError):
    code = "export_invalid"
    http_status = 400


class ExportStale(ExportError):
    code = "export_stale"
    http_status = 409


class ExportVerifying(ExportStale):
    code = "export_verifying"


class StateUnwritable(ExportError):
    """The export's record cannot be written (read-only state dir, ENOSPC)."""

    code = "state_unwritable"
    http_status = 503


class ChunkOutOfRange(ExportError, IndexError):
    code = "chunk_out_of_range"
    http_status = 400


# --- bitmaps -------------------------------------------------------------------------
# Bitmaps are LSB-first: bit i lives in byte i // 8 at position i % 8. That is exactly
# the little-endian byte form of the integer sum(flag_i << i), which lets int() and
# format() do the packing in C instead of a Python loop per bit.

_TO_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def pack_bits(flags: bytes) -> bytes:
    """One byte per item (0 or 1) -> LSB-first bitmap of ceil(len / 8) bytes."""
    if not flags:
        return b""
    digits = flags.translate(_TO_DIGITS)[::-1]
    return int(digits, 2).to_bytes((len(flags) + 7) // 8, "little")


def unpack_bits(bitmap: bytes, count: int) -> bytes:
    """LSB-first bitmap -> one byte per item (0 or 1); bits past count are ignored."""
    if count == 0:
        return b""
    if len(bitmap) * 8 < count:
        raise ValueError(f"bitmap of {len(bitmap)} bytes cannot hold {count} bits")
    value = int.from_bytes(bitmap, "little") & ((1 << count) - 1)
    return format(value, "b").zfill(count)[::-1].encode().translate(_FROM_DIGITS)


def bitmap_len(count: int) -> int:
    return (count + 7) // 8


# --- file identity and scanning ------------------------------------------------------


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def generation(self, name: str) -> str:
        raw = f"{name}:{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges that may hold data; everything else is a hole (reads as zero)."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)]  # file system without SEEK_DATA: treat all as data
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= size:
            break
        extents.append((start, end))
        pos = end
    return extents


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ExportInvalid(f"file shrank while being read (offset {offset})")
    return data


class _Scanner:
    """Walks a file chunk by chunk, reading only the data extents."""

    def __init__(self, fd: int, size: int, page_size: int, chunk_size: int) -> None:
        self.fd, self.size, self.page_size, self.chunk_size = fd, size, page_size, chunk_size
        self.extents = _data_extents(fd, size)
        self._ext = 0
        self._zero_page = bytes(page_size)
        self._zero_digests: dict[int, tuple[bytes, bytes]] = {}

    def chunk(self, offset: int) -> tuple[bytes, bytes, bytes]:
        """(zero flags per page, sha256, xxh3-128) of the chunk at offset."""
        end = min(offset + self.chunk_size, self.size)
        pages = (end - offset) // self.page_size
        ranges = self._ranges(offset, end)
        if not ranges:
            return b"\x01" * pages, *self._zero_digest(end - offset)
        if ranges == [(offset, end)]:
            data: bytes | bytearray = _pread_exact(self.fd, end - offset, offset)
        else:
            buf = bytearray(end - offset)
            for start, stop in ranges:
                buf[start - offset : stop - offset] = _pread_exact(self.fd, stop - start, start)
            data = buf
        return self._zero_flags(data, pages), hashlib.sha256(data).digest(), _uffd.xxh128(data)

    def _ranges(self, offset: int, end: int) -> list[tuple[int, int]]:
        """Data extents clipped to [offset, end); chunks are visited in increasing order."""
        while self._ext < len(self.extents) and self.extents[self._ext][1] <= offset:
            self._ext += 1
        out = []
        i = self._ext
        while i < len(self.extents) and self.extents[i][0] < end:
            start, stop = self.extents[i]
            out.append((max(start, offset), min(stop, end)))
            i += 1
        return out

    def _zero_flags(self, data: bytes | bytearray, pages: int) -> bytes:
        if data == bytes(len(data)):
            return b"\x01" * pages
        ps = self.page_size
        # slicing copies a page, but bytes == bytes is a memcmp; memoryview == is far slower
        return bytes(data[p * ps : (p + 1) * ps] == self._zero_page for p in range(pages))

    def _zero_digest(self, length: int) -> tuple[bytes, bytes]:
        if length not in self._zero_digests:
            zeros = bytes(length)
            self._zero_digests[length] = (hashlib.sha256(zeros).digest(), _uffd.xxh128(zeros))
        return self._zero_digests[length]


def scan_file(
    fd: int, size: int, page_size: int, chunk_size: int
) -> tuple[bytes, list[bytes], list[bytes]]:
    """Zero flags (one byte per page, 1 = all zero), sha256 and xxh3-128 per chunk of an
    open file."""
    scanner = _Scanner(fd, size, page_size, chunk_size)
    flags: list[bytes] = []
    digests: list[bytes] = []
    fast: list[bytes] = []
    for offset in range(0, size, chunk_size):
        zero, digest, fast_digest = scanner.chunk(offset)
        flags.append(zero)
        digests.append(digest)
        fast.append(fast_digest)
    return b"".join(flags), digests, fast


# --- the export ------------------------------------------------------------------------


class ChunkGeometry:
    """Pages and chunks of an image, from its size, page size, chunk size and zero map
    (one byte per page, 1 = all zero): the same arithmetic on both sides of the wire."""

    size: int
    page_size: int
    chunk_size: int
    zero_map: bytes

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    @property
    def pages_per_chunk(self) -> int:
        return self.chunk_size // self.page_size

    @property
    def chunks(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    @property
    def zero_pages(self) -> int:
        return self.zero_map.count(1)

    def chunk_pages(self, index: int) -> tuple[int, int]:
        """[first, last) page numbers of a chunk."""
        first = index * self.pages_per_chunk
        return first, min(first + self.pages_per_chunk, self.pages)

    def chunk_len(self, index: int) -> int:
        first, last = self.chunk_pages(index)
        return (last - first) * self.page_size

    def chunk_is_zero(self, index: int) -> bool:
        first, last = self.chunk_pages(index)
        return 0 not in self.zero_map[first:last]

    def chunk_data_len(self, index: int) -> int:
        """Bytes of non-zero pages in a chunk: what crosses the wire for it."""
        first, last = self.chunk_pages(index)
        return self.zero_map.count(0, first, last) * self.page_size


@dataclass(eq=False)
class Export(ChunkGeometry):
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
        """Raise ExportStale unless the open file is still the published one."""
        if self.state == STATE_VERIFYING:
            raise ExportVerifying(f"export {self.name!r} is being verified after a restart")
        if self.state != STATE_READY:
            raise ExportStale(f"export {self.name!r} is stale: its file changed")
        if self._fd is None:
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: its file cannot be opened")
        if FileIdentity.of(os.fstat(self._fd)) != self.identity:
            self.mark_stale()
            raise ExportStale(f"export {self.name!r} is stale: its file changed")

    def refresh_state(self) -> None:
        """Check identity on read, so a changed file shows stale before a peer tries it."""
        if self.state == STATE_READY and not self._closed:
            try:
                self.check()
            except ExportStale:
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
        if len(exp.digests) != exp.chunks or any(len(d) != 32 for d in exp.digests):
            raise ValueError("digest list does not match the export's geometry")
        if page_size != PAGE_SIZE or size <= 0 or size % page_size:
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


# --- the registry ----------------------------------------------------------------------


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportInvalid(
            f"invalid export name {name!r}: use 1-63 of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


class ExportRegistry:
    """All exports of this agent; thread-safe (publish runs in a worker thread)."""

    def __init__(
        self,
        state_dir: Path,
        export_roots: list[Path],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        max_exports: int = 1024,
        live_export_uids: builtins.list[int] | None = None,
    ) -> None:
        if chunk_size < PAGE_SIZE or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size {chunk_size} must be a power of two >= {PAGE_SIZE}")
        self.dir = Path(state_dir) / "exports"
        self.roots = [Path(os.path.realpath(r)) for r in export_roots]
        self.chunk_size = chunk_size
        self.max_exports = max_exports
        self.live_export_uids = list(live_export_uids or [])
        self._exports: dict[str, Export] = {}
        self._publishing: set[str] = set()
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        # called with each withdrawn export (the native channel revokes its grants)
        self.withdraw_hooks: builtins.list[Callable[[Export], None]] = []
        self._verifier: threading.Thread | None = None

    # --- queries ---

    def get(self, name: str) -> Export:
        with self._lock:
            exp = self._exports.get(name)
        if exp is None:
            raise ExportNotFound(f"no export named {name!r}")
        return exp

    def list(self) -> list[Export]:
        with self._lock:
            return sorted(self._exports.values(), key=lambda e: e.name)

    def __iter__(self) -> Iterator[Export]:
        return iter(self.list())

    # --- publish / withdraw ---

    def publish(self, name: str, path: str | Path) -> Export:
        """Scan and register a file under an export root; blocking (run it in the file
        work pool)."""
        _check_name(name)
        self._reserve(name)
        try:
            opened = open_beneath(self.roots, path)
        except BaseException:
            self._unreserve(name)
            raise
        return self.publish_fd(name, opened, reserved=True)

    def publish_fd(self, name: str, opened: BeneathFile, *, reserved: bool = False) -> Export:
        """Scan and register a file already opened beneath a root; the export takes
        opened.fd (closed here on failure)."""
        try:
            if not reserved:
                _check_name(name)
                self._reserve(name)
            exp = self._scan_fd(name, str(opened.path), opened.fd)
            try:
                self._save(exp)
            except OSError as exc:  # no export without its record (its fd is closed below)
                raise StateUnwritable(f"the export record cannot be written: {exc}") from None
            with self._lock:
                self._exports[name] = exp
        except BaseException:
            os.close(opened.fd)
            raise
        finally:
            self._unreserve(name)
        log.info("published export %s (%s, %d bytes)", name, opened.path, exp.size)
        return exp

    def add(self, exp: Export) -> None:
        """Register an export built elsewhere (a live process); not kept in the state dir."""
        _check_name(exp.name)
        self._reserve(exp.name)
        with self._lock:
            self._publishing.discard(exp.name)
            self._exports[exp.name] = exp
        log.info("published export %s (%s, %d bytes)", exp.name, exp.path, exp.size)

    def withdraw(self, name: str) -> Export:
        with self._lock:
            exp = self._exports.pop(name, None)
        if exp is None:
            raise ExportNotFound(f"no export named {name!r}")
        exp.close()
        for hook in self.withdraw_hooks:
            hook(exp)
        self._record_path(name).unlink(missing_ok=True)  # a live export has none
        log.info("withdrew export %s", name)
        return exp

    def set_working_set(self, name: str, chunks: builtins.list[int]) -> int:
        """Store a first-touch chunk order (duplicates dropped); returns how many were kept."""
        exp = self.get(name)
        exp.check()
        for c in chunks:
            exp._check_index(c)
        exp.working_set = list(dict.fromkeys(chunks))
        self._save(exp)
        return len(exp.working_set)

    def close(self) -> None:
        for exp in self.list():
            exp.close()

    def precheck(self, name: object) -> None:
        """The cheap refusals (bad name, name taken, limit reached), before any file work
        is queued; publish checks them again, holding the lock."""
        _check_name(name)
        with self._lock:
            if name in self._exports or name in self._publishing:
                raise ExportExists(f"export {name!r} already exists")
            held = len(self._exports) + len(self._publishing)
        if held >= self.max_exports:
            raise ExportLimit(
                f"{held} exports are held, at most {self.max_exports} (--max-exports)"
            )

    def _reserve(self, name: str) -> None:
        with self._lock:
            if name in self._exports or name in self._publishing:
                raise ExportExists(f"export {name!r} already exists")
            held = len(self._exports) + len(self._publishing)
            if held >= self.max_exports:
                raise ExportLimit(
                    f"{held} exports are held, at most {self.max_exports} (--max-exports)"
                )
            self._publishing.add(name)

    def _unreserve(self, name: str) -> None:
        with self._lock:
            self._publishing.discard(name)

    def _scan_fd(self, name: str, real: str, fd: int) -> Export:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ExportInvalid(f"{real} is not a regular file")
        if st.st_size <= 0 or st.st_size % PAGE_SIZE:
            raise ExportInvalid(
                f"{real}: size {st.st_size} is not a positive multiple of the page size {PAGE_SIZE}"
            )
        zero_map, digests, fast_digests = scan_file(fd, st.st_size, PAGE_SIZE, self.chunk_size)
        identity = FileIdentity.of(st)
        if FileIdentity.of(os.fstat(fd)) != identity:
            raise ExportInvalid(f"{real} changed while it was being published")
        exp = Export(
            name=name,
            path=real,
            size=st.st_size,
            page_size=PAGE_SIZE,
            chunk_size=self.chunk_size,
            zero_map=zero_map,
            digests=digests,
            identity=identity,
            created_at=time.time(),
            fast_digests=fast_digests,
        )
        self._attach(exp, fd)
        return exp

    def _attach(self, exp: Export, fd: int | None) -> None:
        exp._fd = fd
        exp._on_stale = self._save

    # --- persistence ---

    def _record_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _save(self, exp: Export) -> None:
        """Write the record atomically: tmp file, fsync, rename."""
        if exp.path.startswith("pid:"):
            return  # a live process export lives as long as the agent
        with self._save_lock:
            with self._lock:
                if exp.name not in self._exports and exp.name not in self._publishing:
                    return  # withdrawn meanwhile: do not resurrect its record
            self.dir.mkdir(parents=True, exist_ok=True)
            target = self._record_path(exp.name)
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump(exp.record(), f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise

    def load(self) -> builtins.list[Export]:
        """Reload every record from the state dir (agent start); returns what was loaded."""
        loaded = []
        to_verify = []
        for rec_path in sorted(self.dir.glob("*.json")):
            exp = self._read_record(rec_path)
            if exp is None:
                continue
            if len(self._exports) >= self.max_exports:
                log.error("export record %s ignored: --max-exports reached", rec_path)
                continue
            self._attach(exp, self._reopen(exp))
            with self._lock:
                old = self._exports.pop(exp.name, None)
                self._exports[exp.name] = exp
            if old is not None:
                old.close()
            if exp.state == STATE_READY:
                try:
                    exp.check()  # marks and persists stale if the file changed meanwhile
                    exp.state = STATE_VERIFYING
                    to_verify.append(exp)
                except ExportStale:
                    pass
            loaded.append(exp)
        if to_verify:
            self._verifier = threading.Thread(
                target=self._verify, args=(to_verify,), name="pagewire-verify", daemon=True
            )
            self._verifier.start()
        return loaded

    def wait_verified(self, timeout: float | None = None) -> None:
        """Block until the exports reloaded by load() are verified (for tests and tools)."""
        if self._verifier is not None:
            self._verifier.join(timeout)

    def _verify(self, exports: builtins.list[Export]) -> None:
        """Hash reloaded exports again, one after another, off the start path: a record is
        data the agent wrote, but the digests it serves must be the file's own. Until
        then an export answers export_verifying; a mismatch makes it stale."""
        for exp in exports:
            try:
                fd = exp._acquire()
            except ExportNotFound:
                continue  # withdrawn meanwhile
            try:
                zero_map, digests, fast = scan_file(fd, exp.size, exp.page_size, exp.chunk_size)
                same = zero_map == exp.zero_map and digests == exp.digests
                same = same and exp.fast_digests in ([], fast)
                same = same and FileIdentity.of(os.fstat(fd)) == exp.identity
            except (OSError, ExportError) as exc:
                log.warning("export %s: rehashing %s failed: %s", exp.name, exp.path, exc)
                same = False
            finally:
                exp._release()
            if same:
                with exp._lock:
                    exp.fast_digests = fast  # a record from before fast digests gains them
                    if exp.state == STATE_VERIFYING:
                        exp.state = STATE_READY
                log.info("export %s verified after restart", exp.name)
            else:
                log.warning("export %s: %s does not match its record; stale", exp.name, exp.path)
                exp.mark_stale()

    def _read_record(self, rec_path: Path) -> Export | None:
        try:
            rec = json.loads(rec_path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("the record is not a JSON object")
            exp = Export.from_record(rec)
            _check_name(exp.name)
            if exp.state == STATE_VERIFYING:
                exp.state = STATE_READY
            if exp.state not in (STATE_READY, STATE_STALE):
                raise ValueError(f"unknown state {exp.state!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ExportError) as exc:
            log.error("ignoring unreadable export record %s: %s", rec_path, exc)
            return None
        if rec_path.stem != exp.name:
            log.error("ignoring export record %s: it names %r", rec_path, exp.name)
            return None
        return exp

    def _reopen(self, exp: Export) -> int | None:
        """The record's file, opened beneath an export root (paths.open_beneath)."""
        try:
            opened = open_beneath(self.roots, exp.path)
        except (OSError, PathError) as exc:
            log.warning("export %s: cannot open %s: %s", exp.name, exp.path, exc)
            return None
        exp.path = str(opened.path)
        return opened.fd
