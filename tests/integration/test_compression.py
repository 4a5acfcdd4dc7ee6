"""Wire compression negotiated per session: byte-exact, fewer bytes on the wire for a
compressible image, no harm for an incompressible one; over the native channel and gRPC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pagewire import _uffd

from tests.conftest import need
from tests.peers import publish, restore, start_pair, stop_pair

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


def compressible_image(path: Path, size: int) -> Path:
    """Text-like pages: compress well, but no page is all zero."""
    line = b"pagewire moves memory pages on demand; compressible page data follows. "
    block = (line * (65536 // len(line) + 1))[:65536]
    with open(path, "wb") as f:
        for i in range(size // 65536):
            f.write(block[:-8] + i.to_bytes(8, "little"))
    return path


def random_image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("native", [True, False], ids=["native", "grpc"])
def test_compression_pays_only_where_it_can(tmp_path: Path, native: bool) -> None:
    need(_uffd.zstd_available(), "libzstd.so.1 is not installed")
    extra = [] if native else ["--no-native-channel"]
    p = start_pair(tmp_path, extra_src=extra)
    try:
        roots = p.roots
        results = {}
        for name, make in (("text", compressible_image), ("random", random_image)):
            img = make(roots / f"{name}.img", 8 * MiB)
            for mode in ("none", "zstd"):
                r = p.source.request("DELETE", "/v1/exports/img")
                assert r.status_code in (200, 404)
                publish(p, img)
                # bulk only: no demand fault races the bulk stream, so bytes are exact
                seen, status = restore(p, img, "--order", "none", "--hold", "0.5", compression=mode)
                assert seen["verified"], seen
                assert status["state"] == "completed"
                assert status["transport"] == ("native" if native else "grpc")
                results[(name, mode)] = status["bytes_received"]
        assert results[("text", "zstd")] < results[("text", "none")] / 4
        assert results[("random", "zstd")] <= results[("random", "none")] * 1.02
    finally:
        stop_pair(p)
