"""Network baselines on this machine: raw loopback TCP and a bare grpcio service.

What pagewire's peer path is compared against, measured between two processes:

- ``tcp_throughput``: one process sends with large ``sendall`` buffers, this one receives
  with ``recv_into``; GB/s.
- ``tcp_round_trip``: a small ping-pong with an echo process (TCP_NODELAY); p50/p99 µs.
- ``grpc_round_trip``: grpc.aio against a server subprocess speaking pagewire's own proto
  with a trivial servicer that answers fixed bytes: a unary call (Describe, 64 KiB
  response) and a bidi round trip on Urgent (one request, one 64 KiB chunk back); p50/p99 µs.
- ``grpc_stream``: Bulk server streaming of 1 MiB messages; GB/s.

Every function returns a dict; ``run_all`` runs them all.

usage: python bench/net_baselines.py [--tcp-mib 1024] [--stream-mib 1024] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MiB, emit, median

HOST = "127.0.0.1"
TCP_BUFFER = 4 * MiB
GRPC_MAX_MESSAGE = 64 * MiB
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
]
ROUND_TRIP_BYTES = 64 * 1024
STREAM_MESSAGE_BYTES = MiB
SCRIPT = str(Path(__file__).resolve())


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {
        "p50_us": round(s[len(s) // 2] / 1e3, 2),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3, 2),
        "samples": float(len(s)),
    }


class _Pinned:
    """Run this process (and helpers started inside) on one vCPU; ``None`` leaves it free."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.saved = os.sched_getaffinity(0)

    def __enter__(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self.saved)


