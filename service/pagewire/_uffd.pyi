"""Typed stubs for the native module pagewire._uffd (C in csrc/, one file per subsystem)."""

from collections.abc import Sequence

# page states, one byte per page in Engine.page_states()
MISSING: int
REQUESTED: int
PRESENT: int
ZERO: int
REMOVED: int
CACHE_ABSENT: int
CACHE_READY: int
CACHE_PENDING: int
SRC_ZERO: int  # flag bit: the source declares this page zero

# install kinds (Engine.install)
FAULT: int
PREFETCH: int
BACKGROUND: int

# resolution indexes of the histograms
RES_LOCAL: int
RES_REMOTE: int
RES_ZERO: int
HIST_BUCKETS: int
HIST_BOUNDS_NS: tuple[int, ...]  # upper bound of each bucket, nanoseconds

FEATURE_EVENT_FORK: int
FEATURE_EVENT_REMAP: int
FEATURE_EVENT_REMOVE: int
FEATURE_MISSING_HUGETLBFS: int
FEATURE_MISSING_SHMEM: int
FEATURE_EVENT_UNMAP: int
FEATURE_SIGBUS: int
FEATURE_THREAD_ID: int
FEATURE_EXACT_ADDRESS: int
FEATURE_POISON: int
FEATURE_WP: int
FEATURE_WP_UNPOPULATED: int
API_FEATURES_SUPPORTED: int  # features this kernel offers (a probe UFFDIO_API)

class UffdError(OSError): ...

# Region: (base_host_virt_addr, size, offset, page_size)
Region = tuple[int, int, int, int]

