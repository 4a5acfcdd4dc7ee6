"""A published file's identity: device, inode, size and mtime. Every check that a file is
still the one published (serving, publishing, verifying after a restart, the native
channel) asks FileIdentity.matches; a change makes the export stale (DESIGN.md section 5)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_fd(cls, fd: int) -> FileIdentity:
        return cls.of(os.fstat(fd))

    def matches(self, fd: int) -> bool:
        """True if the open file fd is still this file, unchanged."""
        return FileIdentity.of_fd(fd) == self

    def generation(self, name: str) -> str:
        raw = f"{name}:{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]