def _helper(*args: str) -> subprocess.Popen[bytes]:
    """Start this file in a helper role; it prints its port on the first line."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--role", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"helper did not start: {err}")
    return int(line)


# --- helper roles (run in the child process) -----------------------------------------


def _role_tcp_send(port: int, total: int) -> None:
    buf = memoryview(bytearray(os.urandom(TCP_BUFFER)))
    with socket.create_connection((HOST, port)) as s:
        sent = 0
        while sent < total:
            n = min(TCP_BUFFER, total - sent)
            s.sendall(buf[:n])
            sent += n
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver to close


def _role_tcp_echo() -> None:
    with socket.socket() as lsock:
        lsock.bind((HOST, 0))
        lsock.listen(1)
        print(lsock.getsockname()[1], flush=True)
        conn, _ = lsock.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray(65536)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                conn.sendall(memoryview(buf)[:n])


def _role_grpc_server() -> None:
    import grpc
    from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
    from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

    small = os.urandom(ROUND_TRIP_BYTES)
    big = pb.ChunkBatch(chunks=[pb.Chunk(index=0, data=os.urandom(STREAM_MESSAGE_BYTES))])
    description = pb.ExportDescription(name="bench", size=ROUND_TRIP_BYTES, zero_map=small)

    class Trivial(pb_grpc.PageServiceServicer):
        async def Describe(self, request: Any, context: Any) -> Any:  # noqa: N802
            return description

        async def Urgent(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
            async for req in request_iterator:
                chunks = [pb.Chunk(index=i, data=small) for i in req.chunks]
                yield pb.ChunkBatch(request_id=req.request_id, chunks=chunks)

        async def Bulk(self, request: Any, context: Any) -> Any:  # noqa: N802
            # the trivial servicer reads the byte count to stream from max_batch_bytes (MiB)
            for _ in range(request.max_batch_bytes):
                yield big

    async def serve() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_PageServiceServicer_to_server(Trivial(), server)
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


# --- measurements (run in this process) ----------------------------------------------


def tcp_throughput(total_bytes: int = 1024 * MiB, runs: int = 5) -> dict[str, Any]:
    """Loopback TCP, one sender process, one receiver (this process); GB/s."""
    rates = []
    for _ in range(runs):
        with socket.socket() as lsock:
            lsock.bind((HOST, 0))
            lsock.listen(1)
            proc = _helper("tcp-send", str(lsock.getsockname()[1]), str(total_bytes))
            try:
                conn, _ = lsock.accept()
                with conn:
                    buf = memoryview(bytearray(TCP_BUFFER))
                    got = 0
                    t0 = time.perf_counter()
                    while got < total_bytes:
                        n = conn.recv_into(buf)
                        if not n:
                            break
                        got += n
                    elapsed = time.perf_counter() - t0
                if got != total_bytes:
                    raise RuntimeError(f"tcp throughput: received {got} of {total_bytes}")
                rates.append(total_bytes / elapsed / 1e9)
                proc.wait(10)
            finally:
                _stop(proc)
    return {
        "gbps": round(median(rates), 3),
        "gbps_max": round(max(rates), 3),
        "bytes": total_bytes,
        "buffer_bytes": TCP_BUFFER,
        "runs": runs,
    }


def tcp_round_trip(
    iterations: int = 20000, size: int = 64, pin_cpu: int | None = None
) -> dict[str, Any]:
    """Ping-pong of ``size`` bytes with an echo process over loopback; p50/p99 µs.

    With ``pin_cpu`` both processes share that vCPU (no cross-vCPU wake-ups).
    """
    with _Pinned(pin_cpu):
        return _tcp_round_trip(iterations, size)


def _tcp_round_trip(iterations: int, size: int) -> dict[str, Any]:
    proc = _helper("tcp-echo")
    try:
        port = _read_port(proc)
        with socket.create_connection((HOST, port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * size
            buf = bytearray(size)
            view = memoryview(buf)
            samples = []
            for i in range(iterations + iterations // 10):
                t0 = time.perf_counter_ns()
                s.sendall(msg)
                got = 0
                while got < size:
                    n = s.recv_into(view[got:])
                    if not n:
                        raise RuntimeError("echo closed")
                    got += n
                if i >= iterations // 10:  # the first tenth warms up
                    samples.append(time.perf_counter_ns() - t0)
    finally:
        _stop(proc)
    return {**percentiles_us(samples), "message_bytes": size}


async def _grpc_measure(port: int, iterations: int, stream_bytes: int) -> dict[str, Any]:
    import grpc
    from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
    from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"{HOST}:{port}", options=GRPC_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = pb_grpc.PageServiceStub(channel)
        warm = iterations // 10

        # unary: Describe with a 64 KiB response
        samples = []
        req = pb.DescribeRequest(export="bench")
        for i in range(iterations + warm):
            t0 = time.perf_counter_ns()
            reply = await stub.Describe(req)
            dt = time.perf_counter_ns() - t0
            assert len(reply.zero_map) == ROUND_TRIP_BYTES
            if i >= warm:
                samples.append(dt)
        out["unary"] = {**percentiles_us(samples), "response_bytes": ROUND_TRIP_BYTES}

        # bidi: one ChunkRequest on Urgent, one 64 KiB chunk back, on one open stream
        samples = []
        call = stub.Urgent()
        for i in range(iterations + warm):
            t0 = time.perf_counter_ns()
            await call.write(pb.ChunkRequest(export="bench", request_id=i + 1, chunks=[i]))
            batch = await call.read()
            dt = time.perf_counter_ns() - t0
            assert batch.request_id == i + 1 and len(batch.chunks[0].data) == ROUND_TRIP_BYTES
            if i >= warm:
                samples.append(dt)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        out["bidi"] = {**percentiles_us(samples), "response_bytes": ROUND_TRIP_BYTES}

        # server streaming: Bulk with 1 MiB messages
        messages = max(1, stream_bytes // STREAM_MESSAGE_BYTES)
        rates = []
        for _ in range(3):
            got = 0
            started = time.perf_counter()
            async for batch in stub.Bulk(pb.BulkRequest(export="bench", max_batch_bytes=messages)):
                got += len(batch.chunks[0].data)
            elapsed = time.perf_counter() - started
            assert got == messages * STREAM_MESSAGE_BYTES, got
            rates.append(got / elapsed / 1e9)
        out["stream"] = {
            "gbps": round(median(rates), 3),
            "gbps_max": round(max(rates), 3),
            "bytes": messages * STREAM_MESSAGE_BYTES,
            "message_bytes": STREAM_MESSAGE_BYTES,
            "runs": len(rates),
        }
    return out


def grpc_baselines(
    iterations: int = 2000, stream_bytes: int = 1024 * MiB, pin_cpu: int | None = None
) -> dict[str, Any]:
    """Bare grpc.aio: unary and bidi round trips (64 KiB answers) and a 1 MiB-message stream."""
    with _Pinned(pin_cpu):
        proc = _helper("grpc-server")
        try:
            port = _read_port(proc)
            result = asyncio.run(_grpc_measure(port, iterations, stream_bytes))
        finally:
            _stop(proc)
    result["grpcio_version"] = __import__("grpc").__version__
    return result


def run_all(
    tcp_bytes: int = 1024 * MiB,
    stream_bytes: int = 1024 * MiB,
    rtt_iterations: int = 20000,
    grpc_iterations: int = 2000,
) -> dict[str, Any]:
    """Every baseline, processes free to run on any vCPU (as the agents do); round trips
    also with both ends pinned to one vCPU, which shows what cross-vCPU wake-ups cost."""
    grpc_result = grpc_baselines(grpc_iterations, stream_bytes)
    grpc_pinned = grpc_baselines(grpc_iterations, MiB, pin_cpu=0)
    return {
        "tcp_throughput": tcp_throughput(tcp_bytes),
        "tcp_round_trip": tcp_round_trip(rtt_iterations),
        "tcp_round_trip_one_vcpu": tcp_round_trip(rtt_iterations, pin_cpu=0),
        "grpc_unary_round_trip": grpc_result["unary"],
        "grpc_bidi_round_trip": grpc_result["bidi"],
        "grpc_unary_round_trip_one_vcpu": grpc_pinned["unary"],
        "grpc_bidi_round_trip_one_vcpu": grpc_pinned["bidi"],
        "grpc_stream": grpc_result["stream"],
        "grpcio_version": grpc_result["grpcio_version"],
        "vcpus": os.cpu_count(),
    }


def quick_args() -> dict[str, int]:
    return {
        "tcp_bytes": 256 * MiB,
        "stream_bytes": 128 * MiB,
        "rtt_iterations": 2000,
        "grpc_iterations": 300,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--tcp-mib", type=int, default=1024)
    p.add_argument("--stream-mib", type=int, default=1024)
    p.add_argument("--rtt-iterations", type=int, default=20000)
    p.add_argument("--grpc-iterations", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    a = p.parse_args()
    if a.role:
        role, *rest = a.role
        if role == "tcp-send":
            _role_tcp_send(int(rest[0]), int(rest[1]))
        elif role == "tcp-echo":
            _role_tcp_echo()
        elif role == "grpc-server":
            _role_grpc_server()
        return
    if a.quick:
        kw = quick_args()
    else:
        kw = {
            "tcp_bytes": a.tcp_mib * MiB,
            "stream_bytes": a.stream_mib * MiB,
            "rtt_iterations": a.rtt_iterations,
            "grpc_iterations": a.grpc_iterations,
        }
    emit("net_baselines_quick" if a.quick else "net_baselines", {**run_all(**kw), "quick": a.quick})


if __name__ == "__main__":
    main()
