"""Item 10 of issue 14: every listening port is exclusive. A second agent given the gRPC
or the data port of a running one stops with a message and a non-zero exit (as for a
taken HTTP port), and the first keeps serving alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.tools.localagents import LocalAgent, free_port

from tests.security.peer_attacks import MiB, Watch, grant, stub


def _second_agent_exit(tmp: Path, first: LocalAgent, extra: list[str]) -> tuple[int, str]:
    second = LocalAgent(tmp, "second", [first.export_roots[0]], extra=extra)
    second.grpc_port = first.grpc_port if "--data-port" not in extra else free_port()
    second.workdir.mkdir(parents=True)
    done = subprocess.run(second.command(), capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr


@pytest.mark.parametrize("port", ["grpc", "data"])
def test_a_taken_port_stops_the_second_agent(tmp_path: Path, image, port: str) -> None:
    img = image(4 * MiB)
    data_port = free_port()
    first = LocalAgent(tmp_path, "first", [img.parent], extra=["--data-port", str(data_port)])
    first.start()
    try:
        r = first.request("POST", "/v1/exports", json={"name": "img", "path": str(img)})
        assert r.status_code == 201, r.text
        with Watch(first) as watch:
            extra = ["--data-port", str(data_port)] if port == "data" else []
            code, stderr = _second_agent_exit(tmp_path, first, extra)
            assert code != 0
            if port == "grpc":
                assert f"gRPC cannot listen on 127.0.0.1:{first.grpc_port}" in stderr, stderr
            else:
                assert f"native data channel: cannot listen on 127.0.0.1:{data_port}" in stderr
            assert "Traceback" not in stderr, stderr
            # the first agent serves every call alone
            channel, s = stub(first.grpc)
            with channel:
                for _ in range(20):
                    d = s.Describe(pb.DescribeRequest(export="img"), timeout=5)
                    assert d.size == img.stat().st_size
            assert grant(first.grpc)[0] == data_port
        watch.assert_healthy()
    finally:
        first.stop()


def test_grpc_server_options_refuse_port_sharing() -> None:
    """The option itself, so a gRPC upgrade that changes the default cannot bring reuse
    back unnoticed."""
    from pagewire.peer.wire import SERVER_OPTIONS

    assert ("grpc.so_reuseport", 0) in SERVER_OPTIONS
