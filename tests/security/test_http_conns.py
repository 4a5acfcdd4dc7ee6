"""Issue 14 item 14: slowloris before authentication. Connections are capped overall and
per client address, request headers get a deadline, idle keep-alive connections close,
and repeated refusals and warnings are rate-limited in the log. Two floods of 10,000
slow-header connections leave /healthz answering."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pagewire.tools.localagents import LocalAgent, free_port

from tests.security.rest_util import (
    MiB,
    Watch,
    connect,
    read_response,
    start_agent,
    status_of,
)

REPO = Path(__file__).resolve().parents[2]


def slowloris(port: int, source: str, count: int, seconds: float) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "tests.security.slowloris",
        str(port),
        source,
        str(count),
        str(seconds),
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)


def error_code(response: bytes) -> str:
    return str(json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"])


def test_two_floods_of_10000_slow_headers_leave_healthz_answering(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "loris", extra=["--http-header-timeout-s", "5"])
    assert agent.proc is not None
    log_before = agent.log_path.stat().st_size
    try:
        # a probe may wait for its SYN to be retried (1 s, 3 s, 7 s) while the accept queue
        # is full of the flood: 10 s, as a kubelet probe may be given
        with Watch(agent, every_s=0.25, timeout_s=10.0) as watch:
            floods = [slowloris(agent.http_port, f"127.0.0.{n}", 10_000, 25) for n in (2, 3)]
            seen = [json.loads(p.communicate(timeout=120)[0]) for p in floods]
        log_growth = agent.log_path.stat().st_size - log_before
        print("2 x 10,000 slow-header connections:", watch.figures(), f"log +{log_growth} B", seen)
        watch.assert_healthy(rss_growth=64 * MiB)
        assert watch.probes >= 5 and watch.longest_gap_s < 15.0
        # 256 per client address by default: the rest were refused at once, with a reason
        assert watch.peak_fds < 2 * 256 + 150, watch.peak_fds
        for s in seen:
            assert s["opened"] >= 10_000, s  # the attacker really made its connections
            assert s["answers"].get("503", 0) > 0, s  # too_many_connections
            assert s["answers"].get("408", 0) > 0, s  # header_timeout
        assert log_growth < 100_000, log_growth  # refusals are logged, rate-limited
        assert "Traceback" not in agent.log_tail(1000)
    finally:
        agent.stop()


def test_slow_headers_idle_and_silent_connections_are_closed(tmp_path: Path) -> None:
    agent = start_agent(
        tmp_path, "deadline", extra=["--http-header-timeout-s", "1", "--http-idle-timeout-s", "1"]
    )
    port = agent.http_port
    try:
        # headers trickling in a line at a time do not extend the deadline
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        began = time.monotonic()
        s.settimeout(0.2)
        response = b""
        while time.monotonic() - began < 10 and not response:
            try:
                response = s.recv(65536)
            except TimeoutError:
                s.sendall(b"X-Slow: yes\r\n")
        elapsed = time.monotonic() - began
        assert status_of(response) == 408 and error_code(response) == "header_timeout", response
        assert 0.8 < elapsed < 3.0, elapsed
        s.close()
        # a connection that never says anything
        s = connect(port)
        began = time.monotonic()
        assert read_response(s, timeout=10) == b""
        assert time.monotonic() - began < 3.0
        s.close()
        # a keep-alive connection left idle after its answer
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        began = time.monotonic()
        response = read_response(s, timeout=10)
        assert status_of(response) == 200 and time.monotonic() - began < 3.0
        s.close()
    finally:
        agent.stop()


def test_connection_caps_overall_and_per_client(tmp_path: Path) -> None:
    """One cap from its flag, the other from its PAGEWIRE_* environment twin."""
    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(
        tmp_path,
        "caps",
        [roots],
        extra=["--max-http-connections", "40"],
        env={"PAGEWIRE_MAX_HTTP_CONNECTIONS_PER_CLIENT": "16"},
    ).start()
    port = agent.http_port
    held: list[Any] = []
    try:
        held += [connect(port, "127.0.0.2") for _ in range(16)]
        wait_accepted(agent)
        s = connect(port, "127.0.0.2")  # a 17th from one address
        response = read_response(s, timeout=5)
        assert status_of(response) == 503 and error_code(response) == "too_many_connections"
        assert b"127.0.0.2 holds 16 connections, at most 16" in response
        assert agent.request("GET", "/healthz", timeout=5).status_code == 200  # others get in
        for source, n in (("127.0.0.3", 16), ("127.0.0.4", 8)):
            held += [connect(port, source) for _ in range(n)]
            wait_accepted(agent)
        s = connect(port, "127.0.0.5")  # a fresh address meets the overall cap
        response = read_response(s, timeout=5)
        assert status_of(response) == 503 and error_code(response) == "too_many_connections"
        assert b"40 connections open, at most 40" in response
        for s in held[:8]:
            s.close()
        held = held[8:]
        deadline = time.monotonic() + 10
        while agent.request("GET", "/healthz", timeout=2).status_code != 200:
            assert time.monotonic() < deadline
    finally:
        for s in held:
            s.close()
        agent.stop()


def accept_queue(port: int) -> int:
    """Connections the kernel holds for the agent's listening socket, not yet accepted."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on {port}")


