"""Helpers for the REST attacks: a real agent process, its RSS and fds from /proc, a
/healthz watcher that runs through the attack, and raw-socket requests."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path

import httpx
from pagewire.tools.localagents import LocalAgent

MiB = 1 << 20
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start_agent(
    tmp: Path, name: str, extra: list[str] | None = None, token: bool = True
) -> LocalAgent:
    roots = tmp / "roots"
    roots.mkdir(exist_ok=True)
    flags = list(extra or [])
    if token:
        token_file = tmp / f"{name}.token"
        token_file.write_text(TOKEN + "\n")
        flags += ["--token-file", str(token_file)]
    return LocalAgent(tmp, name, [roots], extra=flags).start()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Watch:
    """Polls /healthz (from 127.0.0.1) and samples the agent's RSS and fds until stopped."""

    def __init__(self, agent: LocalAgent, every_s: float = 0.2, timeout_s: float = 5.0) -> None:
        assert agent.proc is not None
        self.agent = agent
        self.pid = agent.proc.pid
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.base_rss = rss_bytes(self.pid)
        self.peak_rss = self.base_rss
        self.peak_fds = fd_count(self.pid)
        self.probes = 0
        self.failures: list[str] = []
        self.slowest_s = 0.0
        self.longest_gap_s = 0.0  # between two answered probes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        url = f"{self.agent.url}/healthz"
        answered = time.monotonic()
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                r = httpx.get(url, timeout=self.timeout_s)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.longest_gap_s = max(self.longest_gap_s, time.monotonic() - answered)
                    answered = time.monotonic()
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.probes += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - began)
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        try:
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            self.peak_fds = max(self.peak_fds, fd_count(self.pid))
        except (OSError, AssertionError):
            self.failures.append("agent process gone")

    def assert_healthy(self, rss_growth: int) -> None:
        assert self.probes > 0
        assert not self.failures, self.failures[:5]
        grown = self.peak_rss - self.base_rss
        assert grown < rss_growth, f"RSS grew {grown / MiB:.1f} MiB (limit {rss_growth / MiB})"

    def figures(self) -> str:
        return (
            f"RSS {self.base_rss / MiB:.0f} -> peak {self.peak_rss / MiB:.0f} MiB, "
            f"peak fds {self.peak_fds}, {self.probes} /healthz probes, "
            f"slowest {self.slowest_s:.2f} s, longest gap {self.longest_gap_s:.2f} s, "
            f"failures {len(self.failures)}"
        )


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_response(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (our refusals close) or the timeout."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def stream_body(
    port: int, head: bytes, total: int, chunked: bool, chunk: int = MiB
) -> tuple[bytes, int]:
    """Send head, then up to total body bytes, stopping as soon as the server answers.
    Returns (response, body bytes sent)."""
    s = connect(port)
    s.sendall(head)
    sent = 0
    piece = b"x" * chunk
    framed = f"{chunk:x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    try:
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 10.0)
            if readable or not writable:
                break
            s.sendall(framed)
            sent += chunk
        if sent >= total and chunked:
            s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = read_response(s)
    s.close()
    return response, sent
