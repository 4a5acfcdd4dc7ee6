"""Two real agent processes restoring over gRPC. As root the agents live in two network
namespaces joined by a veth pair, so pages really cross an interface; otherwise loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc
from pagewire.tools.localagents import LocalAgent

from tests.peers import Peers, publish, restore, start_pair, stop_pair

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
CORRUPT_PEER = Path(__file__).with_name("corrupt_peer.py")


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = start_pair(tmp_path)
    yield p
    stop_pair(p)


@pytest.fixture
def loopback_peers(tmp_path: Path) -> Iterator[Peers]:
    """For tests whose own process speaks gRPC to the source."""
    p = start_pair(tmp_path, isolated=False)
    yield p
    stop_pair(p)


@pytest.mark.parametrize(
    "order,threads,touch",
    [("random", 4, "read"), ("sequential", 1, "read"), ("random", 2, "write")],
)
def test_remote_restore_byte_exact(
    peers: Peers, image, order: str, threads: int, touch: str
) -> None:
    """Byte-exact after read touches and after write touches (a write stores the byte it
    read, so the whole region must still equal the image)."""
    img = image(24 * MiB)
    export = publish(peers, img)
    writes = ["--write"] if touch == "write" else []
    seen, status = restore(peers, img, "--order", order, "--threads", str(threads), *writes)
    assert seen["verified"], seen
    assert status["state"] == "completed", status
    assert status["faults"]["remote"] > 0 and status["faults"]["local"] == 0
    data_bytes = (export["pages"] - export["zero_pages"]) * 4096
    # zero pages never cross the network; every data page crosses at least once
    assert data_bytes <= status["bytes_received"] < 2 * data_bytes


def test_bulk_only(peers: Peers, image) -> None:
    img = image(24 * MiB)
    publish(peers, img)
    seen, status = restore(peers, img, "--order", "none", "--hold", "0.5")
    assert seen["verified"] and status["state"] == "completed"
    assert sum(status["faults"].values()) == 0
    assert status["pages_background"] > 0


def test_urgent_path_under_load(peers: Peers, image) -> None:
    img = image(16 * MiB)
    publish(peers, img)
    seen, status = restore(peers, img, "--order", "random", "--threads", "4", background=False)
    assert seen["verified"] and status["state"] == "completed"
    assert status["faults"]["remote"] > 0 and status["pages_background"] == 0


def test_unknown_export_and_stale_export(peers: Peers, image) -> None:
    r = peers.dest.request(
        "POST", "/v1/sessions", json={"source": {"peer": peers.source.grpc, "export": "nope"}}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "export_not_found"
    img = image(4 * MiB)
    publish(peers, img)
    with open(img, "r+b") as f:
        f.write(b"changed")
    r = peers.dest.request(
        "POST", "/v1/sessions", json={"source": {"peer": peers.source.grpc, "export": "img"}}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "export_stale", r.text
    assert peers.source.request("GET", "/v1/exports/img").json()["state"] == "stale"


def test_bad_grpc_requests_leave_the_source_healthy(loopback_peers: Peers, image) -> None:
    peers = loopback_peers
    img = image(4 * MiB)
    publish(peers, img)

    def call(fn: Any) -> grpc.StatusCode:
        try:
            fn()
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    with grpc.insecure_channel(peers.source.grpc) as channel:
        stub = pb_grpc.PageServiceStub(channel)
        assert (
            call(lambda: stub.Describe(pb.DescribeRequest(export="nope")))
            == grpc.StatusCode.NOT_FOUND
        )
        assert call(lambda: stub.Describe(pb.DescribeRequest(export=""))) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        )
        bad = iter([pb.ChunkRequest(export="img", request_id=1, chunks=[10**9])])
        assert call(lambda: list(stub.Urgent(bad))) == grpc.StatusCode.OUT_OF_RANGE
        assert (
            call(lambda: list(stub.Bulk(pb.BulkRequest(export="img", want=b"\x01"))))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="pagewire.v1.PageService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    seen, status = restore(peers, img)
    assert seen["verified"] and status["state"] == "completed"


def test_corrupted_chunks_are_refused_and_fetched_again(tmp_path: Path, image) -> None:
    img = image(8 * MiB)
    dest = LocalAgent(tmp_path, "destination", []).start()
    peer = subprocess.Popen(
        [
            sys.executable,
            str(CORRUPT_PEER),
            str(tmp_path / "peer-state"),
            str(img),
            "img",
            "127.0.0.1:0",
            "3",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        p = Peers(LocalAgent(tmp_path, "unused", []), dest, img.parent, None)
        p.source.host, p.source.grpc_port = "127.0.0.1", port
        seen, status = restore(p, img, "--threads", "2")
        assert seen["verified"], seen
        assert status["state"] == "completed"
        metrics = dest.request("GET", "/metrics").text
        failures = [
            line
            for line in metrics.splitlines()
            if line.startswith("pagewire_digest_failures_total")
        ]
        assert failures and float(failures[0].split()[1]) >= 1, failures
    finally:
        peer.kill()
        dest.stop()


def test_mtls_between_agents(tmp_path: Path, image) -> None:
    p = start_pair(tmp_path, tls=True)
    try:
        img = image(8 * MiB)
        publish(p, img)
        seen, status = restore(p, img, "--threads", "2")
        assert seen["verified"] and status["state"] == "completed"
        # under mTLS too: TLS 1.3 in the engine (on failure, say why it fell back)
        channel_log = [x for x in p.dest.log_path.read_text().splitlines() if "native" in x]
        assert status["transport"] == "native", channel_log
    finally:
        stop_pair(p)


def test_mtls_refuses_other_peers(tmp_path: Path, image) -> None:
    p = start_pair(tmp_path, tls=True, isolated=False)
    try:
        publish(p, image(1 * MiB))
        # a peer whose certificate another CA signed is refused
        pki = tmp_path / "pki"
        with grpc.secure_channel(
            p.source.grpc,
            grpc.ssl_channel_credentials(
                (pki / "ca.crt").read_bytes(),
                (pki / "rogue.key").read_bytes(),
                (pki / "rogue.crt").read_bytes(),
            ),
        ) as channel:
            stub = pb_grpc.PageServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.Describe(pb.DescribeRequest(export="img"), timeout=5)
        # and so is a plain-text one
        with grpc.insecure_channel(p.source.grpc) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.PageServiceStub(channel).Describe(
                    pb.DescribeRequest(export="img"), timeout=5
                )
    finally:
        stop_pair(p)