def wait_accepted(agent: LocalAgent) -> None:
    """Until the agent has accepted (and so counted) every connection made so far."""
    deadline = time.monotonic() + 10
    while accept_queue(agent.http_port):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_repeated_warnings_are_rate_limited(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "spam", extra=["--log-repeat-limit", "5"])
    try:
        with Watch(agent) as watch:
            for _ in range(300):
                s = connect(agent.http_port)
                s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert status_of(read_response(s, timeout=5)) == 400
                s.close()
        watch.assert_healthy(rss_growth=32 * MiB)
        lines = [ln for ln in agent.log_tail(100_000).splitlines() if "Invalid HTTP request" in ln]
        assert 1 <= len(lines) <= 5, lines
    finally:
        agent.stop()


class FdLimitedAgent(LocalAgent):
    """An agent started under a small fd limit (prlimit execs it: same pid)."""

    def command(self) -> list[str]:
        return ["prlimit", "--nofile=512:512", "--", *super().command()]


def test_the_connection_cap_stays_under_the_fd_limit(tmp_path: Path) -> None:
    """Under a small fd limit the cap is lowered to half of it: a flood of connections
    never reaches EMFILE (which once logged a traceback per accept() attempt); refusals
    are logged a few times, not once per attempt; the agent serves when it ends."""
    roots = tmp_path / "roots"
    roots.mkdir()
    extra = [
        "--max-http-connections", "5000", "--max-http-connections-per-client", "5000",
        "--log-repeat-limit", "3",
        # the fd budget the agent checks at start must fit under 512
        "--max-exports", "32", "--max-snapshots", "4", "--max-sessions", "8",
    ]  # fmt: skip
    agent = FdLimitedAgent(tmp_path, "fds", [roots], extra=extra).start()
    assert agent.proc is not None
    try:
        assert "lowered to 256" in agent.log_tail()
        with Watch(agent) as watch:
            flood = slowloris(agent.http_port, "127.0.0.2", 3_000, 10)
            seen = json.loads(flood.communicate(timeout=120)[0])
        print("3,000 connections, fd limit 512:", watch.figures(), seen)
        assert seen["answers"].get("503", 0) > 0
        assert watch.peak_fds < 256 + 64, watch.peak_fds  # the cap, plus the agent's own
        log = agent.log_tail(100_000)
        assert "out of system resource" not in log
        assert log.count("refusing HTTP connection") <= 3
        deadline = time.monotonic() + 20
        while agent.request("GET", "/healthz", timeout=2).status_code != 200:
            assert time.monotonic() < deadline
        assert agent.request("GET", "/v1/sessions").status_code == 200
    finally:
        agent.stop()


def test_a_busy_http_port_stops_the_agent(tmp_path: Path) -> None:
    """The REST socket is bound by the agent itself now (for the accept guard): a port
    already taken still stops it with a message, before anything else starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cmd = [
            sys.executable, "-m", "pagewire.tools.cli", "agent",
            "--http", f"127.0.0.1:{port}", "--grpc", f"127.0.0.1:{free_port()}",
            "--socket-dir", str(tmp_path / "sock"), "--state-dir", str(tmp_path / "state"),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "address already in use" in done.stderr, done.stderr