class Engine:
    """One post-copy session: a uffd, its regions, and a native fault thread."""

    def __init__(
        self,
        uffd: int,
        regions: Sequence[Region],
        notify_fd: int,
        *,
        source_fd: int = -1,
        source_size: int = 0,
        zero_map: bytes | None = None,
        zero_map_page_size: int = 0,
        pidfd: int = -1,
        background: bool = True,
        window_pages: int = 16,
        batch_bytes: int = 1 << 20,
    ) -> None: ...
    def start(self) -> None: ...
    def install(self, image_offset: int, data: bytes | bytearray | memoryview, kind: int) -> int:
        """COPY data at image_offset into every region page that still needs it.

        Releases the GIL. Returns the number of pages installed."""
    def take_requests(self) -> list[int]:
        """Image offsets of pages the engine could not serve alone (drains the queue)."""
    def stats(self) -> dict[str, int]: ...
    def histogram(self, resolution: int) -> tuple[list[int], int, int]:
        """(bucket counts, sum_ns, max_ns) for one resolution."""
    def page_states(self) -> bytes: ...
    def fail(self, code: str, poison: bool) -> bool:
        """Stop the session: poison missing pages (if poison), unregister, close the uffd.

        Returns False if poison was asked for but the uffd lacks UFFD_FEATURE_POISON
        (then nothing was closed)."""
    def close_uffd(self) -> None:
        """Stop the fault thread and close the uffd copy without unregistering."""
    def wake_all(self) -> None: ...
    def reconcile_pagemap(self, pid: int) -> int:
        """Mark pages present in the workload's /proc/PID/pagemap; returns how many."""
    def wanted_chunks(self, chunk_size: int, image_size: int) -> bytes:
        """Bitmap (LSB first) of chunks that still hold a missing data page."""
    def close(self) -> None: ...
    def attach_channel(
        self,
        host: str,
        port: int,
        token: bytes,
        chunk_size: int,
        export_size: int,
        export_page_size: int,
        zero_map: bytes,
        digests: bytes,
        background: bool = True,
        compression: bool = False,
        cache: ChunkCache | None = None,
        fast_digests: bytes | None = None,
        working_set: bytes | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        """Fetch remote pages over the native data channel (urgent and bulk connections).
        fast_digests: 16 bytes of XXH3-128 per chunk; without them chunks are checked
        with SHA-256. working_set: chunk indexes (native u64) asked for first, in one burst.
        tls_*: PEM file paths; the connections are TLS 1.3 and the source's certificate
        must chain to tls_ca and name host."""
    def record_working_set(self, chunk_size: int, image_size: int) -> None:
        """Record the chunks the workload touches, in first-touch order."""
    def working_set(self) -> list[int]:
        """The chunks touched so far, in first-touch order."""
    def share_cache(self, cache: ChunkCache) -> bool:
        """Share chunks through the host's cache from now on (native channel)."""
    @property
    def channel(self) -> dict[str, object] | None: ...
    @property
    def state(self) -> str: ...  # "created", "running", "completed", "failed"
    @property
    def error(self) -> str | None: ...
    @property
    def features(self) -> int: ...
    @property
    def uffd(self) -> int: ...

class ChunkCache:
    """Verified chunks keyed by SHA-256, shared by a host's sessions, LRU-bounded."""

    def __init__(self, capacity: int) -> None: ...
    def get(self, digest: bytes, length: int) -> bytes | None:
        """A digest-verified copy, or None (a corrupt entry is dropped)."""
    def put(self, digest: bytes, data: bytes | memoryview) -> None: ...
    def claim(self, digest: bytes, length: int, owner: int) -> tuple[int, bytes | None]:
        """(CACHE_READY, data), (CACHE_PENDING, None), or (CACHE_ABSENT, None) now claimed."""
    def release(self, owner: int) -> None: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

class Snapshot:
    """A live snapshot of a WP-registered region of process pid into out_fd."""

    def __init__(
        self,
        uffd: int,
        base: int,
        size: int,
        page_size: int,
        pid: int,
        out_fd: int,
        notify_fd: int,
        batch_bytes: int = 1 << 20,
    ) -> None: ...
    def start(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    @property
    def state(self) -> str: ...
    @property
    def error(self) -> str | None: ...

class DataServer:
    """The source side of the native data channel."""

    def __init__(
        self,
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        allow: tuple[str, ...] = (),
    ) -> None:
        """Listen on host:port. With tls_* (PEM file paths) every connection is TLS 1.3
        and the client's certificate must chain to tls_ca and have a SAN matching one of
        the allow patterns (none: any)."""
    @property
    def port(self) -> int: ...
    def add_export(
        self, export_id: int, fd: int, size: int, page_size: int, chunk_size: int, zero_map: bytes
    ) -> None: ...
    def remove_export(self, export_id: int) -> None: ...
    def grant(self, token: bytes, export_id: int, ttl_s: float = 60.0) -> None:
        """One urgent and one bulk connection may use the token until ttl_s passes."""

    def revoke(self, token: bytes) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def set_limits(
        self,
        max_conns: int = 0,
        per_peer: int = 0,
        pending_per_peer: int = 0,
        hello_timeout_ms: int = 0,
    ) -> None:
        """Connection limits; 0 keeps the default (256, 128, 16, 2000 ms)."""

    def limit_stats(self) -> dict[str, int]: ...

def zstd_available() -> bool: ...
def zstd_compress(data: bytes | bytearray | memoryview, level: int = 1) -> bytes: ...
def zstd_decompress(data: bytes | bytearray | memoryview, size: int) -> bytes: ...
def sha256(data: bytes | bytearray | memoryview) -> bytes: ...
def xxh128(data: bytes | bytearray | memoryview) -> bytes: ...
def uffd_create(features: int, nonblock: bool = True) -> int: ...
def uffd_features(fd: int) -> int: ...
def uffd_register(
    fd: int, addr: int, size: int, wp: bool = False, missing: bool = True
) -> None: ...
def uffd_unregister(fd: int, addr: int, size: int) -> None: ...
def uffd_poison(fd: int, addr: int, size: int, page_size: int = ...) -> int: ...
def pidfd_getfd(pidfd: int, fd: int) -> int: ...
def uffd_copy(fd: int, addr: int, data: bytes) -> int: ...
def mmap_anon(size: int, hugetlb: bool = False, addr: int = 0) -> int:
    """Map anonymous private memory; at exactly addr if given (MAP_FIXED_NOREPLACE)."""

def process_read(pid: int, addr: int, size: int) -> bytes: ...
def munmap(addr: int, size: int) -> None: ...
def madvise(addr: int, size: int, advice: int) -> None: ...
def read_memory(addr: int, size: int) -> bytes: ...
def write_memory(addr: int, data: bytes) -> None: ...
def stage_chunks(
    host: str,
    port: int,
    token: bytes,
    chunk_size: int,
    export_size: int,
    export_page_size: int,
    zero_map: bytes,
    digests: bytes,
    chunks: bytes,
    fast_digests: bytes | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> tuple[bytes, bytes, str | None, int]:
    """Fetch at most 4096 chunks (uint64 indexes) over the native channel on the grant's
    stage connection, verified: (indexes received, their chunks in one chunk_size slot
    each, zero-padded, error or None, bytes received off the wire). A chunk the session's
    urgent connection sent meanwhile is not among them; the fetch gives up after 10 s.
    GIL released."""

def touch_pages(addr: int, page_size: int, pages: Sequence[int], write: bool = False) -> list[int]:
    """Touch each page (read one byte, or write) in order; returns ns per touch. GIL released."""

def zero_map(fd: int, size: int, page_size: int) -> bytes:
    """One byte per page, 1 where the image page is all zero (SEEK_HOLE plus a scan)."""

def memory_equals_file(addr: int, size: int, fd: int, offset: int) -> int:
    """-1 if equal, else the first differing byte offset. GIL released."""
