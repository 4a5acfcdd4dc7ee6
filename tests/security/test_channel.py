"""The native data channel under attack (issue 14, items 9, 13 and 23): idle connections,
connection floods from one peer, grants that outlive a withdraw, and grant floods. Real
agents, real TCP, real workloads; each test checks the refusal, the source's RSS, that a
real session stays byte-exact, and /healthz throughout."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import grpc
import pytest
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb

from tests.peers import publish, start_pair, stop_pair
from tests.security.peer_attacks import (
    CHAN_BUSY,
    CHAN_DENIED,
    CHAN_OK,
    MiB,
    Watch,
    closed_by_peer,
    fd_targets,
    fetch_chunk,
    grant,
    hello,
    restore,
    stub,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("require_uffd")


def test_idle_connections_neither_hold_the_channel_nor_stop_a_session(
    tmp_path: Path, image
) -> None:
    """Item 9: 300 connections that never say hello. Each is dropped after the hello
    deadline (2 s), at most 16 per peer wait at once, and a real session still gets the
    native channel."""
    p = start_pair(tmp_path, isolated=False)
    try:
        img = image(16 * MiB)
        publish(p, img)
        port, _ = grant(p.source.grpc)
        with Watch(p.source, p.dest) as watch:
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
            seen, status = restore(p.source, p.dest, img)
            assert seen["verified"] and status["state"] == "completed", status
            assert status["transport"] == "native", status
            # every idle connection is closed by the source within the deadline (+ slack)
            for sock in idle:
                assert closed_by_peer(sock, 5.0)
                sock.close()
            # one idle connection alone lasts the hello deadline (2 s), not longer
            opened = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                assert closed_by_peer(sock, 6.0)
            assert 1.5 < time.monotonic() - opened < 4.0
        watch.assert_healthy()
        print(f"300 idle data connections: source RSS +{watch.growth_mib(p.source):.0f} MiB")
        assert watch.growth_mib(p.source) < 64, watch.peak_kib
    finally:
        stop_pair(p)


def test_a_peer_over_its_connection_limit_is_refused_and_the_session_says_why(
    tmp_path: Path, image
) -> None:
    """Item 9: --channel-peer-conns bounds one peer's connections; the refused hello gets
    CHAN_BUSY, and a session that falls back to gRPC logs the cause."""
    p = start_pair(tmp_path, extra_src=["--channel-peer-conns", "4"], isolated=False)
    try:
        img = image(8 * MiB)
        publish(p, img)
        held = []
        for _ in range(2):
            port, token = grant(p.source.grpc)
            for kind in (1, 2):
                sock, status = hello(port, token, kind)
                assert status == CHAN_OK
                held.append(sock)
        port, token = grant(p.source.grpc)
        sock, status = hello(port, token, 1)
        assert status == CHAN_BUSY
        sock.close()
        with Watch(p.source) as watch:
            seen, status = restore(p.source, p.dest, img)
        assert seen["verified"] and status["state"] == "completed", status
        assert status["transport"] == "grpc"
        assert "connection limit" in p.dest.log_path.read_text()
        watch.assert_healthy()
        # the held connections still serve (each session's bulk connection first: it
        # skips a chunk its urgent connection already sent)
        for sock in reversed(held):
            assert len(fetch_chunk(sock, 1)) > 0
            sock.close()
    finally:
        stop_pair(p)


def test_withdraw_revokes_grants_drops_connections_and_closes_the_file(
    tmp_path: Path, image
) -> None:
    """Item 13: after DELETE /v1/exports/{name} the export's grants are refused, its live
    channel connections are closed, and no fd of the agent still holds its file, so a
    removed file's space is freed; 300 publish/OpenChannel/withdraw cycles leak no fd."""
    p = start_pair(tmp_path, isolated=False)
    try:
        img = image(32 * MiB)
        other = image(8 * MiB, seed=2, name="other.bin")
        publish(p, other, "other")
        publish(p, img, "img")
        pid = p.source.proc.pid  # type: ignore[union-attr]
        port, token = grant(p.source.grpc, "img")
        live, status = hello(port, token, 1)
        assert status == CHAN_OK and len(fetch_chunk(live, 0)) > 0
        unused_port, unused = grant(p.source.grpc, "img")
        assert p.source.request("DELETE", "/v1/exports/img").status_code == 200
        assert closed_by_peer(live, 5.0)
        live.close()
        for kind in (1, 2):
            sock, status = hello(unused_port, unused, kind)
            assert status == CHAN_DENIED
            sock.close()
        channel, s = stub(p.source.grpc)
        with channel, pytest.raises(grpc.RpcError) as refused:
            s.Describe(pb.DescribeRequest(export="img"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        os.unlink(img)
        wait_for(
            lambda: not [t for t in fd_targets(pid) if str(img) in t],
            5.0,
            "the agent to close the withdrawn file",
        )
        # fds do not grow over many cycles
        before = len(fd_targets(pid))
        cycle = image(1 * MiB, seed=3, name="cycle.bin")
        with Watch(p.source) as watch:
            for _ in range(300):
                publish(p, cycle, "cycle")
                grant(p.source.grpc, "cycle")
                assert p.source.request("DELETE", "/v1/exports/cycle").status_code == 200
        watch.assert_healthy()
        after = len(fd_targets(pid))
        print(f"300 publish/OpenChannel/withdraw cycles: fds {before} -> {after}")
        assert after <= before + 4, (before, fd_targets(pid))
        # the other export was never touched
        seen, status = restore(p.source, p.dest, other, "other")
        assert seen["verified"] and status["transport"] == "native", status
    finally:
        stop_pair(p)


def _open_channel(s, export: str = "img") -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    """OpenChannel's status code and details."""
    try:
        s.OpenChannel(pb.OpenChannelRequest(export=export), timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("flags", "limit", "flag"),
    [
        (["--channel-peer-grants", "200"], 200, "--channel-peer-grants"),
        (["--channel-grants", "150"], 150, "--channel-grants"),
    ],
    ids=["per-peer", "overall"],
)
def test_grants_are_bounded_short_lived_and_single_use(
    tmp_path: Path, image, flags: list[str], limit: int, flag: str
) -> None:
    """Item 23: a flood of OpenChannel calls is refused with RESOURCE_EXHAUSTED past the
    bound (naming the flag), grants expire after --channel-grant-ttl-s, each serves one
    urgent and one bulk connection, and the agent's memory does not grow with the flood."""
    ttl = 3.0
    p = start_pair(tmp_path, extra_src=[*flags, "--channel-grant-ttl-s", str(ttl)], isolated=False)
    try:
        img = image(8 * MiB)
        publish(p, img)
        channel, s = stub(p.source.grpc)
        with channel, Watch(p.source) as watch:
            port, token = grant(p.source.grpc)
            started = time.monotonic()
            answers = [_open_channel(s) for _ in range(5000)]
            elapsed = time.monotonic() - started
            codes = [code for code, _ in answers]
            assert codes[: limit - 1] == [grpc.StatusCode.OK] * (limit - 1)
            assert codes[limit - 1] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert flag in answers[limit - 1][1], answers[limit - 1]  # the refusal names it
            # grants given back only as others expire
            assert codes.count(grpc.StatusCode.OK) <= limit * (elapsed / ttl + 1)
            # grants come back once the flood's have expired (the flood took slots as they
            # freed up, so the last of its grants is as young as the flood's end)
            flood_end = time.monotonic()
            wait_for(lambda: time.monotonic() > flood_end + ttl, ttl + 1, "the flood's grants")
            wait_for(lambda: _open_channel(s)[0] == grpc.StatusCode.OK, 2, "a grant again")
            port, token = grant(p.source.grpc)
            unused_port, unused = grant(p.source.grpc)
            granted_at = time.monotonic()
            # single use per kind
            sock, status = hello(port, token, 1)
            assert status == CHAN_OK
            again, status = hello(port, token, 1)
            assert status == CHAN_DENIED
            again.close()
            # after its lifetime an unused grant is refused
            wait_for(lambda: time.monotonic() > granted_at + ttl, ttl + 1, "the lifetime")
            late, status = hello(unused_port, unused, 1)
            assert status == CHAN_DENIED
            late.close()
            assert len(fetch_chunk(sock, 0)) > 0  # a connection made in time keeps serving
            sock.close()
            seen, status = restore(p.source, p.dest, img)
            assert seen["verified"] and status["transport"] == "native", status
        watch.assert_healthy()
        print(
            f"5000 OpenChannel ({flag} {limit}): source RSS +{watch.growth_mib(p.source):.0f} MiB"
        )
        assert watch.growth_mib(p.source) < 32, watch.peak_kib
    finally:
        stop_pair(p)
