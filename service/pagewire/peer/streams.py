"""The work of the two streaming RPCs, apart from the servicer that answers them: Bulk's
plan and its batches read one ahead, and Urgent's pump that serves each request in its own
task. Both read chunks through the servicer (ReadChunks) and within the stream's Flow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from pagewire.exports.chunks import bitmap_len, unpack_bits
from pagewire.exports.errors import ChunkOutOfRange
from pagewire.exports.export import Export
from pagewire.exports.registry import ExportRegistry
from pagewire.peer.access import audit
from pagewire.peer.flow import Flow, Lease
from pagewire.peer.status import invalid
from pagewire.peer.wire import (
    DEFAULT_BATCH_BYTES,
    MAX_BATCH_BYTES,
    MAX_CHUNKS_PER_REQUEST,
    MAX_URGENT_BYTES,
)
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb

# Urgent requests of one stream being read at once; the stream stops reading beyond it.
URGENT_WINDOW = 64
# Urgent reads up to this size run on the event loop (UrgentPump._serve).
INLINE_READ_BYTES = 256 * 1024

# (export, chunk indexes, compression) -> pb.Chunk messages: PageServicer._read_encoded
ReadChunks = Callable[[Export, list[int], str], list[Any]]


def check_compression(value: str) -> str:
    if value not in ("", "zstd"):
        raise invalid(f'compression {value!r} is not offered ("" or "zstd")')
    return value


def batch_bytes(export: Export, indexes: list[int]) -> int:
    return sum(export.chunk_data_len(i) for i in indexes)


# --- Bulk ------------------------------------------------------------------------------


def bulk_plan(export: Export, want: bytes, max_batch_bytes: int) -> list[list[int]]:
    """Wanted non-zero chunks in index order, grouped up to max_batch_bytes of data."""
    if len(want) != bitmap_len(export.chunks):
        raise invalid(
            f"want bitmap is {len(want)} bytes, export {export.name!r} with "
            f"{export.chunks} chunks needs {bitmap_len(export.chunks)}"
        )
    if max_batch_bytes > MAX_BATCH_BYTES:
        raise invalid(f"max_batch_bytes {max_batch_bytes} is over {MAX_BATCH_BYTES}")
    limit = max_batch_bytes or DEFAULT_BATCH_BYTES
    flags = unpack_bits(want, export.chunks)
    plan: list[list[int]] = []
    batch: list[int] = []
    size = 0
    index = flags.find(1)
    while index >= 0:
        n = export.chunk_data_len(index)
        if n:
            if batch and size + n > limit:
                plan.append(batch)
                batch, size = [], 0
            batch.append(index)
            size += n
        index = flags.find(1, index + 1)
    if batch:
        plan.append(batch)
    return plan


async def bulk_batches(
    export: Export,
    batches: Iterator[list[int]],
    compression: str,
    flow: Flow,
    read: ReadChunks,
) -> AsyncGenerator[Any, None]:
    """Batches read one ahead (the disk and the network overlap) within the flow's
    budget; a batch's lease is given back once the caller has written it."""
    pending: tuple[asyncio.Task[list[Any]], Lease] | None = None

    def start(indexes: list[int], lease: Lease) -> None:
        nonlocal pending
        task = asyncio.create_task(asyncio.to_thread(read, export, indexes, compression))
        pending = (task, lease)

    try:
        indexes = next(batches, None)
        if indexes is not None:
            start(indexes, await flow.take(batch_bytes(export, indexes)))
        while pending is not None:
            task, lease = pending
            pending = None
            chunks = await task
            following = next(batches, None)
            ahead = None
            if following is not None:
                ahead = flow.try_take(batch_bytes(export, following))
                if ahead is not None:
                    start(following, ahead)
            yield pb.ChunkBatch(chunks=chunks)
            flow.written(lease)
            if following is not None and ahead is None:
                start(following, await flow.take(batch_bytes(export, following)))
    finally:
        if pending is not None:
            pending[0].cancel()


# --- Urgent ----------------------------------------------------------------------------


class UrgentPump:
    """Reads one Urgent stream's requests and serves each in its own task, at most
    URGENT_WINDOW at once and within the flow's budget. Answers go to `out` as
    (batch, lease, export name); an exception ends the stream, None marks its end. The
    caller writes each answer, then gives back its lease (flow.written) and window slot."""

    def __init__(self, registry: ExportRegistry, read: ReadChunks, flow: Flow, peer: str) -> None:
        self.registry, self.read, self.flow, self.peer = registry, read, flow, peer
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.window = asyncio.Semaphore(URGENT_WINDOW)

    async def run(self, requests: AsyncIterator[Any]) -> None:
        workers: set[asyncio.Task[None]] = set()
        try:
            export: Export | None = None
            async for request in requests:
                if export is None:
                    export = self._export(export, request)
                    audit("Urgent", self.peer, export.name, "OPEN")
                export = self._export(export, request)
                self._check(export, request)
                await self.window.acquire()
                lease = await self.flow.take(batch_bytes(export, list(request.chunks)))
                task = asyncio.create_task(self._serve(export, request, lease))
                workers.add(task)
                task.add_done_callback(workers.discard)
            if workers:
                await asyncio.gather(*workers)
            self.out.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.out.put_nowait(exc)
        finally:
            for task in workers:
                task.cancel()

    def _export(self, current: Export | None, request: Any) -> Export:
        if current is None:
            if not request.export:
                raise invalid("the first urgent request must name the export")
            return self.registry.get(request.export)
        if request.export and request.export != current.name:
            raise invalid(f"stream is for export {current.name!r}, not {request.export!r}")
        return current

    @staticmethod
    def _check(export: Export, request: Any) -> None:
        count = len(request.chunks)
        if count > MAX_CHUNKS_PER_REQUEST:
            raise invalid(f"{count} chunks in one request; at most {MAX_CHUNKS_PER_REQUEST}")
        if count * export.chunk_size > MAX_URGENT_BYTES:
            raise invalid(f"{count} chunks of {export.chunk_size} bytes exceed one message")
        for index in request.chunks:
            if index >= export.chunks:
                raise ChunkOutOfRange(
                    f"chunk {index} out of range: export {export.name!r} has {export.chunks} chunks"
                )

    async def _serve(self, export: Export, request: Any, lease: Lease) -> None:
        try:
            indexes = list(request.chunks)
            compression = check_compression(request.compression)
            small = len(indexes) * export.chunk_size <= INLINE_READ_BYTES
            if small and compression != "zstd":
                # a demand fault waits on this: a thread hop costs more than a cached pread
                # (compressing does not: it goes to a thread like a large read)
                chunks = self.read(export, indexes, compression)
            else:
                chunks = await asyncio.to_thread(self.read, export, indexes, compression)
            self.out.put_nowait(
                (pb.ChunkBatch(request_id=request.request_id, chunks=chunks), lease, export.name)
            )
        except asyncio.CancelledError:
            self.flow.give(lease)
            raise
        except Exception as exc:
            self.flow.give(lease)
            self.out.put_nowait(exc)
