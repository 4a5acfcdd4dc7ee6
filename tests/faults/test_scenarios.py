"""Fault injection between two agents in network namespaces joined by veth (root only):
signals, a cut link, delay and loss, a corrupting peer, a REMOVE storm, cancel, and the
sigbus policy. Each scenario ends with a byte-for-byte check of the region (or the SIGBUS
it expects) and asserts that no workload thread stayed blocked past the deadline.

This kernel has no sch_netem, so delay comes from a relay that holds every byte for the
one-way delay, loss from an nftables rule dropping 1% of packets at random, and slow links
(to be caught mid-restore) from tc tbf."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need
from tests.peers import Peers, publish, start_pair, stop_pair
from tests.workloads import KINDS, SIGBUS_EXIT, workload_command

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
DEADLINE_S = 90.0
HERE = Path(__file__).resolve().parent


def netns_exec(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True)


@pytest.fixture
def pair(tmp_path: Path, require_root: None) -> Iterator[Peers]:
    need(shutil.which("tc") is not None, "needs tc (iproute2)")
    p = start_pair(tmp_path)
    assert p.net is not None
    yield p
    stop_pair(p)


def slow_link(p: Peers, rate: str = "60mbit") -> None:
    assert p.net is not None
    netns_exec(
        p.net.a,
        "tc",
        "qdisc",
        "replace",
        "dev",
        p.net.dev_a,
        "root",
        "tbf",
        "rate",
        rate,
        "burst",
        "64kb",
        "latency",
        "2s",
    )


@dataclass
class Watch:
    """Polls a session's status in the background, recording (time, state, present)."""

    agent: LocalAgent
    sid: str
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                s = self.agent.request("GET", f"/v1/sessions/{self.sid}", timeout=2).json()
                self.samples.append((time.monotonic(), s["state"], s["pages_present"]))
            except Exception:
                self.samples.append((time.monotonic(), "unreachable", -1))
            time.sleep(0.05)

    def start(self) -> Watch:
        threading.Thread(target=self.run, daemon=True).start()
        return self

    def last(self) -> tuple[float, str, int]:
        while not self.samples:
            time.sleep(0.01)
        return self.samples[-1]

    def wait_present(self, fraction: float, total: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.last()[2] < fraction * total:
            assert time.monotonic() < deadline, self.samples[-3:]
            time.sleep(0.02)

    def progress_after(self, t0: float) -> float | None:
        """Seconds from t0 until pages arrive again (or the session completes)."""
        before = max((n for t, _, n in self.samples if t <= t0), default=-1)
        for t, state, n in self.samples:
            if t >= t0 and (n > before or state == "completed"):
                return t - t0
        return None

    def states(self) -> set[str]:
        return {s for _, s, _ in self.samples}


@dataclass
class Run:
    session: dict[str, Any]
    proc: subprocess.Popen[bytes]
    watch: Watch
    started: float


def begin(
    p: Peers,
    image: Path,
    args: list[str],
    peer: str | None = None,
    kind: str = "client",
    **options: Any,
) -> Run:
    body = {"source": {"peer": peer or p.source.grpc, "export": "img"}, **options}
    r = p.dest.request("POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    session = r.json()
    cmd = workload_command(kind, session["socket"], image.stat().st_size, *args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return Run(session, proc, Watch(p.dest, session["id"]).start(), time.monotonic())


def finish(run: Run) -> tuple[dict[str, Any] | None, bool]:
    """The workload's report (None if it died), and whether it hung past the deadline."""
    try:
        out, _ = run.proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.communicate()
        return None, True
    finally:
        run.watch.stop.set()
    lines = out.decode().strip().splitlines()
    return (json.loads(lines[-1]) if lines else None), False


def verdict(report: dict[str, Any] | None) -> int:
    return 0 if report and report.get("verified") else 1


def final_state(p: Peers, run: Run, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s: dict[str, Any] = p.dest.request("GET", f"/v1/sessions/{run.session['id']}").json()
        if s["state"] not in ("awaiting_attach", "running", "paused"):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def scenario(
    p: Peers,
    image: Any,
    record: Callable[..., None],
    name: str,
    inject: Callable[[Peers, Run, int], float | None],
    size: int = 24 * MiB,
    args: tuple[str, ...] = ("--threads", "2"),
    kind: str = "client",
    **options: Any,
) -> dict[str, Any]:
    img = image(size)
    export = publish(p, img)
    slow_link(p)
    run = begin(p, img, [*args, "--verify", str(img)], kind=kind, **options)
    fault_end = inject(p, run, export["pages"])
    report, hung = finish(run)
    status = final_state(p, run)
    recover = run.watch.progress_after(fault_end) if fault_end else None
    wrong = verdict(report)
    record(
        name,
        wrong,
        hung,
        recover,
        time.monotonic() - run.started,
        f"{status['state']}, {report.get('detail') if report else 'no report'}",
    )
    assert not hung, "a workload thread stayed blocked past the deadline"
    assert wrong == 0, report
    assert status["state"] == "completed", status
    return status


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_source_then_restart(pair: Peers, image, record, kind: str) -> None:
    def inject(p: Peers, run: Run, pages: int) -> float:
        run.watch.wait_present(0.15, pages)
        p.source.kill()
        time.sleep(1.0)
        p.source.start()
        return time.monotonic()

    status = scenario(pair, image, record, f"kill -9 source, restart [{kind}]", inject, kind=kind)
    assert status["error"] is None


def test_link_cut_for_5s(pair: Peers, image, record) -> None:
    def inject(p: Peers, run: Run, pages: int) -> float:
        run.watch.wait_present(0.15, pages)
        assert p.net is not None
        p.net.link(up=False)
        time.sleep(5.0)
        p.net.link(up=True)
        return time.monotonic()

    scenario(pair, image, record, "link cut 5 s", inject)


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_destination_then_restart(pair: Peers, image, record, kind: str) -> None:
    def inject(p: Peers, run: Run, pages: int) -> float:
        run.watch.wait_present(0.15, pages)
        p.dest.kill()
        time.sleep(1.0)
        p.dest.start()
        return time.monotonic()

    scenario(pair, image, record, f"kill -9 destination, restart [{kind}]", inject, kind=kind)


def test_remove_storm(pair: Peers, image, record) -> None:
    ranges = ",".join(f"{i * MiB + 8192}:{64 << 10}" for i in range(0, 24, 2))

    def inject(p: Peers, run: Run, pages: int) -> None:
        return None

    scenario(
        pair, image, record, "REMOVE storm", inject, args=("--threads", "4", "--remove", ranges)
    )


def test_delay_50ms_and_1pct_loss(pair: Peers, image, record) -> None:
    net = pair.net
    assert net is not None
    need(shutil.which("nft") is not None, "needs nft (Debian package nftables) for packet loss")
    for ns in (net.a, net.b):
        netns_exec(ns, "nft", "add", "table", "inet", "pwloss")
        netns_exec(ns, "nft", "add chain inet pwloss in { type filter hook input priority 0; }")
        netns_exec(ns, "nft", "add rule inet pwloss in numgen random mod 100 0 drop")
    relay = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            net.b,
            sys.executable,
            str(HERE / "delay_proxy.py"),
            f"{net.addr_b}:7090",
            pair.source.grpc,
            "0.025",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == b"ready"
        img = image(8 * MiB)
        publish(pair, img)
        run = begin(pair, img, ["--threads", "2", "--verify", str(img)], peer=f"{net.addr_b}:7090")
        report, hung = finish(run)
        status = final_state(pair, run)
        elapsed = time.monotonic() - run.started
        record(
            "50 ms delay + 1% loss",
            verdict(report),
            hung,
            None,
            elapsed,
            f"{status['state']}, {report.get('detail') if report else 'no report'}",
        )
        assert not hung and verdict(report) == 0, report
        assert status["state"] == "completed" and elapsed < 60
    finally:
        relay.kill()


def test_corrupting_peer(pair: Peers, image, record, tmp_path: Path) -> None:
    net = pair.net
    assert net is not None
    img = image(8 * MiB)
    peer = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            net.a,
            sys.executable,
            str(HERE.parent / "integration" / "corrupt_peer.py"),
            str(tmp_path / "bad-peer"),
            str(img),
            "img",
            f"{net.addr_a}:7090",
            "5",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert peer.stdout is not None and int(peer.stdout.readline()) == 7090
        run = begin(pair, img, ["--threads", "2", "--verify", str(img)], peer=f"{net.addr_a}:7090")
        report, hung = finish(run)
        status = final_state(pair, run)
        metrics = pair.dest.request("GET", "/metrics").text
        failures = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("pagewire_digest_failures_total")
        )
        record(
            "corrupting peer",
            verdict(report),
            hung,
            None,
            time.monotonic() - run.started,
            f"{status['state']}, {int(failures)} chunks refused",
        )
        assert not hung and verdict(report) == 0 and status["state"] == "completed"
        assert failures >= 1
    finally:
        peer.kill()


def sigbus_scenario(
    p: Peers,
    image: Any,
    record: Callable[..., None],
    name: str,
    tmp: Path,
    inject: Callable[[Peers, Run], None],
    kind: str = "client",
    **options: Any,
) -> None:
    img = image(24 * MiB)
    publish(p, img)
    slow_link(p, "20mbit")
    ready, go = tmp / f"{name}.ready", tmp / f"{name}.go"
    run = begin(
        p,
        img,
        [
            "--order",
            "sequential",
            "--ready-file",
            str(ready),
            "--go-file",
            str(go),
            "--verify",
            str(img),
        ],
        kind=kind,
        prefetch="none",
        **options,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    inject(p, run)
    go.touch()
    report, hung = finish(run)
    status = final_state(p, run)
    got_sigbus = run.proc.returncode == SIGBUS_EXIT
    record(
        f"{name} [{kind}]",
        0 if got_sigbus or verdict(report) == 0 else 1,
        hung,
        None,
        time.monotonic() - run.started,
        f"{status['state']} ({(status['error'] or {}).get('code')}), "
        f"{'SIGBUS' if got_sigbus else 'no SIGBUS'}",
    )
    assert not hung
    assert got_sigbus, (run.proc.returncode, report)  # SIGBUS: not 137, not zeros


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_mid_restore(pair: Peers, image, record, tmp_path: Path, kind: str) -> None:
    def inject(p: Peers, run: Run) -> None:
        r = p.dest.request("DELETE", f"/v1/sessions/{run.session['id']}")
        assert r.json()["state"] == "cancelled"

    sigbus_scenario(pair, image, record, "cancel mid-restore", tmp_path, inject, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_sigbus_policy_when_the_source_is_gone(
    pair: Peers, image, record, tmp_path: Path, kind: str
) -> None:
    def inject(p: Peers, run: Run) -> None:
        p.source.kill()

    sigbus_scenario(
        pair,
        image,
        record,
        "source gone, on_source_lost sigbus",
        tmp_path,
        inject,
        kind,
        on_source_lost="sigbus",
        pause_timeout_s=1.0,
    )
    status = pair.dest.request("GET", "/v1/sessions").json()["sessions"][0]
    assert status["state"] == "failed" and status["error"]["code"] == "source_lost"


def corrupt_in_place(path: Path) -> None:
    """Change the file's bytes and restore its mtime: disk corruption, as the agent sees it."""
    st = path.stat()
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(0, len(data), 4096):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_source_is_a_lost_source(
    pair: Peers, image, record, tmp_path: Path, kind: str
) -> None:
    """A source serving bad data: N consecutive digest failures pause the session, and
    after pause_timeout_s the sigbus policy fails it (source_lost); no wrong byte, no hang."""

    img = image(24 * MiB)
    publish(pair, img)
    slow_link(pair, "20mbit")
    ready, go = tmp_path / "c.ready", tmp_path / "c.go"
    run = begin(
        pair,
        img,
        ["--order", "sequential", "--ready-file", str(ready), "--go-file", str(go)]
        + ["--verify", str(img)],
        kind=kind,
        prefetch="none",
        on_source_lost="sigbus",
        pause_timeout_s=1.0,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    corrupt_in_place(img)
    t0 = time.monotonic()
    go.touch()
    report, hung = finish(run)
    status = final_state(pair, run)
    got_sigbus = run.proc.returncode == SIGBUS_EXIT
    record(
        f"corrupt source, on_source_lost sigbus [{kind}]",
        0 if got_sigbus or verdict(report) == 0 else 1,
        hung,
        time.monotonic() - t0,
        time.monotonic() - run.started,
        f"{status['state']} ({(status['error'] or {}).get('code')}), "
        f"{'SIGBUS' if got_sigbus else 'no SIGBUS'}",
    )
    assert not hung
    assert got_sigbus, (run.proc.returncode, report)
    assert status["state"] == "failed" and status["error"]["code"] == "source_lost", status
    assert "paused" in run.watch.states()
    # the destination's complaint made the source re-hash the chunk and withdraw its trust
    export = pair.source.request("GET", "/v1/exports/img").json()
    assert export["state"] == "stale", export


@pytest.mark.parametrize("kind", KINDS)
def test_wait_policy_outlasts_pause_timeout(pair: Peers, image, record, kind: str) -> None:
    """on_source_lost "wait": an outage longer than pause_timeout_s leaves the session
    paused; the source returns, is used within a second, and the restore is byte-exact."""

    def inject(p: Peers, run: Run, pages: int) -> float:
        run.watch.wait_present(0.15, pages)
        p.source.kill()
        deadline = time.monotonic() + 20
        while run.watch.last()[1] != "paused":
            assert time.monotonic() < deadline, run.watch.samples[-3:]
            time.sleep(0.05)
        time.sleep(2.5)  # the outage outlasts pause_timeout_s (1 s)
        assert run.watch.last()[1] == "paused", run.watch.samples[-3:]
        p.source.start()
        return time.monotonic()

    img_args = ("--threads", "2")
    status = scenario(
        pair,
        image,
        record,
        f"source gone 3 s, on_source_lost wait [{kind}]",
        inject,
        args=img_args,
        kind=kind,
        on_source_lost="wait",
        pause_timeout_s=1.0,
    )
    assert status["error"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_policy_fail(pair: Peers, image, record, tmp_path: Path, kind: str) -> None:
    """SIGTERM with --shutdown-policy fail and a short grace: what is still missing is
    poisoned (SIGBUS), the session ends failed/agent_shutdown, never exit 137 or zeros."""
    pair.dest.stop()
    pair.dest.extra += ["--shutdown-grace-s", "0.2", "--shutdown-policy", "fail"]
    pair.dest.start()

    def inject(p: Peers, run: Run) -> None:
        p.dest.signal(signal.SIGTERM)
        assert p.dest.proc is not None and p.dest.proc.wait(30) == 0
        p.dest.start()  # to read the session's ending back from its record

    sigbus_scenario(
        pair, image, record, "agent SIGTERM, shutdown policy fail", tmp_path, inject, kind
    )
    status = pair.dest.request("GET", "/v1/sessions").json()["sessions"][0]
    assert status["state"] == "failed" and status["error"]["code"] == "agent_shutdown", status
