"""Chunks of a memory image: their geometry, the bitmaps that name them, and the scan
that builds an export's zero-page map and digests.

Publishing scans the file once (pread in chunk-size pieces, holes skipped with
SEEK_DATA/SEEK_HOLE) to build the zero-page map and, per chunk, a sha256 digest (the
export's identity and the chunk cache's key) and an XXH3-128 digest (what destinations check
every chunk against on the hot path; README "Integrity"). Both sides of the wire use the
same geometry (ChunkGeometry) and bitmaps (pack_bits, unpack_bits).
"""

from __future__ import annotations

import errno
import hashlib
import os

from pagewire import _uffd
from pagewire.exports.errors import ExportInvalid

DEFAULT_CHUNK_SIZE = 64 * 1024
DIGEST_ALGORITHM = "sha256"
DIGEST_LEN = 32
FAST_DIGEST_ALGORITHM = "xxh3-128"
FAST_DIGEST_LEN = 16


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


# --- geometry ------------------------------------------------------------------------


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


# --- scanning ------------------------------------------------------------------------


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
