"""Export publishing: zero map, digests, persistence, path rules, staleness."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.core.errors import InvalidRequest
from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.core.paths import NotRegularFile, OutsideExportRoots, PathError, PathNotFound
from pagewire.exports.chunks import pack_bits, unpack_bits
from pagewire.exports.errors import (
    ChunkOutOfRange,
    ExportExists,
    ExportInvalid,
    ExportNotFound,
    ExportStale,
    ExportVerifying,
)
from pagewire.exports.registry import ExportRegistry

from tests.conftest import need

PS = SYSTEM_PAGE_SIZE
CHUNK = 16 * PS


def page(fill: int) -> bytes:
    return bytes([fill]) * PS


def make_image(path: Path, pages: int = 80) -> bytes:
    """A sparse file with holes, data pages, written zero runs and a partial last chunk."""
    with open(path, "wb") as f:
        f.truncate(pages * PS)  # all hole
        f.seek(0)
        f.write(page(0xA1) + page(0) + page(0xA3))  # data, written zero page, data
        f.seek(20 * PS)
        f.write(page(0) * 6)  # a written run of zeros (data extent, zero content)
        f.seek(40 * PS)
        f.write(b"\x00" * (PS - 1) + b"\x01")  # one non-zero byte at the end of a page
        f.seek(41 * PS)
        f.write(os.urandom(PS * 3))
        f.seek((pages - 1) * PS)
        f.write(page(0x5A))
    return path.read_bytes()


def expected_flags(data: bytes) -> bytes:
    zero = bytes(PS)
    return bytes(data[i : i + PS] == zero for i in range(0, len(data), PS))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def registry(tmp_path: Path, root: Path) -> Iterator[ExportRegistry]:
    reg = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    yield reg
    reg.close()


def test_bitmaps_are_lsb_first() -> None:
    flags = bytes([1, 0, 0, 0, 0, 0, 0, 1, 0, 1])
    assert pack_bits(flags) == bytes([0b1000_0001, 0b10])
    assert unpack_bits(pack_bits(flags), len(flags)) == flags
    assert pack_bits(b"") == b""
    with pytest.raises(ValueError):
        unpack_bits(b"\x00", 9)


def test_publish_zero_map_and_digests(registry: ExportRegistry, root: Path) -> None:
    data = make_image(root / "img", pages=80)  # 5 chunks of 16 pages
    exp = registry.publish("vm-1.mem", root / "img")
    assert (exp.size, exp.page_size, exp.chunk_size) == (len(data), PS, CHUNK)
    assert exp.pages == 80 and exp.chunks == 5
    flags = expected_flags(data)
    assert exp.zero_map == flags
    assert exp.zero_pages == flags.count(1)
    assert flags[1] == 1 and flags[40] == 0 and flags[20] == 1
    assert exp.zero_bitmap == pack_bits(flags)
    assert exp.digests == [
        hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)
    ]
    assert exp.fast_digests == [
        _uffd.xxh128(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)
    ]
    assert exp.state == "ready"
    j = exp.to_json()
    assert set(j) == {
        "name",
        "path",
        "size",
        "page_size",
        "chunk_size",
        "pages",
        "zero_pages",
        "chunks",
        "state",
        "created_at",
    }
    assert j["path"] == str(root / "img")


def test_read_chunk_returns_non_zero_pages(registry: ExportRegistry, root: Path) -> None:
    data = make_image(root / "img", pages=80)
    exp = registry.publish("img", root / "img")
    zero = bytes(PS)
    for c in range(exp.chunks):
        full = data[c * CHUNK : (c + 1) * CHUNK]
        pages = [full[i : i + PS] for i in range(0, len(full), PS)]
        assert exp.read_chunk(c) == b"".join(p for p in pages if p != zero)
        assert exp.read_chunk_full(c) == full
        assert exp.chunk_data_len(c) == len(exp.read_chunk(c))
    assert exp.chunk_is_zero(1) is True  # pages 16..31: hole and written zeros
    assert exp.read_chunk(1) == b""
    with pytest.raises(ChunkOutOfRange):
        exp.read_chunk(5)


def test_persisted_and_reloaded(registry: ExportRegistry, tmp_path: Path, root: Path) -> None:
    make_image(root / "img")
    exp = registry.publish("img", root / "img")
    registry.set_working_set("img", [3, 1, 3, 0])
    record = json.loads((tmp_path / "state" / "exports" / "img.json").read_text())
    assert record["digests"][0] == exp.digests[0].hex()
    assert not list((tmp_path / "state" / "exports").glob(".*tmp"))

    again = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    try:
        (loaded,) = again.load()
        assert loaded.state in ("verifying", "ready")  # digests computed again, off the load
        again.wait_verified(30)
        assert loaded.name == "img" and loaded.state == "ready"
        assert loaded.zero_map == exp.zero_map and loaded.digests == exp.digests
        assert loaded.fast_digests == exp.fast_digests and len(exp.fast_digests) == exp.chunks
        assert loaded.generation == exp.generation
        assert loaded.working_set == [3, 1, 0]
        assert loaded.read_chunk_full(0) == exp.read_chunk_full(0)
    finally:
        again.close()


def test_withdraw(registry: ExportRegistry, tmp_path: Path, root: Path) -> None:
    make_image(root / "img")
    registry.publish("img", root / "img")
    assert [e.name for e in registry.list()] == ["img"]
    registry.withdraw("img")
    assert registry.list() == []
    assert not (tmp_path / "state" / "exports" / "img.json").exists()
    with pytest.raises(ExportNotFound):
        registry.get("img")
    with pytest.raises(ExportNotFound):
        registry.withdraw("img")


def test_path_outside_roots_is_forbidden(
    registry: ExportRegistry, tmp_path: Path, root: Path
) -> None:
    make_image(tmp_path / "outside")
    with pytest.raises(OutsideExportRoots) as info:
        registry.publish("x", tmp_path / "outside")
    assert isinstance(info.value, PermissionError) and info.value.code == "outside_export_roots"
    with pytest.raises(OutsideExportRoots):
        registry.publish("x", root / ".." / "outside")
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(OutsideExportRoots):
        registry.publish("x", root / "link")
    with pytest.raises(OutsideExportRoots):
        registry.publish("x", root)
    assert registry.list() == []
    make_image(root / "img")
    assert registry.publish("x", root / "img").name == "x"  # the name was released


def test_symlink_inside_root_is_allowed(registry: ExportRegistry, root: Path) -> None:
    make_image(root / "real")
    (root / "alias").symlink_to(root / "real")
    assert registry.publish("alias", root / "alias").path == str(root / "real")


def test_duplicate_name(registry: ExportRegistry, root: Path) -> None:
    make_image(root / "img")
    registry.publish("img", root / "img")
    with pytest.raises(ExportExists) as info:
        registry.publish("img", root / "img")
    assert info.value.code == "export_exists"


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "a/b", "x" * 64, "sp ace"])
def test_bad_names(registry: ExportRegistry, root: Path, name: str) -> None:
    make_image(root / "img")
    with pytest.raises(ExportInvalid) as info:
        registry.publish(name, root / "img")
    assert isinstance(info.value, ValueError)


def test_bad_files(registry: ExportRegistry, root: Path) -> None:
    (root / "empty").write_bytes(b"")
    (root / "odd").write_bytes(b"x" * (PS + 1))
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    expected = {
        "empty": ExportInvalid,
        "odd": ExportInvalid,
        "dir": NotRegularFile,
        "fifo": NotRegularFile,
        "missing": PathNotFound,
    }
    for name, error in expected.items():
        with pytest.raises(error):
            registry.publish(name, root / name)
    with pytest.raises(PathError) as info:
        registry.publish("nul", str(root / "a\0b"))
    assert isinstance(info.value, InvalidRequest) and info.value.code == "invalid_path"
    assert registry.list() == []


def test_modified_file_goes_stale(registry: ExportRegistry, tmp_path: Path, root: Path) -> None:
    make_image(root / "img")
    exp = registry.publish("img", root / "img")
    exp.read_chunk(0)
    with open(root / "img", "r+b") as f:
        f.write(b"changed")
    os.utime(root / "img", ns=(1, 1))  # mtime granularity must not hide the change
    with pytest.raises(ExportStale) as info:
        exp.read_chunk(0)
    assert info.value.code == "export_stale"
    assert exp.state == "stale"
    with pytest.raises(ExportStale):
        exp.read_chunk_full(1)
    record = json.loads((tmp_path / "state" / "exports" / "img.json").read_text())
    assert record["state"] == "stale"


def test_file_replaced_while_agent_down_is_stale(
    registry: ExportRegistry, tmp_path: Path, root: Path
) -> None:
    make_image(root / "img")
    registry.publish("img", root / "img")
    registry.close()
    (root / "img").unlink()
    make_image(root / "img")
    again = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    try:
        (loaded,) = again.load()
        assert loaded.state == "stale"
        with pytest.raises(ExportStale):
            loaded.read_chunk(0)
    finally:
        again.close()


def test_bad_chunk_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ExportRegistry(tmp_path, [tmp_path], chunk_size=PS * 3)


def test_holes_are_not_read(
    registry: ExportRegistry, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(root / "img", pages=80)
    fd = os.open(root / "img", os.O_RDONLY)
    try:
        need(os.lseek(fd, 0, os.SEEK_HOLE) < 80 * PS, "the test dir's file system reports no holes")
    finally:
        os.close(fd)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append((offset, offset + n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    registry.publish("img", root / "img")
    hole = (50 * PS, 60 * PS)  # pages 45..78 were never written
    assert reads and not [r for r in reads if r[0] < hole[1] and r[1] > hole[0]]


def test_reloaded_digests_are_computed_again(
    registry: ExportRegistry, tmp_path: Path, root: Path
) -> None:
    """A record whose digests are not the file's (a bug or a planted record) is stale."""
    make_image(root / "img")
    registry.publish("img", root / "img")
    registry.close()
    path = tmp_path / "state" / "exports" / "img.json"
    record = json.loads(path.read_text())
    record["digests"][0] = bytes(32).hex()
    path.write_text(json.dumps(record))
    again = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    try:
        (loaded,) = again.load()
        with pytest.raises((ExportVerifying, ExportStale)) as info:
            loaded.read_chunk(0)
        assert info.value.code in ("export_verifying", "export_stale")
        again.wait_verified(30)
        assert loaded.state == "stale"
        assert json.loads(path.read_text())["state"] == "stale"
    finally:
        again.close()


def test_record_without_fast_digests_still_loads(tmp_path: Path, root: Path) -> None:
    """A record written before fast digests existed loads; they are computed again with
    the SHA-256 digests when the reloaded export is verified."""
    registry = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    make_image(root / "img")
    exp = registry.publish("img", root / "img")
    registry.close()
    path = tmp_path / "state" / "exports" / "img.json"
    record = json.loads(path.read_text())
    assert record["fast_digest_algorithm"] == "xxh3-128"
    assert record["fast_digests"] == [d.hex() for d in exp.fast_digests]
    del record["fast_digest_algorithm"], record["fast_digests"]
    path.write_text(json.dumps(record))
    again = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    try:
        (loaded,) = again.load()
        again.wait_verified(30)
        assert loaded.state == "ready" and loaded.digests == exp.digests
        assert loaded.fast_digests == exp.fast_digests
    finally:
        again.close()
