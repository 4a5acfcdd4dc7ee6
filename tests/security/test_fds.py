"""Issue 14, items 5 and 15: a FIFO under the export root cannot wedge the agent, file
work runs in a bounded pool that /readyz watches, and every kind of object holding an
fd (exports, pending snapshots) has a limit, so a real session never meets EMFILE."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pagewire.tools.images import make_image
from pagewire.tools.localagents import LocalAgent

from tests.security.fs_watch import MiB, Watch, open_fds, tree, wait_for
from tests.security.test_dirs import agent_cmd

pytestmark = pytest.mark.usefixtures("require_uffd")
MAX_RSS = 256 * MiB


def restore(agent: LocalAgent, image: Path, size: int) -> dict:
    """A real local session, restored by a real workload that checks every byte."""
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(image)}})
    assert r.status_code == 201, r.text
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagewire.tools.workload",
            "--socket",
            r.json()["socket"],
            "--size",
            str(size),
            "--verify",
            str(image),
        ],
        capture_output=True,
        timeout=60,
    )
    seen: dict = json.loads(out.stdout.decode().splitlines()[-1])
    return seen


def test_exports_and_pending_snapshots_are_bounded(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    small = roots / "small.img"
    make_image(small, 64 * 1024, seed=1)
    image = roots / "image.img"
    make_image(image, 4 * MiB, seed=2)
    extra = ["--max-exports", "8", "--max-snapshots", "4", "--max-sessions", "4"]
    agent = LocalAgent(tmp_path, "agent", [roots], extra=extra).start()
    assert agent.proc is not None
    pid = agent.proc.pid
    baseline = len(open_fds(pid))
    try:
        with Watch(agent) as watch, agent.client() as client:
            for i in range(8):
                r = client.post("/v1/exports", json={"name": f"e{i}", "path": str(small)})
                assert r.status_code == 201, r.text
            for i in range(300):
                r = client.post("/v1/exports", json={"name": f"x{i}", "path": str(small)})
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "too_many_exports"
            assert len(open_fds(pid)) <= baseline + 8 + 4
            # pending snapshots: four, then 429; each holds its file until it expires
            pending = []
            for i in range(4):
                body = {"name": f"s{i}", "path": str(roots / f"s{i}.img"), "attach_timeout_s": 6}
                r = client.post("/v1/snapshots", json=body)
                assert r.status_code == 201, r.text
                pending.append(r.json()["id"])
            for i in range(100):
                body = {"name": f"t{i}", "path": str(roots / f"t{i}.img")}
                r = client.post("/v1/snapshots", json=body)
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "too_many_snapshots"
            assert not any(name.startswith("t") for name in tree(roots))
            assert len(open_fds(pid)) <= baseline + 8 + 4 * 3 + 4
            # they expire after attach_timeout_s: fds released, files removed
            for sid in pending:
                wait_for(
                    lambda sid=sid: client.get(f"/v1/snapshots/{sid}").json()["state"] == "failed",
                    what=f"snapshot {sid} to expire",
                )
            assert not any(name.startswith("s") and name != "small.img" for name in tree(roots))
            body = {"name": "again", "path": str(roots / "again.img"), "attach_timeout_s": 1}
            assert client.post("/v1/snapshots", json=body).status_code == 201
            # a withdrawn export frees its slot
            assert client.delete("/v1/exports/e0").status_code == 200
            r = client.post("/v1/exports", json={"name": "e8", "path": str(small)})
            assert r.status_code == 201, r.text
            # a real session is unaffected
            seen = restore(agent, image, 4 * MiB)
            assert seen["verified"], seen
        watch.assert_healthy(MAX_RSS)
    finally:
        agent.stop()


def test_limits_that_cannot_fit_the_fd_limit_refuse_to_start(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    r = subprocess.run(
        agent_cmd(tmp_path / "sockets", tmp_path / "state", "--max-exports", "4096"),
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=low_limit,
    )
    assert r.returncode == 2, r.stderr
    assert "--max-exports 4096" in r.stderr and "RLIMIT_NOFILE allows 1024" in r.stderr


def test_the_soft_fd_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(2048, hard)
    agent = LocalAgent(tmp_path, "agent", [])
    agent.workdir.mkdir(parents=True)
    agent.proc = subprocess.Popen(
        agent.command(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    try:
        agent.wait_ready(20)
        limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        agent.stop()


def test_a_fifo_under_the_root_is_refused_at_once(tmp_path: Path) -> None:
    """Item 5: publishing or restoring from a FIFO used to block forever in open(),
    keep the name reserved and, six times over, fill the thread pool."""
    roots = tmp_path / "roots"
    roots.mkdir()
    fifo = roots / "fifo"
    os.mkfifo(fifo)
    image = roots / "image.img"
    make_image(image, 4 * MiB, seed=5)
    agent = LocalAgent(tmp_path, "agent", [roots], extra=["--file-work-threads", "2"]).start()
    try:
        with Watch(agent) as watch:

            def publish(i: int) -> httpx.Response:
                return agent.request(
                    "POST", "/v1/exports", json={"name": f"f{i}", "path": str(fifo)}, timeout=60
                )

            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(publish, range(16)))
            assert time.monotonic() - t0 < 60  # a blocked open would hang here
            for r in answers:
                assert r.status_code in (400, 503), r.text
                assert r.json()["error"]["code"] in ("not_regular_file", "file_pool_busy")
            assert any(r.json()["error"]["code"] == "not_regular_file" for r in answers)
            r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(fifo)}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "not_regular_file"
            r = agent.request("POST", "/v1/snapshots", json={"name": "s", "path": str(fifo)})
            assert r.status_code == 409 and r.json()["error"]["code"] == "file_exists"
            # the names were released and the pool is free
            r = agent.request("POST", "/v1/exports", json={"name": "f0", "path": str(image)})
            assert r.status_code == 201, r.text
            assert agent.request("GET", "/readyz").status_code == 200
            seen = restore(agent, image, 4 * MiB)
            assert seen["verified"], seen
        watch.assert_healthy(MAX_RSS)
    finally:
        agent.stop()


def test_readyz_sees_a_stuck_file_pool(tmp_path: Path) -> None:
    """File work held past --file-work-timeout-s: the caller gets 503 file_work_timeout,
    /readyz says not ready until the worker comes back, what the late work made is
    undone (the name is free again) and /healthz answers throughout."""
    roots = tmp_path / "roots"
    roots.mkdir()
    big = roots / "big.img"
    block = bytes(range(256)) * 4096  # 1 MiB, no zero page
    with open(big, "wb") as f:
        for _ in range(512):
            f.write(block)
    small = roots / "small.img"
    make_image(small, 64 * 1024, seed=6)
    extra = ["--file-work-threads", "1", "--file-work-timeout-s", "0.3"]
    agent = LocalAgent(tmp_path, "agent", [roots], extra=extra).start()
    try:
        with Watch(agent) as watch:
            with ThreadPoolExecutor(8) as pool:
                first = pool.submit(
                    agent.request, "POST", "/v1/exports", json={"name": "big", "path": str(big)}
                )
                r = first.result()
                assert r.status_code == 503 and r.json()["error"]["code"] == "file_work_timeout"
                ready = wait_for(
                    lambda: (x := agent.request("GET", "/readyz")).status_code == 503 and x,
                    timeout=5,
                    what="/readyz to see the stuck pool",
                )
                assert ready.json()["checks"]["file_pool"] is False
                flood = [
                    pool.submit(
                        agent.request,
                        "POST",
                        "/v1/exports",
                        json={"name": f"q{i}", "path": str(small)},
                    )
                    for i in range(8)
                ]
                answers = [f.result() for f in flood]
                codes = {r.json()["error"]["code"] for r in answers if r.status_code != 201}
                assert codes <= {"file_pool_busy", "file_work_timeout"}, codes
                assert "file_pool_busy" in codes
                published = [r.json()["name"] for r in answers if r.status_code == 201]
            wait_for(
                lambda: agent.request("GET", "/readyz").status_code == 200,
                timeout=60,
                what="the pool to come back",
            )
            for name in published:  # the ones that made it in time
                assert agent.request("DELETE", f"/v1/exports/{name}").status_code == 200
            wait_for(
                lambda: agent.request("GET", "/v1/exports").json()["exports"] == [],
                what="late publishes to be undone",
            )
            r = agent.request("POST", "/v1/exports", json={"name": "big", "path": str(small)})
            assert r.status_code == 201, r.text
        watch.assert_healthy(MAX_RSS)
    finally:
        agent.stop()


def test_concurrent_snapshot_requests_respect_the_limit(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots], extra=["--max-snapshots", "3"]).start()
    try:

        def ask(i: int) -> int:
            body = {"name": f"c{i}", "path": str(roots / f"c{i}.img"), "attach_timeout_s": 30}
            return agent.request("POST", "/v1/snapshots", json=body, timeout=60).status_code

        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(ask, range(48)))
        assert codes.count(201) == 3 and codes.count(429) == 45, codes
        assert len(tree(roots)) == 3
    finally:
        agent.stop()
