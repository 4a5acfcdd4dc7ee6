"""Issue 14, items 1 and 2: every path under an export root is opened once, beneath the
root, without following a symlink that appears after the check (paths.open_beneath)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pagewire import _uffd
from pagewire.tools.images import make_image
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need
from tests.security.fs_watch import MiB, Watch, open_fds, tree, wait_for

pytestmark = pytest.mark.usefixtures("require_uffd")
WRITER = Path(__file__).parents[1] / "integration" / "snapshot_writer.py"
MAX_RSS = 256 * MiB
AT_FDCWD = -100
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): a and b swap names atomically."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    roots.mkdir()
    outside.mkdir()
    return roots, outside


def snapshot_state(agent: LocalAgent, sid: str, states: tuple[str, ...]) -> dict:
    return wait_for(
        lambda: (s := agent.request("GET", f"/v1/snapshots/{sid}").json())["state"] in states and s,
        timeout=60,
        what=f"snapshot {sid} in {states}",
    )


def test_snapshot_never_writes_outside_the_root(tmp_path: Path, layout) -> None:  # type: ignore[no-untyped-def]
    """Item 1: the snapshot's file is created (O_EXCL) beneath the root when it is asked
    for; swapping its directory for a symlink afterwards changes nothing, and a failed
    snapshot leaves no file behind."""
    roots, outside = layout
    (roots / "dir").mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    try:
        with Watch(agent) as watch:
            body = {"name": "s1", "path": str(roots / "dir" / "x"), "attach_timeout_s": 1.0}
            r = agent.request("POST", "/v1/snapshots", json=body)
            assert r.status_code == 201, r.text
            assert (roots / "dir" / "x").is_file()  # created at request time
            os.rename(roots / "dir", roots / "moved")
            os.symlink(outside, roots / "dir")
            status = snapshot_state(agent, r.json()["id"], ("failed",))
            assert status["error"]["code"] == "attach_timeout"
            assert not (roots / "moved" / "x").exists()  # removed when the snapshot failed
            assert tree(outside) == []
            # asked through the symlink now: refused, nothing created
            body = {"name": "s2", "path": str(roots / "dir" / "y")}
            r = agent.request("POST", "/v1/snapshots", json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "outside_export_roots"
            # an existing file is never truncated or reused
            (roots / "moved" / "taken").write_bytes(b"keep")
            body = {"name": "s3", "path": str(roots / "moved" / "taken")}
            r = agent.request("POST", "/v1/snapshots", json=body)
            assert r.status_code == 409 and r.json()["error"]["code"] == "file_exists"
            assert (roots / "moved" / "taken").read_bytes() == b"keep"
            assert tree(outside) == []
        watch.assert_healthy(MAX_RSS)
    finally:
        agent.stop()


def test_snapshot_completes_into_the_file_it_created(tmp_path: Path, layout) -> None:  # type: ignore[no-untyped-def]
    """Item 1 with a real writer attaching after the swap: the bytes land in the file
    created beneath the root, which becomes the export; nothing lands outside."""
    need(
        bool(_uffd.API_FEATURES_SUPPORTED & _uffd.FEATURE_WP_UNPOPULATED),
        "the kernel lacks UFFD_FEATURE_WP_UNPOPULATED (6.4+)",
    )
    roots, outside = layout
    (roots / "dir").mkdir()
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    pages = 1024
    try:
        with Watch(agent) as watch:
            body = {"name": "snap", "path": str(roots / "dir" / "x")}
            r = agent.request("POST", "/v1/snapshots", json=body)
            assert r.status_code == 201, r.text
            snap = r.json()
            os.rename(roots / "dir", roots / "moved")
            os.symlink(outside, roots / "dir")
            go, log_path = tmp_path / "go", tmp_path / "log.json"
            writer = subprocess.Popen(
                [sys.executable, str(WRITER), snap["socket"], str(pages), str(log_path), str(go)],
                stdout=subprocess.PIPE,
            )
            status = snapshot_state(agent, snap["id"], ("completed", "failed"))
            go.touch()
            writer.communicate(timeout=60)
            assert status["state"] == "completed", status
            assert (roots / "moved" / "x").stat().st_size == pages * 4096
            assert tree(outside) == []
            export = agent.request("GET", "/v1/exports/snap").json()
            assert export["state"] == "ready" and export["size"] == pages * 4096
        watch.assert_healthy(MAX_RSS)
    finally:
        agent.stop()


def test_local_source_never_reads_outside_the_root(tmp_path: Path, layout, image) -> None:  # type: ignore[no-untyped-def]
    """Item 2: a directory under the root and a symlink to an outside directory swap
    names (renameat2 RENAME_EXCHANGE) as fast as they can while sessions are created
    from a path through that directory. Every answer is 201 or 403
    outside_export_roots; no source fd the agent holds is the outside file; a session
    restores the inside image byte-exact."""
    roots, outside = layout
    (roots / "d").mkdir()
    size = 1 * MiB
    make_image(roots / "d" / "img", size, seed=1)
    make_image(outside / "img", size, seed=2)
    expected = tmp_path / "expected.img"
    shutil.copyfile(roots / "d" / "img", expected)
    os.symlink(outside, roots / "l")
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    assert agent.proc is not None
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            exchange(roots / "d", roots / "l")
            swaps += 1

    created: list[str] = []
    codes: dict[int, int] = {}
    swap = threading.Thread(target=swapper, daemon=True)
    try:
        with Watch(agent) as watch:
            swap.start()
            with agent.client() as client:
                for _ in range(400):
                    body = {"source": {"path": str(roots / "d" / "img")}}
                    r = client.post("/v1/sessions", json=body)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 201:
                        created.append(r.json()["id"])
                        if len(created) >= 48:
                            break
                    else:
                        assert r.status_code == 403, r.text
                        assert r.json()["error"]["code"] == "outside_export_roots"
            stop.set()
            swap.join()
            assert swaps > 100 and created and codes.get(403), (swaps, codes)
            held = open_fds(agent.proc.pid)  # every pending session holds its source fd
            assert not any(p.startswith(str(outside)) for p in held), held
            # the swapper left either name in place: put the real directory back
            if (roots / "d").is_symlink():
                exchange(roots / "d", roots / "l")
            sid = created.pop()
            sock = agent.request("GET", f"/v1/sessions/{sid}").json()["socket"]
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pagewire.tools.workload",
                    "--socket",
                    sock,
                    "--size",
                    str(size),
                    "--verify",
                    str(expected),
                ],
                capture_output=True,
                timeout=60,
            )
            seen = json.loads(proc.stdout.decode().splitlines()[-1])
            assert seen["verified"], seen
            for other in created:
                assert agent.request("DELETE", f"/v1/sessions/{other}").status_code == 200
        watch.assert_healthy(MAX_RSS)
    finally:
        stop.set()
        agent.stop()


@pytest.mark.parametrize("kind", ["sessions", "exports", "snapshots"])
def test_nul_byte_and_relative_paths_are_400(tmp_path: Path, layout, kind: str) -> None:  # type: ignore[no-untyped-def]
    roots, _ = layout
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    try:
        for path, code in ((f"{roots}/a\u0000b", "invalid_path"), ("rel/x", "invalid_path")):
            if kind == "sessions":
                body: dict[str, object] = {"source": {"path": path}}
            else:
                body = {"name": "n", "path": path}
            r = agent.request("POST", f"/v1/{kind}", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert agent.request("GET", "/healthz").status_code == 200
        assert tree(roots) == []
    finally:
        agent.stop()


def test_symlink_inside_the_root_to_a_file_inside_still_works(tmp_path: Path, layout) -> None:  # type: ignore[no-untyped-def]
    roots, outside = layout
    make_image(roots / "real", 64 * 1024, seed=3)
    os.symlink(roots / "real", roots / "alias")
    os.symlink(outside, roots / "out")
    make_image(outside / "img", 64 * 1024, seed=4)
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    try:
        r = agent.request("POST", "/v1/exports", json={"name": "a", "path": str(roots / "alias")})
        assert r.status_code == 201 and r.json()["path"] == str(roots / "real"), r.text
        r = agent.request("POST", "/v1/exports", json={"name": "b", "path": str(roots / "out/img")})
        assert r.status_code == 403 and r.json()["error"]["code"] == "outside_export_roots"
        t0 = time.monotonic()
        r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(roots)}})
        assert r.status_code == 403, r.text  # the root itself is not a file under it
        assert time.monotonic() - t0 < 5
    finally:
        agent.stop()


@pytest.mark.parametrize("kind", ["exports", "snapshots"])
def test_exports_and_snapshots_under_the_same_swap(tmp_path: Path, layout, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Item 2 for the other two users of the one function: published files are always
    the inside one, snapshot files are always created inside."""
    roots, outside = layout
    (roots / "d").mkdir()
    make_image(roots / "d" / "img", 256 * 1024, seed=1)
    make_image(outside / "img", 256 * 1024, seed=2)
    os.symlink(outside, roots / "l")
    before = tree(outside)
    agent = LocalAgent(tmp_path, "agent", [roots]).start()
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            exchange(roots / "d", roots / "l")

    swap = threading.Thread(target=swapper, daemon=True)
    created = 0
    try:
        with Watch(agent) as watch, agent.client() as client:
            swap.start()
            for i in range(300):
                if kind == "exports":
                    body = {"name": f"e{i}", "path": str(roots / "d" / "img")}
                else:
                    body = {"name": f"s{i}", "path": str(roots / "d" / f"new{i}")}
                r = client.post(f"/v1/{kind}", json=body)
                if r.status_code == 201:
                    created += 1
                    if kind == "exports":
                        assert not r.json()["path"].startswith(str(outside)), r.text
                    if created >= 12:
                        break
                else:
                    assert r.status_code == 403, r.text
                    assert r.json()["error"]["code"] == "outside_export_roots"
            stop.set()
            swap.join()
            assert created, "no request won the race at all"
            assert tree(outside) == before
            assert agent.proc is not None
            assert not any(p.startswith(str(outside)) for p in open_fds(agent.proc.pid))
        watch.assert_healthy(MAX_RSS)
    finally:
        stop.set()
        agent.stop()
