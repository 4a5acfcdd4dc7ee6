"""A bounded pool for blocking file work (opening images, hashing on publish).

A caller waits at most `timeout_s`; it then gets 503 `file_work_timeout` and whatever
the work produces afterwards is undone when it ends. A full pool answers 503
`file_pool_busy` at once instead of queueing without limit. Workers held past their
timeout are what makes the pool stuck, and /readyz reports that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pagewire.core.errors import Unavailable

log = logging.getLogger("pagewire.core.filework")
T = TypeVar("T")
DEFAULT_THREADS = 4
DEFAULT_TIMEOUT_S = 600.0


class FilePool:
    def __init__(self, threads: int = DEFAULT_THREADS, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.threads = threads
        self.timeout_s = timeout_s
        self.max_pending = threads * 4  # running plus queued
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="pagewire-file")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending = 0
        self._started: dict[int, float] = {}  # running work -> when it started

    async def run(
        self, what: str, fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None
    ) -> T:
        with self._lock:
            if self._pending >= self.max_pending:
                raise Unavailable(
                    "file_pool_busy", f"{self._pending} file operations are pending already"
                )
            self._pending += 1
        work_id = next(self._ids)
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._call, work_id, fn, args
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: _undo(f, undo, what))
            raise
        except TimeoutError:
            log.warning("%s did not finish in %.1f s; undone when it ends", what, self.timeout_s)
            future.add_done_callback(lambda f: _undo(f, undo, what))
            raise Unavailable(
                "file_work_timeout", f"{what} did not finish in {self.timeout_s:g} s"
            ) from None

    def _call(self, work_id: int, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            self._started[work_id] = time.monotonic()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._started.pop(work_id, None)
                self._pending -= 1

    def stuck(self) -> int:
        """How many workers have been held past the timeout."""
        limit = time.monotonic() - self.timeout_s
        with self._lock:
            return sum(1 for t in self._started.values() if t < limit)

    def healthy(self) -> bool:
        return self.stuck() == 0

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _undo(future: Any, undo: Callable[[Any], object] | None, what: str) -> None:
    if future.cancelled() or future.exception() is not None or undo is None:
        return
    try:
        undo(future.result())
    except Exception:  # the caller is gone; all that is left is to say so
        log.exception("undoing %s failed", what)


_pool = FilePool()


def configure(threads: int, timeout_s: float) -> FilePool:
    """Called once at agent start with the settings."""
    global _pool
    _pool.shutdown()
    _pool = FilePool(threads, timeout_s)
    return _pool


def pool() -> FilePool:
    return _pool
