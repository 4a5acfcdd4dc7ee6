"""Shared parts of the peer and data-channel attack tests: a watch on an agent (peak RSS
from /proc, /healthz throughout), a raw gRPC client, and native channel hellos."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc
from pagewire.tools.localagents import LocalAgent
from pagewire.tools.workload import command as workload_command

MiB = 1 << 20
CHAN_OK, CHAN_DENIED, CHAN_BUSY = 0, 3, 4


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


class Watch:
    """Samples the agents' RSS and asks their /healthz every 0.1 s until stopped."""

    def __init__(self, *agents: LocalAgent) -> None:
        self.agents = agents
        self.peak_kib = {a.name: 0 for a in agents}
        self.base_kib = {a.name: rss_kib(self.pid(a)) for a in agents}
        self.health_failures: list[str] = []
        self.health_checks = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def pid(agent: LocalAgent) -> int:
        assert agent.proc is not None
        return agent.proc.pid

    def _run(self) -> None:
        while not self._stop.is_set():
            for a in self.agents:
                try:  # an agent that died fails the watch; it never ends it silently
                    assert a.proc is not None and a.proc.poll() is None, "agent exited"
                    self.peak_kib[a.name] = max(self.peak_kib[a.name], rss_kib(self.pid(a)))
                    r = a.request("GET", "/healthz", timeout=2.0)
                    if r.status_code != 200:
                        self.health_failures.append(f"{a.name}: {r.status_code}")
                except Exception as exc:  # noqa: BLE001 - any failure counts
                    self.health_failures.append(f"{a.name}: {exc!r}")
                self.health_checks += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mib(self, agent: LocalAgent) -> float:
        return (self.peak_kib[agent.name] - self.base_kib[agent.name]) / 1024

    def assert_healthy(self) -> None:
        assert self.health_checks > 0
        assert not self.health_failures, self.health_failures[:5]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stub(address: str) -> tuple[grpc.Channel, Any]:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(address, options=options)
    return channel, pb_grpc.PageServiceStub(channel)


def grant(address: str, export: str = "img", token: str | None = None) -> tuple[int, bytes]:
    channel, s = stub(address)
    with channel:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        g = s.OpenChannel(pb.OpenChannelRequest(export=export), timeout=10, metadata=metadata)
    return int(g.port), bytes(g.token)


def recv_exact(sock: socket.socket, length: int) -> bytes:
    """length bytes, or fewer only if the peer closed. A socket with a timeout is
    non-blocking underneath, where MSG_WAITALL returns whatever has arrived so far."""
    got = bytearray()
    while len(got) < length:
        piece = sock.recv(length - len(got))
        if not piece:
            break
        got += piece
    return bytes(got)


def hello(port: int, token: bytes, kind: int) -> tuple[socket.socket, int]:
    """A native channel connection that said hello; returns it and the status answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"PWDATA01" + token + struct.pack("<II", kind, 0))
    reply = recv_exact(sock, 8)
    assert len(reply) == 8 and reply[:4] == b"PWOK", reply
    return sock, struct.unpack("<I", reply[4:])[0]


def fetch_chunk(sock: socket.socket, index: int) -> bytes:
    sock.sendall(struct.pack("<II", 1, 0) + struct.pack("<Q", index))
    head = recv_exact(sock, 16)
    _, length, status = struct.unpack("<QII", head)
    assert status == CHAN_OK, status
    return recv_exact(sock, length)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the agent closed the connection (after any refusal it wrote)."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if sock.recv(64) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


def restore(
    source: LocalAgent,
    dest: LocalAgent,
    image: Path,
    export: str = "img",
    headers: dict[str, str] | None = None,
) -> tuple[dict, dict]:
    """A real session of a real workload on dest from source's export; (what the workload
    saw, the final status)."""
    body = {"source": {"peer": source.grpc, "export": export}}
    r = dest.request("POST", "/v1/sessions", json=body, headers=headers)
    assert r.status_code == 201, r.text
    session = r.json()
    size = image.stat().st_size
    cmd = workload_command(session["socket"], size, "--verify", str(image), "--threads", "2")
    out = subprocess.run(cmd, capture_output=True, timeout=120).stdout
    seen = json.loads(out.decode().splitlines()[-1])
    deadline = time.monotonic() + 60
    while True:
        r = dest.request("GET", f"/v1/sessions/{session['id']}", headers=headers)
        status = r.json()
        if status["state"] not in ("awaiting_attach", "running", "paused"):
            return seen, status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
