"""How much page data peers may make this agent hold: byte budgets per stream, per peer
and in all, and the per-peer stream count. A stream that cannot get its share in time is
refused with RESOURCE_EXHAUSTED (README "Limits")."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from pagewire.peer.status import Abort


@dataclass(frozen=True)
class PeerLimits:
    """What peers may do here; the defaults are the agent's (settings.py)."""

    stream_bytes: int = 16 << 20  # page bytes one stream may have read and not yet sent
    peer_bytes: int = 64 << 20  # ... all streams of one peer
    total_bytes: int = 256 << 20  # ... all peers
    peer_streams: int = 64  # Bulk and Urgent streams open per peer
    wait_s: float = 10.0  # how long a stream waits for the peer or agent budget
    working_set_interval_s: float = 10.0  # per export
    token: str | None = None  # plain-text peers send it as "authorization: Bearer <token>"
    anonymous_loopback: bool = False  # ... except loopback peers when this is set
    allow: tuple[str, ...] = ()  # mTLS: SAN patterns allowed to read; empty: any

    @classmethod
    def from_settings(cls, s: Any) -> PeerLimits:
        return cls(
            stream_bytes=s.serve_stream_bytes,
            peer_bytes=s.serve_peer_bytes,
            total_bytes=s.serve_bytes,
            peer_streams=s.serve_peer_streams,
            wait_s=s.serve_wait_s,
            working_set_interval_s=s.working_set_interval_s,
            token=s.token(),
            anonymous_loopback=s.peer_anonymous_loopback,
            allow=tuple(s.peer_allow),
        )


class ByteBudget:
    """Bytes taken and not yet given back, at most capacity; takers wait in order. A take
    larger than the capacity takes all of it (one oversized message still goes through)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, n: int) -> int | None:
        n = min(n, self.capacity)
        if self._waiters or self.used + n > self.capacity:
            return None
        self.used += n
        return n

    async def take(self, n: int) -> int:
        got = self.try_take(n)
        if got is not None:
            return got
        n = min(n, self.capacity)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(n)  # granted, but the taker was cancelled meanwhile
            self._wake()
            raise
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
            elif self.used + n <= self.capacity:
                self._waiters.popleft()
                self.used += n
                waiter.set_result(None)
            else:
                break


@dataclass
class _Peer:
    """One peer's open streams and page bytes in flight (forgotten when both are zero)."""

    budget: ByteBudget
    streams: int = 0


Lease = tuple[int, int, int]  # bytes taken from the stream's, the peer's and the agent's budget


@dataclass
class Flow:
    """One stream's share of its own budget, its peer's and the agent's. A message holds
    its lease while it is read and written; once written, gRPC may still hold it (one
    message per stream, until the reader makes room), so its peer and agent share is
    kept until the next write of the stream completes."""

    stream: ByteBudget
    peer: ByteBudget
    agent: ByteBudget
    wait_s: float
    held: list[Lease] = field(default_factory=list)
    in_grpc: Lease = (0, 0, 0)

    def _shares(self, n: int) -> tuple[int, int]:
        """What a message of n bytes takes from the peer and agent budgets: never more
        than they can give beside this stream's message in gRPC (no self-deadlock)."""
        _, b, c = self.in_grpc
        return min(n, self.peer.capacity - b), min(n, self.agent.capacity - c)

    def try_take(self, n: int) -> Lease | None:
        nb, nc = self._shares(n)
        a = self.stream.try_take(n)
        if a is None:
            return None
        b = self.peer.try_take(nb)
        c = self.agent.try_take(nc) if b is not None else None
        if b is None or c is None:
            self.stream.give(a)
            if b is not None:
                self.peer.give(b)
            return None
        self.held.append((a, b, c))
        return a, b, c

    async def take(self, n: int) -> Lease:
        """Waits for the reader (the stream budget) as long as it takes, and for the peer
        and agent budgets up to wait_s: then RESOURCE_EXHAUSTED."""
        nb, nc = self._shares(n)
        a = await self.stream.take(n)
        b = self.peer.try_take(nb)  # the usual case, without a timer task
        c = self.agent.try_take(nc) if b is not None else None
        try:
            if b is None:
                b = await asyncio.wait_for(self.peer.take(nb), self.wait_s)
            if c is None:
                c = await asyncio.wait_for(self.agent.take(nc), self.wait_s)
        except BaseException as exc:
            self.stream.give(a)
            if b is not None:
                self.peer.give(b)
            if not isinstance(exc, TimeoutError):
                raise
            which = (
                "this peer's (--serve-peer-bytes)" if b is None else "the agent's (--serve-bytes)"
            )
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"page data in flight is at {which} limit for {self.wait_s:g} s; retry later",
            ) from None
        self.held.append((a, b, c))
        return a, b, c

    def give(self, lease: Lease) -> None:
        """A message that was not written after all."""
        self.held.remove(lease)
        self._give(lease)

    def written(self, lease: Lease) -> None:
        """gRPC took the message: the stream's share is free, the peer's and agent's move
        to the message in gRPC (the one before it has left)."""
        self.held.remove(lease)
        a, b, c = lease
        self.stream.give(a)
        self._give(self.in_grpc)
        self.in_grpc = (0, b, c)

    def _give(self, lease: Lease) -> None:
        a, b, c = lease
        self.stream.give(a)
        self.peer.give(b)
        self.agent.give(c)

    def close(self) -> None:
        while self.held:
            self.give(self.held[-1])
        self._give(self.in_grpc)
        self.in_grpc = (0, 0, 0)


class PeerFlows:
    """The agent's budget and each peer's open streams and budget (a peer is forgotten
    when it has neither)."""

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self.budget = ByteBudget(limits.total_bytes)
        self.peers: dict[str, _Peer] = {}

    @contextlib.contextmanager
    def stream(self, peer: str) -> Iterator[Flow]:
        """A Bulk or Urgent stream of peer: counted against its stream limit; page bytes it
        reads are leased from its own, its peer's and the agent's budget."""
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = _Peer(ByteBudget(self.limits.peer_bytes))
        if state.streams >= self.limits.peer_streams:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"peer {peer} has {state.streams} streams open, the limit (--serve-peer-streams)",
            )
        state.streams += 1
        flow = Flow(
            ByteBudget(self.limits.stream_bytes), state.budget, self.budget, self.limits.wait_s
        )
        try:
            yield flow
        finally:
            flow.close()
            state.streams -= 1
            if state.streams == 0 and state.budget.used == 0:
                del self.peers[peer]
