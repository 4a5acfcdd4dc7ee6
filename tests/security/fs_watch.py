"""What every files-and-processes attack test checks while it runs: /healthz answers,
the agent's RSS (VmRSS from /proc) stays bounded, and nothing appears outside the root."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
from pagewire.tools.localagents import LocalAgent

MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> list[str]:
    """Where each of the process's fds points."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def tree(path: Path) -> list[str]:
    """Every name under path (recursive), to show nothing was created there."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


class Watch:
    """Polls /healthz and VmRSS every 50 ms in a thread while an attack runs."""

    def __init__(self, agent: LocalAgent, interval: float = 0.05) -> None:
        assert agent.proc is not None
        self.agent = agent
        self.pid = agent.proc.pid
        self.interval = interval
        self.peak_rss = rss_bytes(self.pid)
        self.start_rss = self.peak_rss
        self.health_failures: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.agent.client(timeout=10.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.get("/healthz")
                    if r.status_code != 200:
                        self.health_failures.append(f"status {r.status_code}")
                except httpx.HTTPError as exc:
                    self.health_failures.append(repr(exc))
                self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
                self.polls += 1
                self._stop.wait(self.interval)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_healthy(self, max_rss: int) -> None:
        assert self.polls > 0
        assert not self.health_failures, self.health_failures[:5]
        assert self.peak_rss <= max_rss, f"agent RSS peaked at {self.peak_rss / MiB:.1f} MiB"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
