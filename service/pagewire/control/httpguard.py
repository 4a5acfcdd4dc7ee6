"""The REST API's front door, before FastAPI sees a request.

An ASGI middleware checks the bearer token from the headers alone, then reads the body
itself, counting bytes as they arrive (chunked or not) and stopping at the limit, under a
deadline. Only then does the application run, on the buffered body. A uvicorn h11
protocol subclass caps connections (overall and per client address) and closes a
connection whose request headers do not arrive in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pagewire.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# answered without a token: probes and scrapers authenticate by network policy
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def token_matches(header: bytes, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, compared as bytes (any byte value is safe)."""
    scheme, _, given = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class RequestGuard:
    """Authenticate from headers, then read at most max_body bytes within body_timeout_s."""

    def __init__(self, app: App, token: str | None, max_body: int, body_timeout_s: float) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in PUBLIC_PATHS:
            if not token_matches(headers.get(b"authorization", b""), self.token):
                await refuse(send, 401, "unauthorized", "a valid bearer token is required")
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await refuse(send, 413, "body_too_large", f"bodies are at most {self.max_body} bytes")
            return
        try:
            body = await asyncio.wait_for(self.read_body(receive), self.body_timeout_s)
        except TimeoutError:
            await refuse(
                send, 408, "body_timeout", f"the body did not arrive within {self.body_timeout_s} s"
            )
            return
        if body is None:
            await refuse(send, 413, "body_too_large", f"bodies are at most {self.max_body} bytes")
            return
        await self.app(scope, replay(body, receive), send)

    async def read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes max_body (or the client left)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)  # disconnected: the app sees an empty body and ends
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as uvicorn does

    return replayed


async def refuse(send: Send, status: int, code: str, message: str) -> None:
    """Answer and close: the unread rest of a body is never read."""
    payload = error_body(code, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RateLimitedLog:
    """At most one line per interval for a repeated refusal, with a count of the rest."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -self.interval_s) < self.interval_s:
            self.skipped[key] = self.skipped.get(key, 0) + 1
            return
        skipped = self.skipped.pop(key, 0)
        self.last[key] = now
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        log.warning(message + suffix)


def raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    payload = error_body(code, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + payload


class ConnectionLimits:
    """Shared by every connection of one server: the caps, the timeout, the counts."""

    def __init__(self, max_connections: int, max_per_client: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.refusals = RateLimitedLog()
        self.preadmitted: set[int] = set()  # fds counted in by the listener already

    def refusal(self, client: str) -> str | None:
        """Why a new connection from client would be refused, or None."""
        if self.total >= self.max_connections:
            return f"{self.total} connections open, at most {self.max_connections}"
        held = self.per_client.get(client, 0)
        if held >= self.max_per_client:
            return f"{client} holds {held} connections, at most {self.max_per_client}"
        return None

    def admit(self, client: str) -> str | None:
        """Count the connection in, or say why not."""
        refusal = self.refusal(client)
        if refusal is None:
            self.total += 1
            self.per_client[client] = self.per_client.get(client, 0) + 1
        return refusal

    def refuse(self, refusal: str) -> bytes:
        self.refusals.warning("cap", f"refusing HTTP connection: {refusal}")
        return raw_response(503, "Service Unavailable", "too_many_connections", refusal)

    def release(self, client: str) -> None:
        self.total -= 1
        held = self.per_client.pop(client, 1) - 1
        if held > 0:
            self.per_client[client] = held


class GuardedListener(socket.socket):
    """The REST listening socket. asyncio's accept loop calls accept(); connections over a
    cap are answered 503 and closed right here, before asyncio builds a transport and a
    protocol for them, so a flood is shed cheaply and the accept queue keeps draining
    (a /healthz probe queued behind the flood gets in). What it admits it counts, so the
    fds held never pass the cap however many connections one accept batch brings."""

    limits: ConnectionLimits
    REFUSALS_PER_CALL = 512  # then the loop runs everything else before accepting more

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(self.REFUSALS_PER_CALL):
            conn, addr = super().accept()
            client = str(addr[0]) if isinstance(addr, tuple) and addr else "unix"
            refusal = self.limits.admit(client)
            if refusal is None:
                self.limits.preadmitted.add(conn.fileno())
                return conn, addr
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(self.limits.refuse(refusal))
            conn.close()
        raise BlockingIOError


def listen_tcp(host: str, port: int, backlog: int, limits: ConnectionLimits) -> GuardedListener:
    """Bind host:port (SO_REUSEADDR only: a port in use stops the agent)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = GuardedListener(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.limits = limits
    return sock


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a request-header deadline."""

    class GuardedH11Protocol(H11Protocol):
        counted_as: str | None = None
        header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
            sock = transport.get_extra_info("socket")
            fd = sock.fileno() if sock is not None else -1
            if fd in limits.preadmitted:
                limits.preadmitted.discard(fd)
                refusal = None
            else:  # a unix socket: no guarded listener in front
                refusal = limits.admit(client)
            if refusal is not None:
                transport.write(limits.refuse(refusal))
                transport.close()
                return
            self.counted_as = client
            super().connection_made(transport)
            self.arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.counted_as is None:
                return  # refused in connection_made: uvicorn never saw it
            limits.release(self.counted_as)
            self.counted_as = None
            self.disarm_header_deadline()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_deadline()  # the next request's headers get the same time

        def arm_header_deadline(self) -> None:
            self.disarm_header_deadline()
            if not self.transport.is_closing():
                self.header_deadline = self.loop.call_later(
                    limits.header_timeout_s, self.headers_too_slow
                )

        def disarm_header_deadline(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def headers_too_slow(self) -> None:
            self.header_deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # closed, or a request is under way (its body has its own deadline)
            if self.conn.trailing_data[0]:  # part of a request arrived: say why it ends
                limits.refusals.warning(
                    "headers",
                    f"closing HTTP connection from {self.counted_as}: request headers "
                    f"incomplete after {limits.header_timeout_s} s",
                )
                self.transport.write(
                    raw_response(
                        408,
                        "Request Timeout",
                        "header_timeout",
                        f"request headers must arrive within {limits.header_timeout_s} s",
                    )
                )
            self.transport.close()

    return GuardedH11Protocol
