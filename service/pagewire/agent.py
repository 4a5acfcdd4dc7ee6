"""`pagewire agent`: one asyncio loop hosting FastAPI on uvicorn and the gRPC page service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Iterator

import uvicorn

from .app import create_app
from .httpguard import ConnectionLimits, guarded_protocol, listen_tcp
from .settings import Settings, split_host_port
from .state import AgentState

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


def http_limits(settings: Settings) -> ConnectionLimits:
    """The REST connection caps, kept within half the fd limit (raised to its hard limit
    first), so a flood of connections never leaves the agent without fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
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
    asyncio.run(serve(settings))
