"""Live process export: a process's heap, with its pointers, moves post-copy to a new
process on another agent, at the same addresses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import start_pair, stop_pair

pytestmark = pytest.mark.usefixtures("require_uffd")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heap_move.py"
ADDR = 0x7E5A00000000
NODES = 20000
LIVE = ["--live-export-uid", str(os.getuid())]  # live export is off unless allowed


def test_a_heap_moves_between_processes_on_two_agents(tmp_path: Path) -> None:
    source = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "source", hex(ADDR), str(NODES)], stdout=subprocess.PIPE
    )
    p = start_pair(tmp_path, extra_src=LIVE)
    try:
        assert source.stdout is not None
        built = json.loads(source.stdout.readline())
        body = {
            "name": "heap",
            "pid": built["pid"],
            "ranges": [{"start": ADDR, "size": built["size"]}],
        }
        r = p.source.request("POST", "/v1/exports", json=body)
        assert r.status_code == 201, r.text
        export = r.json()
        assert export["pid"] == built["pid"] and export["ranges"][0]["start"] == ADDR
        assert open(f"/proc/{built['pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
        r = p.dest.request(
            "POST", "/v1/sessions", json={"source": {"peer": p.source.grpc, "export": "heap"}}
        )
        assert r.status_code == 201, r.text
        out = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "dest",
                r.json()["socket"],
                hex(ADDR),
                str(built["size"]),
                str(NODES),
            ],
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr.decode()
        moved = json.loads(out.stdout.decode().splitlines()[-1])
        assert moved["ok"] and moved["nodes"] == NODES, (moved, out.stderr.decode())
        # withdrawing the export lets the source run again
        assert p.source.request("DELETE", "/v1/exports/heap").status_code == 200
        state = open(f"/proc/{built['pid']}/stat").read().rsplit(")", 1)[1].split()[0]
        assert state in ("S", "R")
    finally:
        stop_pair(p)
        os.kill(source.pid, signal.SIGKILL)
        source.wait()


def test_whole_private_memory_export_and_bad_requests(tmp_path: Path) -> None:
    source = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "source", hex(ADDR), "10"], stdout=subprocess.PIPE
    )
    p = start_pair(tmp_path, isolated=False, extra_src=LIVE)
    try:
        assert source.stdout is not None
        pid = json.loads(source.stdout.readline())["pid"]
        r = p.source.request("POST", "/v1/exports", json={"name": "all", "pid": pid})
        assert r.status_code == 201, r.text
        assert len(r.json()["ranges"]) > 1 and r.json()["pages"] > 1024
        for bad in (
            {"name": "x"},
            {"name": "x", "pid": 1, "path": "/a"},
            {"name": "x", "path": "/a", "ranges": [{"start": 0, "size": 4096}]},
        ):
            r = p.source.request("POST", "/v1/exports", json=bad)
            assert 400 <= r.status_code < 500, r.text
        r = p.source.request("POST", "/v1/exports", json={"name": "gone", "pid": 4000000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "export_invalid"
    finally:
        stop_pair(p)
        os.kill(source.pid, signal.SIGKILL)
        source.wait()
