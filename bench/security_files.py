"""Floods against the file and fd limits (issue 14, items 5 and 15): the agent's peak RSS
and open fds while many clients push past each limit, and a real restore afterwards.

usage: python bench/security_files.py [--requests 2000] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import LocalAgent, MiB, emit, run_workload
from pagewire.tools.images import make_image


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def flood(
    agent: LocalAgent, requests: int, clients: int, body: Callable[[int], tuple[str, dict]]
) -> dict[str, Any]:
    assert agent.proc is not None
    pid = agent.proc.pid
    start_rss, start_fds = rss(pid), fds(pid)
    peak = {"rss": start_rss, "fds": start_fds}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss(pid))
            peak["fds"] = max(peak["fds"], fds(pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    codes: Counter[str] = Counter()
    health_worst = 0.0

    def one(i: int) -> None:
        path, payload = body(i)
        with agent.client(timeout=60) as c:
            r = c.post(path, json=payload)
        code = "created" if r.status_code == 201 else r.json()["error"]["code"]
        codes[f"{r.status_code} {code}"] += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        while not all(f.done() for f in futures):
            h0 = time.monotonic()
            agent.request("GET", "/healthz", timeout=30)
            health_worst = max(health_worst, time.monotonic() - h0)
            time.sleep(0.2)
        for f in futures:
            f.result()
    stop.set()
    sampler.join()
    return {
        "requests": requests,
        "seconds": round(time.monotonic() - t0, 1),
        "answers": dict(codes),
        "rss_start_mib": round(start_rss / MiB, 1),
        "rss_peak_mib": round(peak["rss"] / MiB, 1),
        "fds_start": start_fds,
        "fds_peak": peak["fds"],
        "healthz_worst_s": round(health_worst, 3),
    }


def restore_ok(agent: LocalAgent, image: Path, size: int) -> bool:
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(image)}})
    if r.status_code != 201:
        return False
    return bool(run_workload(r.json()["socket"], size, "--verify", str(image))["verified"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    a = p.parse_args()
    out: dict[str, Any] = {"requests": a.requests, "clients": a.clients}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = work / "roots"
        roots.mkdir()
        small, image, dense = roots / "small.img", roots / "image.img", roots / "dense.img"
        make_image(small, 64 * 1024, seed=1)
        make_image(image, 16 * MiB, seed=2)
        with open(dense, "wb") as f:
            for _ in range(64):
                f.write(bytes(range(1, 256)) * 4112)
            f.truncate(64 * MiB)
        os.mkfifo(roots / "fifo")
        extra = ["--max-exports", "64", "--max-snapshots", "16", "--file-work-threads", "2"]
        agent = LocalAgent(work, "agent", [roots], extra=extra).start()
        try:
            out["exports_max_64"] = flood(
                agent,
                a.requests,
                a.clients,
                lambda i: ("/v1/exports", {"name": f"e{i}", "path": str(small)}),
            )
            out["snapshots_max_16"] = flood(
                agent,
                a.requests,
                a.clients,
                lambda i: ("/v1/snapshots", {"name": f"s{i}", "path": str(roots / f"s{i}")}),
            )
            for e in agent.request("GET", "/v1/exports").json()["exports"]:
                agent.request("DELETE", f"/v1/exports/{e['name']}")
            out["fifo_publish"] = flood(
                agent,
                a.requests,
                a.clients,
                lambda i: ("/v1/exports", {"name": f"f{i}", "path": str(roots / "fifo")}),
            )
            out["restore_after_floods_verified"] = restore_ok(agent, image, 16 * MiB)
        finally:
            agent.stop()
        # a pool held by slow hashing: 2 threads, callers give up after 0.3 s
        extra = ["--file-work-threads", "2", "--file-work-timeout-s", "0.3"]
        agent = LocalAgent(work, "pool", [roots], extra=extra).start()
        try:
            out["file_pool_2_threads_0.3s"] = flood(
                agent,
                a.requests // 10,
                a.clients,
                lambda i: ("/v1/exports", {"name": f"d{i}", "path": str(dense)}),
            )
            deadline = time.monotonic() + 120
            while agent.request("GET", "/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            out["pool_exports_left_after_undo"] = len(
                agent.request("GET", "/v1/exports").json()["exports"]
            )
            out["pool_restore_verified"] = restore_ok(agent, image, 16 * MiB)
        finally:
            agent.stop()
    emit("security_files", out)


if __name__ == "__main__":
    main()
