"""Item 4 of issue 14: a peer that stops reading is made to wait, never buffered. Before,
one urgent stream of 64 requests of 768 chunks that never read its answers took the
source to 2.8 GiB, and 100 bulk streams that never read to 4.1 GiB. Now each stream has
at most --serve-stream-bytes unsent, a peer --serve-peer-bytes and the agent --serve-bytes
(a taker waits up to --serve-wait-s, then RESOURCE_EXHAUSTED), and a peer has at most
--serve-peer-streams streams open."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pagewire.exports.chunks import pack_bits
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb

from tests.peers import publish, start_pair, stop_pair
from tests.security.peer_attacks import MiB, Watch, restore, stub, wait_for

pytestmark = pytest.mark.usefixtures("require_uffd")
# A byte in flight costs up to ~3 bytes of RSS (the bytes read, the protobuf message, its
# serialized form); the budget counts each stream's message in gRPC, except one message
# that does not fit beside it. Bound: RSS_FACTOR x (budget + largest message).
RSS_FACTOR = 4


def rss_bound_mib(budget_mib: int, message_mib: int) -> int:
    return RSS_FACTOR * (budget_mib + message_mib)


def _codes(calls: list) -> dict[str, int]:  # type: ignore[type-arg]
    out: dict[str, int] = {}
    for call in calls:
        if call.done():
            out[call.code().name] = out.get(call.code().name, 0) + 1
    return out


def _read_everything(address: str, chunks: int) -> int:
    channel, s = stub(address)
    with channel:
        want = pack_bits(b"\x01" * chunks)
        return sum(len(b.chunks) for b in s.Bulk(pb.BulkRequest(export="img", want=want)))


def test_urgent_streams_that_never_read_hold_at_most_the_peer_budget(tmp_path: Path, image) -> None:
    p = start_pair(tmp_path, isolated=False)
    try:
        img = image(64 * MiB)
        publish(p, img)
        other = image(16 * MiB, seed=2, name="other.bin")
        publish(p, other, "other")
        channels = [stub(p.source.grpc) for _ in range(2)]
        with Watch(p.source) as watch:
            calls = []
            for _, s in channels:
                requests = [
                    pb.ChunkRequest(export="img", request_id=i, chunks=list(range(768)))
                    for i in range(64)
                ]
                calls.append(s.Urgent(iter(requests)))  # never read
            # while they hang, a real session restores byte-exact
            seen, status = restore(p.source, p.dest, other, "other")
            assert seen["verified"] and status["state"] == "completed", status
            wait_for(lambda: time.monotonic() - watch.started > 8, 10, "the flood to settle")
            for call in calls:
                call.cancel()
        watch.assert_healthy()
        # --serve-peer-bytes default; an urgent answer of 768 chunks is at most 48 MiB
        print(f"urgent flood: source RSS +{watch.growth_mib(p.source):.0f} MiB")
        assert watch.growth_mib(p.source) < rss_bound_mib(64, 48), watch.peak_kib
        # the budget came back with the cancelled streams
        assert _read_everything(p.source.grpc, 1024) > 0
        for channel, _ in channels:
            channel.close()
    finally:
        stop_pair(p)


@pytest.mark.parametrize(
    ("flags", "budget_mib", "named"),
    [
        ([], 64, "--serve-peer-bytes"),
        (["--serve-bytes", str(32 * MiB)], 32, "--serve-bytes"),
    ],
    ids=["peer-budget", "agent-budget"],
)
def test_bulk_streams_that_never_read_are_bounded_and_refused(
    tmp_path: Path, image, flags: list[str], budget_mib: int, named: str
) -> None:
    p = start_pair(tmp_path, extra_src=[*flags, "--serve-wait-s", "2"], isolated=False)
    try:
        img = image(64 * MiB)
        publish(p, img)
        other = image(16 * MiB, seed=2, name="other.bin")
        publish(p, other, "other")
        channels = [stub(p.source.grpc) for _ in range(4)]
        want = pack_bits(b"\x01" * 1024)
        with Watch(p.source) as watch:
            calls = [
                channels[k % 4][1].Bulk(
                    pb.BulkRequest(export="img", want=want, max_batch_bytes=8 * MiB)
                )
                for k in range(100)
            ]
            # past the stream limit: refused at once; then those left waiting for the budget
            wait_for(lambda: sum(_codes(calls).values()) >= 36, 10, "the stream limit")
            wait_for(lambda: sum(_codes(calls).values()) >= 60, 20, "the budget's refusals")
            details = {c.details() for c in calls if c.done()}
            assert any("--serve-peer-streams" in d for d in details), details
            assert any(named in d for d in details), details
            assert set(_codes(calls)) == {"RESOURCE_EXHAUSTED"}
            seen, status = restore(p.source, p.dest, other, "other")
            assert seen["verified"] and status["state"] == "completed", status
            for call in calls:
                call.cancel()
        watch.assert_healthy()
        print(f"bulk flood ({named}): source RSS +{watch.growth_mib(p.source):.0f} MiB")
        assert watch.growth_mib(p.source) < rss_bound_mib(budget_mib, 8), watch.peak_kib
        assert _read_everything(p.source.grpc, 1024) > 0
        for channel, _ in channels:
            channel.close()
    finally:
        stop_pair(p)
