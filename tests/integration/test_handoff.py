"""Every bad handoff of DESIGN section 3 is refused with a reason naming the defect."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.core.handoff import HandoffError, SocketSpec, listen, receive_handoff
from pagewire.core.layout import SYSTEM_PAGE_SIZE, Limits

pytestmark = pytest.mark.usefixtures("require_uffd")
PAGE = SYSTEM_PAGE_SIZE
SIZE = 64 * PAGE


def region(base: int, size: int = SIZE, offset: int = 0, **extra: object) -> dict[str, object]:
    item: dict[str, object] = {
        "base_host_virt_addr": base,
        "size": size,
        "offset": offset,
        "page_size": PAGE,
        "page_size_kib": PAGE,
    }
    item.update(extra)
    return item


def smaps_flags(base: int) -> str:
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            current = int(head.split("-")[0], 16)
        elif line.startswith("VmFlags:") and current == base:
            return line
    return ""


def exchange(
    tmp: Path, body: bytes, fds: list[int], limits: Limits | None = None, chunks: int = 1
) -> HandoffError | object:
    """Send body (optionally split into chunks, socket left open) with fds; return the
    agent side's result."""
    path = tmp / "h.sock"
    listener = listen(SocketSpec(path))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def send() -> None:
        client.connect(str(path))
        step = max(1, len(body) // chunks)
        parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        client.sendmsg([parts[0]], anc)
        for part in parts[1:]:
            threading.Event().wait(0.02)
            client.sendall(part)

    async def serve() -> HandoffError | object:
        loop = asyncio.get_running_loop()
        sender = threading.Thread(target=send)
        sender.start()
        conn, _ = await loop.sock_accept(listener)
        try:
            return await receive_handoff(conn, limits or Limits(image_size=SIZE * 4))
        except HandoffError as exc:
            return exc
        finally:
            sender.join()

    try:
        return asyncio.run(serve())
    finally:
        listener.close()
        client.close()


@pytest.fixture
def mapped():  # type: ignore[no-untyped-def]
    """A registered region and its uffd, as a workload would have them."""
    base = _uffd.mmap_anon(SIZE * 2)
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    _uffd.uffd_register(uffd, base, SIZE)
    yield base, uffd
    os.close(uffd)
    _uffd.munmap(base, SIZE * 2)


def code_of(result: object) -> str:
    assert isinstance(result, HandoffError), f"expected a refusal, got {result}"
    assert result.message
    return result.code


def test_good_handoff_split_across_reads(tmp_path: Path, mapped) -> None:
    base, uffd = mapped
    body = json.dumps([region(base, unknown_key="ignored")]).encode()
    result = exchange(tmp_path, body, [uffd], chunks=3)
    assert not isinstance(result, HandoffError), result
    assert result.regions[0].base == base and result.pid == os.getpid()  # type: ignore[attr-defined]
    assert result.uffd_inode == os.fstat(uffd).st_ino  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]


def test_page_size_kib_alone_is_accepted(tmp_path: Path, mapped) -> None:
    base, uffd = mapped
    item = region(base)
    del item["page_size"]
    result = exchange(tmp_path, json.dumps([item]).encode(), [uffd])
    assert not isinstance(result, HandoffError), result
    result.close()  # type: ignore[attr-defined]


def test_no_fd(tmp_path: Path, mapped) -> None:
    base, _ = mapped
    assert code_of(exchange(tmp_path, json.dumps([region(base)]).encode(), [])) == "no_fd"


def test_two_fds_are_refused_and_closed(tmp_path: Path, mapped) -> None:
    base, uffd = mapped
    r, w = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    assert (
        code_of(exchange(tmp_path, json.dumps([region(base)]).encode(), [uffd, r])) == "extra_fds"
    )
    assert len(os.listdir("/proc/self/fd")) <= before  # the received copies were closed
    os.close(r)
    os.close(w)


def test_fd_that_is_not_a_uffd(tmp_path: Path, mapped) -> None:
    base, _ = mapped
    r, w = os.pipe()
    assert code_of(exchange(tmp_path, json.dumps([region(base)]).encode(), [r])) == "not_uffd"
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "make_body,code",
    [
        (lambda b: b"[{not json", "invalid_json"),
        (lambda b: b"[]", "empty_layout"),
        (lambda b: json.dumps({"a": 1}).encode(), "invalid_json"),
        (lambda b: json.dumps([region(b + 1)]).encode(), "unaligned"),
        (lambda b: json.dumps([region(b), region(b + PAGE * 8)]).encode(), "overlapping_regions"),
        (lambda b: json.dumps([region(0xFFFF800000000000)]).encode(), "kernel_address"),
        (
            lambda b: json.dumps([region(b, page_size=PAGE, page_size_kib=4)]).encode(),
            "page_size_mismatch",
        ),
        (
            lambda b: json.dumps([region(b, page_size=8192, page_size_kib=8192)]).encode(),
            "bad_page_size",
        ),
        (lambda b: json.dumps([region(b, offset=SIZE * 4)]).encode(), "beyond_image"),
        (lambda b: json.dumps([region(b + SIZE)]).encode(), "not_registered"),
        (lambda b: json.dumps([region(b, size="big")]).encode(), "invalid_region"),
    ],
)
def test_bad_layouts(tmp_path: Path, mapped, make_body, code: str) -> None:
    base, uffd = mapped
    assert code_of(exchange(tmp_path, make_body(base), [uffd])) == code


def test_too_many_regions(tmp_path: Path, mapped) -> None:
    base, uffd = mapped
    body = json.dumps([region(base + i * PAGE, PAGE) for i in range(5000)]).encode()
    assert code_of(exchange(tmp_path, body, [uffd], Limits(max_regions=256))) == "too_many_regions"


def test_too_many_bytes(tmp_path: Path, mapped) -> None:
    base, uffd = mapped
    body = json.dumps([region(base)]).encode()
    assert code_of(exchange(tmp_path, body, [uffd], Limits(max_bytes=PAGE))) == "too_large"


def test_bad_layout_with_real_uffd_is_poisoned_not_unregistered(tmp_path: Path, mapped) -> None:
    """The workload is neither left hanging nor given zeros: what its uffd registered stays
    registered and is poisoned (SIGBUS on touch; tests/integration/test_fail_closed.py
    touches it in a separate process)."""
    base, uffd = mapped
    assert " um" in smaps_flags(base)
    body = json.dumps([region(base), region(base + PAGE * 8)]).encode()
    result = exchange(tmp_path, body, [uffd])
    assert code_of(result) == "overlapping_regions"
    assert "poisoned" in result.message  # type: ignore[attr-defined]
    assert " um" in smaps_flags(base)  # never unregistered with pages missing
