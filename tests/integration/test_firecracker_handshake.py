"""An unmodified Firecracker's handshake, replayed byte for byte, through a real agent-side
listener and engine, with balloon-style madvise(MADV_DONTNEED) while faults run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.core import engine
from pagewire.core.layout import SYSTEM_PAGE_SIZE

from .harness import accept_handoff

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
REPLAY = Path(__file__).with_name("fc_replay.py")


async def replay(tmp: Path, img: Path, removes: str, remote: bool) -> tuple[dict, dict, str]:
    size = img.stat().st_size
    sock_path, ballooned = tmp / "fc.sock", tmp / "ballooned"
    accept = asyncio.create_task(accept_handoff(sock_path, size))
    while not sock_path.exists():
        await asyncio.sleep(0.01)
    proc = subprocess.Popen(
        [sys.executable, str(REPLAY), str(sock_path), str(img), str(size), removes, str(ballooned)],
        stdout=subprocess.PIPE,
    )
    conn, handoff = await accept
    assert handoff.features & _uffd.FEATURE_EVENT_REMOVE
    assert len(handoff.regions) == 2 and handoff.regions[1].offset == size // 2
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    src = os.open(img, os.O_RDONLY)
    zmap = _uffd.zero_map(src, size, SYSTEM_PAGE_SIZE)
    eng = engine.open_engine(
        handoff,
        efd,
        engine.EngineOptions(background=False),  # no completion before the balloon is done
        source_fd=-1 if remote else src,
        source_size=size,
        zero_map=zmap,
        zero_map_page_size=SYSTEM_PAGE_SIZE,
    )
    os.close(handoff.uffd)
    eng.start()
    loop = asyncio.get_running_loop()
    while eng.state == "running":
        for off in eng.take_requests():
            base = off - off % (64 << 10)
            await asyncio.sleep(0.001)  # a peer round trip, during which REMOVEs can land
            eng.install(base, os.pread(src, 64 << 10, base), _uffd.FAULT)
        if ballooned.exists():  # the rest, over pages faulted in and pages removed
            for off in range(0, size, 1 << 20):
                eng.install(off, os.pread(src, 1 << 20, off), _uffd.BACKGROUND)
                await asyncio.sleep(0)
        await asyncio.sleep(0.002)
    try:
        out, _ = await loop.run_in_executor(None, lambda: proc.communicate(timeout=60))
    except subprocess.TimeoutExpired:
        where = workload_threads(proc.pid)
        proc.kill()
        pytest.fail(f"workload hung; engine {eng.state} {eng.error} {eng.stats()}; {where}")
    stats, state = eng.stats(), eng.state
    eng.close()
    conn.close()
    os.close(src)
    return json.loads(out.decode().splitlines()[-1]), stats, state


def workload_threads(pid: int) -> dict[str, str]:
    """Where each of the workload's threads waits in the kernel."""
    where = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            where[task.name] = (task / "stack").read_text().replace("\n", " | ")
        except OSError as exc:
            where[task.name] = str(exc)
    return where


@pytest.mark.parametrize("remote", [False, True])
def test_firecracker_replay_with_balloon(tmp_path: Path, image, remote: bool) -> None:
    img = image(16 * MiB)
    removes = f"{1 * MiB}:{512 << 10},{3 * MiB}:{64 << 10},{5 * MiB + 4096}:{2 * MiB}"
    report, stats, state = asyncio.run(replay(tmp_path, img, removes, remote))
    assert state == "completed"
    assert report["wrong"] == [], report
    assert report["unregistered"], "regions still registered after completion"
    assert report["madvise_after_s"] < 1.0
    assert stats["events_remove"] >= 1
