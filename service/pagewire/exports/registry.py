"""The export registry: every export of this agent, published, withdrawn, listed, kept
as records and reloaded (then verified again) after a restart.

The record of an export is kept as JSON under <state_dir>/exports/<name>.json; a reloaded
export answers export_verifying until its file is hashed again (README "Integrity").
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.core.paths import BeneathFile, PathError, open_beneath
from pagewire.exports.chunks import DEFAULT_CHUNK_SIZE, scan_file
from pagewire.exports.errors import (
    NAME_PATTERN,
    NAME_RULE,
    ExportError,
    ExportExists,
    ExportInvalid,
    ExportLimit,
    ExportNotFound,
    ExportStale,
    ExportVerifying,
    StateUnwritable,
)
from pagewire.exports.export import STATE_READY, STATE_STALE, STATE_VERIFYING, Export
from pagewire.exports.identity import FileIdentity

log = logging.getLogger(__name__)

NAME_RE = re.compile(NAME_PATTERN)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportInvalid(f"invalid export name {name!r}: use {NAME_RULE}")


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
        if chunk_size < SYSTEM_PAGE_SIZE or chunk_size & (chunk_size - 1):
            raise ValueError(
                f"chunk size {chunk_size} must be a power of two >= {SYSTEM_PAGE_SIZE}"
            )
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
            self._check_room_locked(name)

    def _check_room_locked(self, name: object) -> None:
        if name in self._exports or name in self._publishing:
            raise ExportExists(f"export {name!r} already exists")
        held = len(self._exports) + len(self._publishing)
        if held >= self.max_exports:
            raise ExportLimit(
                f"{held} exports are held, at most {self.max_exports} (--max-exports)"
            )

    def _reserve(self, name: str) -> None:
        with self._lock:
            self._check_room_locked(name)
            self._publishing.add(name)

    def _unreserve(self, name: str) -> None:
        with self._lock:
            self._publishing.discard(name)

    def _scan_fd(self, name: str, real: str, fd: int) -> Export:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ExportInvalid(f"{real} is not a regular file")
        page_size = SYSTEM_PAGE_SIZE
        if st.st_size <= 0 or st.st_size % page_size:
            raise ExportInvalid(
                f"{real}: size {st.st_size} is not a positive multiple of the page size {page_size}"
            )
        zero_map, digests, fast_digests = scan_file(fd, st.st_size, page_size, self.chunk_size)
        identity = FileIdentity.of(st)
        if not identity.matches(fd):
            raise ExportInvalid(f"{real} changed while it was being published")
        exp = Export(
            name=name,
            path=real,
            size=st.st_size,
            page_size=page_size,
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
        if not exp.backed_by_file:
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
                except (ExportStale, ExportVerifying):
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
                same = same and exp.identity.matches(fd)
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
