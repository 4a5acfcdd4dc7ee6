"""The native engine restoring real workload processes, byte for byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .harness import run_session

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


@pytest.mark.parametrize("order,threads", [("random", 1), ("random", 4), ("sequential", 2)])
def test_local_restore_is_byte_exact(tmp_path: Path, image, order: str, threads: int) -> None:
    img = image(32 * MiB)
    args = [
        "--size",
        str(32 * MiB),
        "--order",
        order,
        "--threads",
        str(threads),
        "--verify",
        str(img),
    ]
    r = asyncio.run(run_session(tmp_path, img, args))
    assert r.engine_state == "completed", r.engine_error
    assert r.workload and r.workload["verified"], r.workload
    assert r.stats["pages_missing"] == 0
    assert r.stats["faults_local"] + r.stats["faults_zero"] == r.hist_count


def test_several_regions_with_offsets(tmp_path: Path, image) -> None:
    img = image(48 * MiB)
    layout = f"{8 * MiB}:{16 * MiB},{4 * MiB}:0,{12 * MiB}:{36 * MiB}"
    args = ["--layout", layout, "--order", "random", "--threads", "2", "--verify", str(img)]
    r = asyncio.run(run_session(tmp_path, img, args))
    assert r.engine_state == "completed", r.engine_error
    assert r.workload and r.workload["verified"], r.workload
    assert r.stats["pages_total"] == 24 * MiB // 4096


@pytest.mark.parametrize("threads", [1, 4])
def test_python_served_pages_are_byte_exact(tmp_path: Path, image, threads: int) -> None:
    """Faults the engine cannot serve go to Python through the eventfd queue."""
    img = image(16 * MiB)
    args = ["--size", str(16 * MiB), "--threads", str(threads), "--verify", str(img)]
    r = asyncio.run(run_session(tmp_path, img, args, remote=True))
    assert r.engine_state == "completed", r.engine_error
    assert r.workload and r.workload["verified"], r.workload
    assert r.stats["faults_remote"] > 0


def test_untouched_region_completes_by_background_fill(tmp_path: Path, image) -> None:
    img = image(32 * MiB)
    args = ["--size", str(32 * MiB), "--order", "none", "--hold", "0.5", "--verify", str(img)]
    r = asyncio.run(run_session(tmp_path, img, args))
    assert r.engine_state == "completed", r.engine_error
    assert r.stats["faults_local"] == 0 and r.stats["faults_zero"] == 0
    assert r.stats["pages_background"] == r.stats["pages_total"]
    assert r.workload and r.workload["verified"], r.workload


def test_workload_exit_fails_the_session(tmp_path: Path, image) -> None:
    img = image(8 * MiB)
    args = ["--size", str(8 * MiB), "--exit-after", "0"]
    r = asyncio.run(run_session(tmp_path, img, args, remote=True, serve_requests=False))
    assert r.engine_state == "failed"
    assert r.engine_error == "workload_exited"
    assert r.returncode == 3
