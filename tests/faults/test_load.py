"""Load: 16 concurrent remote sessions with 4 toucher threads each, all byte-exact."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pagewire.tools.workload import command as workload_command

from tests.peers import Peers, publish, start_pair, stop_pair

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20
SESSIONS = 16


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Peers]:
    p = start_pair(tmp_path)
    yield p
    stop_pair(p)


def test_16_concurrent_sessions_4_threads_each(pair: Peers, image, record) -> None:
    img = image(8 * MiB)
    publish(pair, img)
    started = time.monotonic()
    runs = []
    for _ in range(SESSIONS):
        r = pair.dest.request(
            "POST", "/v1/sessions", json={"source": {"peer": pair.source.grpc, "export": "img"}}
        )
        assert r.status_code == 201, r.text
        session = r.json()
        cmd = workload_command(session["socket"], 8 * MiB, "--threads", "4", "--verify", str(img))
        runs.append((session, subprocess.Popen(cmd, stdout=subprocess.PIPE)))
    wrong = hung = 0
    for _, proc in runs:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            hung += 1
            continue
        report = json.loads(out.decode().splitlines()[-1])
        wrong += 0 if report["verified"] else 1
    states = set()
    deadline = time.monotonic() + 60
    for session, _ in runs:
        while True:
            s = pair.dest.request("GET", f"/v1/sessions/{session['id']}").json()
            if (
                s["state"] not in ("awaiting_attach", "running", "paused")
                or time.monotonic() > deadline
            ):
                states.add(s["state"])
                break
            time.sleep(0.05)
    record(
        "16 sessions x 4 threads",
        wrong,
        bool(hung),
        None,
        time.monotonic() - started,
        f"states {sorted(states)}",
    )
    assert wrong == 0 and hung == 0
    assert states == {"completed"}
