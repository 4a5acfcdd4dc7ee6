"""Run one engine session in-process against a real workload subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagewire import _uffd
from pagewire.core import engine
from pagewire.core.handoff import Handoff, SocketSpec, listen, receive_handoff, send_verdict
from pagewire.core.layout import SYSTEM_PAGE_SIZE, Limits

CHUNK = 64 << 10


def workload_cmd(socket_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pagewire.tools.workload", "--socket", str(socket_path), *args]


@dataclass
class Result:
    engine_state: str
    engine_error: str | None
    stats: dict[str, int]
    workload: dict[str, Any] | None
    returncode: int
    hist_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


async def accept_handoff(sock_path: Path, image_size: int) -> tuple[Any, Handoff]:
    listener = listen(SocketSpec(sock_path))
    loop = asyncio.get_running_loop()
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 20)
    listener.close()
    handoff = await receive_handoff(conn, Limits(image_size=image_size))
    send_verdict(conn)  # pagewire.client waits for it; Firecracker never reads it
    return conn, handoff


async def run_session(
    tmp: Path,
    image: Path,
    workload_args: list[str],
    *,
    remote: bool = False,
    background: bool = True,
    serve_requests: bool = True,
    timeout: float = 60.0,
) -> Result:
    """remote=True: the engine has no local fd; this harness plays the peer with pread."""
    size = image.stat().st_size
    sock_path = tmp / "s.sock"
    listener_task = asyncio.create_task(accept_handoff(sock_path, size))
    while not sock_path.exists():
        await asyncio.sleep(0.01)
    proc = subprocess.Popen(workload_cmd(sock_path, *workload_args), stdout=subprocess.PIPE)
    _conn, handoff = await listener_task
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    src = os.open(image, os.O_RDONLY)
    zmap = _uffd.zero_map(src, size, SYSTEM_PAGE_SIZE)
    pidfd = os.pidfd_open(handoff.pid)
    eng = engine.open_engine(
        handoff,
        efd,
        engine.EngineOptions(background=background),
        source_fd=-1 if remote else src,
        source_size=size,
        zero_map=zmap,
        zero_map_page_size=SYSTEM_PAGE_SIZE,
        pidfd=pidfd,
    )
    os.close(handoff.uffd)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_notify() -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            pass
        for off in eng.take_requests():
            if serve_requests:
                base = off - off % CHUNK
                eng.install(base, os.pread(src, min(CHUNK, size - base), base), _uffd.FAULT)
        if eng.state != "running":
            done.set()

    loop.add_reader(efd, on_notify)
    eng.start()

    async def bulk() -> None:
        off = 0
        while off < size and eng.state == "running":
            n = min(1 << 20, size - off)
            eng.install(off, os.pread(src, n, off), _uffd.BACKGROUND)
            off += n
            await asyncio.sleep(0)

    if remote and background and serve_requests:
        asyncio.ensure_future(bulk())
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        loop.remove_reader(efd)
    out, _ = await loop.run_in_executor(None, lambda: proc.communicate(timeout=timeout))
    lines = out.decode().strip().splitlines()
    import json

    result = Result(
        eng.state,
        eng.error,
        eng.stats(),
        json.loads(lines[-1]) if lines else None,
        proc.returncode,
        engine.all_faults_histogram(eng).count,
    )
    eng.close()
    os.close(src)
    os.close(efd)
    os.close(pidfd)
    return result
