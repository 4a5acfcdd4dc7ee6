"""Partial multi-page installs: pages already present, and a REMOVE that lands between a
fault and its install. The workload here is this test process itself."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.client import MADV_DONTNEED
from pagewire.core.layout import SYSTEM_PAGE_SIZE as PAGE

pytestmark = pytest.mark.usefixtures("require_uffd")
PAGES = 64


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def setup(image):  # type: ignore[no-untyped-def]
    img: Path = image(PAGES * PAGE, seed=5)
    data = img.read_bytes()
    base = _uffd.mmap_anon(PAGES * PAGE)
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    _uffd.uffd_register(uffd, base, PAGES * PAGE)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    yield base, uffd, efd, data
    os.close(efd)
    os.close(uffd)
    _uffd.munmap(base, PAGES * PAGE)


def make_engine(base: int, uffd: int, efd: int) -> _uffd.Engine:
    return _uffd.Engine(uffd, [(base, PAGES * PAGE, 0, PAGE)], efd, background=False)


def test_pages_already_present_are_skipped(setup) -> None:
    base, uffd, efd, data = setup
    present = [3, 10, 11, 63]
    for p in present:
        assert _uffd.uffd_copy(uffd, base + p * PAGE, data[p * PAGE : (p + 1) * PAGE]) == PAGE
    eng = make_engine(base, uffd, efd)
    eng.start()
    assert eng.install(0, data, _uffd.BACKGROUND) == PAGES
    wait_for(lambda: eng.state == "completed")
    assert eng.stats()["pages_eexist"] == len(present)
    assert _uffd.read_memory(base, PAGES * PAGE) == data
    eng.close()


def test_remove_between_fault_and_install(setup) -> None:
    base, uffd, efd, data = setup
    eng = make_engine(base, uffd, efd)
    eng.start()
    seen: list[bytes] = []
    toucher = threading.Thread(target=lambda: seen.append(_uffd.read_memory(base + 5 * PAGE, PAGE)))
    toucher.start()
    requests: list[int] = []
    wait_for(lambda: bool(requests.extend(eng.take_requests()) or requests))
    assert requests == [5 * PAGE]
    # the balloon takes pages 0-15 while the fault on page 5 is in flight
    remover = threading.Thread(target=_uffd.madvise, args=(base, 16 * PAGE, MADV_DONTNEED))
    remover.start()
    wait_for(lambda: eng.stats()["events_remove"] == 1)
    remover.join(5)
    assert not remover.is_alive(), "madvise stayed blocked"
    eng.install(0, data, _uffd.FAULT)  # the late answer: removed pages must not get it
    toucher.join(5)
    assert not toucher.is_alive(), "the faulting thread stayed blocked"
    wait_for(lambda: eng.state == "completed")
    assert seen == [bytes(PAGE)]
    assert _uffd.read_memory(base, 16 * PAGE) == bytes(16 * PAGE)
    assert _uffd.read_memory(base + 16 * PAGE, (PAGES - 16) * PAGE) == data[16 * PAGE :]
    assert eng.stats()["pages_removed"] == 16
    eng.close()
