"""The one way to open a path under an export root (DESIGN.md section 6a).

The path is resolved once, then opened from a descriptor of its export root with
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): a directory swapped for a symlink (or a
`..` that climbs out) between the check and the open makes the open fail, it never
lands outside the root. Files open with O_NONBLOCK (a FIFO cannot block the agent) and
only regular files are accepted (hugetlbfs and tmpfs files are regular files). New
files are created with O_EXCL. Callers keep and use the descriptor, never the name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pagewire.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, PagewireError

_SYS_OPENAT2 = 437  # the same number on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# beneath a root, RESOLVE_NO_SYMLINKS refuses a symlink (ELOOP) where O_NOFOLLOW would
# open the link itself and fail as "not a directory"
_PARENT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
)


class PathError(PagewireError):
    """A path refused: every kind has its own documented code."""

    code = "invalid_path"

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class InvalidPath(PathError, InvalidRequest, ValueError):
    code = "invalid_path"


class OutsideExportRoots(PathError, Forbidden, PermissionError):
    code = "outside_export_roots"


class PathNotFound(PathError, NotFound, FileNotFoundError):
    code = "not_found"


class NotRegularFile(PathError, InvalidRequest, ValueError):
    code = "not_regular_file"


class PathExists(PathError, Conflict, FileExistsError):
    code = "file_exists"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_missing = False


def _openat2(dir_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    """openat2 beneath dir_fd without symlinks; os.open plus a check of the opened fd on
    kernels without openat2 (before 5.6)."""
    global _openat2_missing
    if not _openat2_missing:
        how = _OpenHow(flags, mode, _RESOLVE)
        fd = _libc.syscall(
            _SYS_OPENAT2, dir_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), rel)
        _openat2_missing = True
    return _open_checked(dir_fd, rel, flags, mode)


def _open_checked(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    root = os.readlink(f"/proc/self/fd/{dir_fd}")
    fd = os.open(rel, flags, mode, dir_fd=dir_fd)
    opened = os.readlink(f"/proc/self/fd/{fd}")
    if opened != os.path.join(root, rel) or os.path.realpath(opened) != opened:
        os.close(fd)
        raise OSError(errno.EXDEV, "the path left its export root while it was opened", rel)
    return fd


def _locate(roots: list[Path], path: str | Path, *, parent: bool) -> tuple[Path, str]:
    """(export root, path relative to it) of an absolute path, symlinks resolved once;
    parent: only the directory is resolved (the last component is a file to create)."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidPath("the path must be a non-empty string without NUL bytes")
    if not os.path.isabs(text):
        raise InvalidPath("the path must be absolute")
    name = os.path.basename(text)
    if parent and name in ("", ".", ".."):
        raise InvalidPath(f"{text} does not name a file")
    try:
        real = (
            os.path.join(os.path.realpath(os.path.dirname(text)), name)
            if parent
            else (os.path.realpath(text))
        )
    except OSError as exc:  # a component changed between lstat and readlink
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise OutsideExportRoots(f"{text} changed while it was resolved") from None
        raise _refusal(exc, text) from None
    for root in roots:
        root_text = str(root)
        if real != root_text and os.path.commonpath([real, root_text]) == root_text:
            return root, os.path.relpath(real, root_text)
    raise OutsideExportRoots(f"{text} is not under an export root")


def _refusal(exc: OSError, text: str) -> PathError:
    if exc.errno in (errno.ELOOP, errno.EXDEV, errno.EAGAIN):
        return OutsideExportRoots(f"{text} left its export root while it was opened")
    if exc.errno == errno.ENOENT:
        return PathNotFound(f"{text}: no such file")
    if exc.errno == errno.EEXIST:
        return PathExists(f"{text} exists already")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR):
        return NotRegularFile(f"{text} is not a regular file")
    return InvalidPath(f"{text}: {exc.strerror}")


@dataclass
class BeneathFile:
    """A file opened beneath an export root. A created file also keeps its directory,
    so that it can be removed without looking its path up again."""

    fd: int
    path: Path
    dir_fd: int = -1
    name: str = ""

    def remove(self) -> None:
        """Unlink a created file, if the name still points at it."""
        if self.dir_fd < 0 or self.fd < 0:
            return
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            mine = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.name, dir_fd=self.dir_fd)
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1


def open_beneath(roots: list[Path], path: str | Path, *, create: bool = False) -> BeneathFile:
    """Open (or, with create, make with O_EXCL and mode 0600) a regular file under one of
    roots. Raises a PathError (4xx) for every refusal; never follows a symlink that was
    not there when the path was resolved."""
    text = os.fspath(path)
    root, rel = _locate(roots, text, parent=create)
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise InvalidPath(f"export root {root}: {exc.strerror}") from None
    try:
        if create:
            return _create(root, root_fd, rel, text)
        fd = _openat2(root_fd, rel, _READ_FLAGS)
    except OSError as exc:
        raise _refusal(exc, text) from None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{text} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return BeneathFile(fd, root / rel)


def _create(root: Path, root_fd: int, rel: str, text: str) -> BeneathFile:
    parent, name = os.path.split(rel)
    dir_fd = _openat2(root_fd, parent, _PARENT_FLAGS) if parent else os.dup(root_fd)
    try:
        fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    return BeneathFile(fd, root / rel, dir_fd, name)


def reopen_read_only(fd: int) -> int:
    """A read-only descriptor of the file fd refers to (through /proc, not its name)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
