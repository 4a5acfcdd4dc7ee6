"""Shared test set-up: capability checks that fail under CI instead of skipping."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

STRICT = os.environ.get("PAGEWIRE_STRICT_TESTS") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip when a capability is missing; under PAGEWIRE_STRICT_TESTS=1 (CI) fail instead."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"required capability missing under PAGEWIRE_STRICT_TESTS: {reason}")
    pytest.skip(reason)


def uffd_available() -> bool:
    try:
        from pagewire import _uffd

        fd = _uffd.uffd_create(0)
    except (ImportError, OSError):
        return False
    os.close(fd)
    return True


@pytest.fixture
def require_uffd() -> None:
    need(
        uffd_available(),
        "userfaultfd is not available (needs root, CAP_SYS_PTRACE or access to /dev/userfaultfd)",
    )


@pytest.fixture
def require_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces, tc)")
    need(shutil.which("ip") is not None, "needs iproute2 (ip)")


@pytest.fixture
def image(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: image(size, seed=1) -> path of a realistic memory image."""
    from pagewire.tools.images import make_image

    def make(size: int, seed: int = 1, name: str = "image.bin") -> Path:
        path = tmp_path / "roots" / name
        path.parent.mkdir(exist_ok=True)
        make_image(path, size, seed)
        return path

    return make
