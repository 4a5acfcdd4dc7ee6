"""Agents as child processes on this machine: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import functools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One context for every client: building one loads the system's CA bundle, 21 ms of
    CPU (2 ms for a client now), so a poller at 20 requests a second took about 40% of a
    vCPU from the agents a benchmark measures."""
    return ssl.create_default_context()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalAgent:
    """One `pagewire agent` process with its own directories and ports."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        export_roots: list[Path],
        *,
        host: str = "127.0.0.1",
        extra: list[str] | None = None,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir / name
        self.name = name
        self.host = host
        self.http_port = free_port() if netns is None else 7070
        self.grpc_port = free_port() if netns is None else 7071
        self.data_port = free_port() if netns is None else 7072
        self.export_roots = export_roots
        self.extra = extra or []
        self.netns = netns
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "agent.log"
        # inside a network namespace the REST API listens on a unix socket, which the
        # test process reaches from any namespace
        self.uds = str(self.workdir / "api.sock") if netns else None

    @property
    def url(self) -> str:
        return "http://agent" if self.uds else f"http://{self.host}:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"unix:{self.uds}" if self.uds else f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pagewire.tools.cli",
            "agent",
            "--http",
            self.http_address,
            "--grpc",
            f"{self.host}:{self.grpc_port}",
            "--socket-dir",
            str(self.workdir / "sockets"),
            "--state-dir",
            str(self.workdir / "state"),
            "--node-name",
            self.name,
            "--data-port",
            str(self.data_port),
        ]
        for root in self.export_roots:
            cmd += ["--export-root", str(root)]
        cmd += self.extra
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self, timeout: float = 20.0) -> LocalAgent:
        """Start the agent. A port picked free can be taken before the agent binds it
        (by any ephemeral bind on this machine): then it tries again on fresh ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            log = open(self.log_path, "ab")
            env = dict(os.environ, **self.env)
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
            log.close()
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                port_taken = "address already in use" in self.log_tail()
                if not port_taken or self.netns is not None or attempt == 2:
                    raise
                self.kill()
                self.http_port, self.grpc_port = free_port(), free_port()
                self.data_port = free_port()
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited: {self.log_tail()}")
            try:
                if self.request("GET", "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.name} did not come up: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds, verify=tls_context()) if self.uds else None
        return httpx.Client(
            base_url=self.url, transport=transport, timeout=timeout, verify=tls_context()
        )

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        timeout = kw.pop("timeout", 30.0)
        with self.client(timeout) as c:
            return c.request(method, path, **kw)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
