"""Waiting for a workload on a session's or snapshot's socket: the first good handoff wins."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from pagewire.core.handoff import Handoff, HandoffError, receive_handoff, refuse_handoff
from pagewire.core.layout import Limits

MAX_PENDING_HANDOFFS = 8  # connections of one session read at once (each times out in 5 s)


async def accept_handoff(
    listener: socket.socket,
    limits: Limits,
    timeout_s: float,
    allowed_uids: list[int],
    refused: Callable[[HandoffError], None],
) -> Handoff:
    """The first good handoff within timeout_s from a uid in allowed_uids (any uid when
    empty). Connections are read side by side (up to MAX_PENDING_HANDOFFS), so a silent
    or bad one neither ends the wait nor delays the real workload; each refusal fails
    closed and is passed to refused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending: set[asyncio.Future[Any]] = set()
    accepting: asyncio.Future[Any] | None = None
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HandoffError("attach_timeout", "no workload attached in time")
            if accepting is None and len(pending) < MAX_PENDING_HANDOFFS:
                accepting = asyncio.ensure_future(loop.sock_accept(listener))
            waiting = pending | ({accepting} if accepting is not None else set())
            done, _ = await asyncio.wait(
                waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is accepting:
                    accepting = None
                    conn, _ = task.result()
                    pending.add(asyncio.ensure_future(_receive(conn, limits, allowed_uids)))
                    continue
                pending.discard(task)
                try:
                    handoff: Handoff = task.result()
                except HandoffError as exc:
                    refused(exc)
                    continue
                for other in done - {task, accepting}:  # a second one in the same instant
                    if other in pending and not other.exception():
                        pending.discard(other)
                        refuse_handoff(other.result(), "already_attached")
                return handoff
    finally:
        if accepting is not None and accepting.done() and not accepting.cancelled():
            with contextlib.suppress(Exception):
                accepting.result()[0].close()  # accepted in the same instant: dropped
        elif accepting is not None:
            accepting.cancel()
            pending.add(accepting)
        for task in pending:  # cancelled handoffs are refused and fail closed
            task.cancel()
        # wait for the cancellations to remove their readers: the listener's fd number
        # is reused (by the session's eventfd) as soon as it is closed
        await asyncio.gather(*pending, return_exceptions=True)


async def _receive(conn: socket.socket, limits: Limits, allowed_uids: list[int]) -> Handoff:
    handoff = await receive_handoff(conn, limits, check_registration=False)
    if allowed_uids and handoff.uid not in allowed_uids:
        refuse_handoff(handoff, "peer_not_allowed", f"handoff from uid {handoff.uid} refused")
        raise HandoffError("peer_not_allowed", f"handoff from uid {handoff.uid} refused")
    return handoff
