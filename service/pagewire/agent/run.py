"""`pagewire agent`: one asyncio loop hosting FastAPI on uvicorn and the gRPC page service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from pagewire.agent.node import AgentState
from pagewire.agent.settings import Settings, split_host_port
from pagewire.control.app import create_app
from pagewire.control.httpguard import ConnectionLimits, guarded_protocol, listen_tcp

log = logging.getLogger("pagewire.agent")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent drains sessions first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings) -> None:
    limits = http_limits(settings)
    sockets: list[socket.socket] | None = None
    if settings.http.startswith("unix:"):
        where: dict[str, object] = {"uds": settings.http[5:]}
    else:
        host, port = split_host_port(settings.http)
        where = {"host": host, "port": port}
        try:
            sockets = [listen_tcp(host, port, settings.http_backlog, limits)]
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            log.error("cannot listen on %s: %s", settings.http, reason)
            raise SystemExit(1) from None
    agent = AgentState(settings)
    await agent.start()
    config = uvicorn.Config(
        create_app(agent),
        **where,  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        lifespan="off",
        http=guarded_protocol(limits),
        timeout_keep_alive=settings.http_idle_timeout_s,  # type: ignore[arg-type]
        backlog=settings.http_backlog,
    )
    server = _Server(config)
    stopping = asyncio.Event()

    async def drain() -> None:
        log.info("shutting down: draining sessions")
        await agent.stop()
        server.should_exit = True

    def on_signal(signum: int) -> None:
        if not stopping.is_set():
            stopping.set()
            asyncio.get_running_loop().create_task(drain())
        else:
            server.force_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info(
        "agent listening",
        extra={"http": settings.http, "grpc": settings.grpc, "node": settings.node_name},
    )
    if "uds" in where:
        loop.create_task(_restrict_socket(server, str(where["uds"])))
    try:
        await server.serve(sockets=sockets)
    finally:
        if not stopping.is_set():
            await agent.stop()
        await agent.close()


async def _restrict_socket(server: uvicorn.Server, path: str) -> None:
    """uvicorn makes its unix socket 0666; the API is for the agent's user only."""
    while not server.started and not server.should_exit:
        await asyncio.sleep(0.01)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)


class StartupError(Exception):
    """A condition the agent refuses to start under; the message names what to fix."""


def check_private_dir(path: Path, flag: str) -> None:
    """The dir must belong to the agent's user and be writable by nobody else (created
    0700 when missing): a socket or record someone else can plant is never trusted.
    Each existing parent must belong to root or that user, or be sticky where others
    may write to it, so nobody else can rename the dir away either."""
    uid = os.geteuid()
    path = path.absolute()
    if not os.path.lexists(path):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{flag} {path} is not a directory (symlinks are refused)")
    if st.st_uid != uid:
        raise StartupError(f"{flag} {path} is owned by uid {st.st_uid}, not the agent's {uid}")
    if st.st_mode & 0o022:
        raise StartupError(
            f"{flag} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        )
    for parent in path.parents:
        pst = os.stat(parent)
        if pst.st_uid not in (0, uid):
            raise StartupError(f"{flag} {path}: its parent {parent} is owned by uid {pst.st_uid}")
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise StartupError(f"{flag} {path}: its parent {parent} is writable by group or others")


FDS_PER_SESSION = 8  # listener, uffd, eventfd, source, peer connections
FDS_BASE = 256  # HTTP and gRPC connections, logs, the interpreter


def raise_fd_limit(settings: Settings) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; refuse to start if the limits of every
    kind of fd holder (exports, snapshots, sessions) cannot fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = (
        settings.max_exports
        + 3 * settings.max_snapshots
        + FDS_PER_SESSION * settings.max_sessions
        + settings.file_work_threads
        + FDS_BASE
    )
    if need > soft:
        raise StartupError(
            f"--max-exports {settings.max_exports}, --max-snapshots {settings.max_snapshots} "
            f"and --max-sessions {settings.max_sessions} need about {need} file descriptors; "
            f"RLIMIT_NOFILE allows {soft}"
        )
    return soft


def check_startup(settings: Settings) -> None:
    check_private_dir(settings.socket_dir, "--socket-dir")
    check_private_dir(settings.state_dir, "--state-dir")
    raise_fd_limit(settings)


def http_limits(settings: Settings) -> ConnectionLimits:
    """The REST connection caps, kept within half the fd limit (raised to its hard limit
    by check_startup), so a flood of connections never leaves the agent without fds."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = settings.max_http_connections
    if soft != resource.RLIM_INFINITY and cap > soft // 2:
        cap = max(1, soft // 2)
        log.warning(
            "--max-http-connections %d lowered to %d: half the fd limit (%d)",
            settings.max_http_connections,
            cap,
            soft,
        )
    return ConnectionLimits(
        cap, settings.max_http_connections_per_client, settings.http_header_timeout_s
    )


def run(settings: Settings) -> None:
    try:
        check_startup(settings)
    except (StartupError, OSError) as exc:
        print(f"pagewire agent: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings))
