"""A peer's export as seen from here, and the check of every chunk it sends.

Every chunk is rebuilt to its full size (zero pages filled in from the zero map) and
checked against the digest the peer published. A peer that sends a wrong index, size or
digest raises PeerIntegrityError and its stream is torn down; callers fetch again on a
new stream (DESIGN.md section 5).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from pagewire import _uffd
from pagewire.exports.chunks import (
    DIGEST_ALGORITHM,
    DIGEST_LEN,
    FAST_DIGEST_ALGORITHM,
    FAST_DIGEST_LEN,
    ChunkGeometry,
    unpack_bits,
)
from pagewire.peer.errors import PeerIntegrityError

# Verify batches larger than this in a worker thread so the loop keeps serving faults.
INLINE_VERIFY_BYTES = 256 * 1024


@dataclass
class RemoteExport(ChunkGeometry):
    name: str
    size: int
    page_size: int
    chunk_size: int
    zero_map: bytes  # one byte per page, 1 = the page is all zero
    digests: list[bytes]
    generation: str
    working_set: list[int] = field(default_factory=list)
    # xxh3-128 per chunk, what every chunk is checked against; empty from an older source
    # (then sha256 is)
    fast_digests: list[bytes] = field(default_factory=list)

    @property
    def joined_digests(self) -> bytes:
        """Every chunk's SHA-256 end to end, as the native channel takes them (joined on
        each use: 0.5 MiB per GiB of image kept for a session's life would be RSS)."""
        return b"".join(self.digests)

    @property
    def joined_fast_digests(self) -> bytes:
        return b"".join(self.fast_digests)

    @classmethod
    def from_proto(cls, desc: Any) -> RemoteExport:
        if desc.digest_algorithm != DIGEST_ALGORITHM:
            raise PeerIntegrityError(f"unsupported digest algorithm {desc.digest_algorithm!r}")
        ps, cs, size = desc.page_size, desc.chunk_size, desc.size
        if ps <= 0 or cs < ps or cs % ps or size <= 0 or size % ps:
            raise PeerIntegrityError(f"bad geometry: size {size} page {ps} chunk {cs}")
        pages, chunks = size // ps, (size + cs - 1) // cs
        if len(desc.zero_map) != (pages + 7) // 8:
            raise PeerIntegrityError(f"zero map of {len(desc.zero_map)} bytes for {pages} pages")
        digests = list(desc.chunk_digests)
        if len(digests) != chunks or any(len(d) != DIGEST_LEN for d in digests):
            raise PeerIntegrityError(f"{len(digests)} digests for {chunks} chunks")
        fast: list[bytes] = []
        if desc.fast_digest_algorithm == FAST_DIGEST_ALGORITHM:
            fast = list(desc.chunk_fast_digests)
            if len(fast) != chunks or any(len(d) != FAST_DIGEST_LEN for d in fast):
                raise PeerIntegrityError(f"{len(fast)} fast digests for {chunks} chunks")
        return cls(
            name=desc.name,
            size=size,
            page_size=ps,
            chunk_size=cs,
            zero_map=unpack_bits(desc.zero_map, pages),
            digests=digests,
            generation=desc.generation,
            working_set=list(desc.working_set),
            fast_digests=fast,
        )


def decode_chunk(remote: RemoteExport, chunk: Any, compression: str) -> bytes:
    """A chunk message's data pages, decompressed if the peer compressed them."""
    if not chunk.encoding:
        return bytes(chunk.data)
    if chunk.encoding != "zstd" or compression != "zstd":
        raise PeerIntegrityError(f"chunk {chunk.index}: unexpected encoding {chunk.encoding!r}")
    if not 0 <= chunk.index < remote.chunks:
        raise PeerIntegrityError(f"chunk index {chunk.index} out of range")
    try:
        return _uffd.zstd_decompress(chunk.data, remote.chunk_data_len(chunk.index))
    except ValueError as exc:
        raise PeerIntegrityError(f"chunk {chunk.index}: {exc}") from None


def rebuild_chunk(remote: RemoteExport, index: int, data: bytes) -> bytes:
    """Full chunk from its non-zero pages, verified against the published digest."""
    if not 0 <= index < remote.chunks:
        raise PeerIntegrityError(f"chunk index {index} out of range ({remote.chunks} chunks)")
    first, last = remote.chunk_pages(index)
    ps = remote.page_size
    flags = remote.zero_map[first:last]
    expected = flags.count(0) * ps
    if len(data) != expected:
        raise PeerIntegrityError(f"chunk {index}: {len(data)} bytes, expected {expected}")
    if expected == len(flags) * ps:
        chunk = data
    else:
        buf = bytearray(len(flags) * ps)
        src = memoryview(data)
        used = 0
        page = flags.find(0)
        while page >= 0:
            stop = flags.find(1, page)
            stop = len(flags) if stop < 0 else stop
            n = (stop - page) * ps
            buf[page * ps : stop * ps] = src[used : used + n]
            used += n
            page = flags.find(0, stop)
        chunk = bytes(buf)
    if not chunk_matches(remote, index, chunk):
        raise PeerIntegrityError(f"chunk {index}: digest mismatch", chunk=index)
    return chunk


def chunk_matches(remote: RemoteExport, index: int, chunk: bytes) -> bool:
    """The chunk is what the peer published: its fast digest, or sha256 from an older peer."""
    if remote.fast_digests:
        return _uffd.xxh128(chunk) == remote.fast_digests[index]
    return hashlib.sha256(chunk).digest() == remote.digests[index]


def _rebuild_all(remote: RemoteExport, chunks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(i, rebuild_chunk(remote, i, d)) for i, d in chunks]


async def rebuild_batch(
    remote: RemoteExport, chunks: list[tuple[int, bytes]]
) -> list[tuple[int, bytes]]:
    if sum(len(d) for _, d in chunks) <= INLINE_VERIFY_BYTES:
        return _rebuild_all(remote, chunks)
    return await asyncio.to_thread(_rebuild_all, remote, chunks)
