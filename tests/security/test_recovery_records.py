"""Issue 14, item 19: a restarted agent reads its records as untrusted data. Bad records
are skipped and logged (never a crash loop, never a 500), ids never become paths, export
paths go through the one export-root function and their digests are computed again, and
a session's uffd is taken only from the process whose registered regions, start time and
uffd inode match the record and whose regions fit the image."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pagewire.core.proc import process_start_time
from pagewire.tools.images import make_image
from pagewire.tools.localagents import LocalAgent
from pagewire.tools.workload import command as workload_command

from tests.security.fs_watch import MiB, Watch, open_fds, wait_for

pytestmark = pytest.mark.usefixtures("require_uffd")
MAX_RSS = 256 * MiB


def ended_record(sid: str, image: Path, **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": sid,
        "request": {"source": {"path": str(image)}},
        "state": "completed",
        "source": {"path": str(image)},
        "socket": f"/tmp/{sid}.sock",
        "created_at": 1.0,
        "attached_at": 2.0,
        "completed_at": 3.0,
        "error": None,
        "status": None,
        "workload": None,
    }
    record.update(changes)
    return record


def write(path: Path, value: Any) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def test_bad_records_are_skipped_and_never_500(tmp_path: Path) -> None:
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    roots.mkdir()
    outside.mkdir()
    image = roots / "image.img"
    make_image(image, 1 * MiB, seed=1)
    make_image(roots / "forged.img", 1 * MiB, seed=2)
    make_image(roots / "esc.img", 1 * MiB, seed=3)
    agent = LocalAgent(tmp_path, "agent", [roots], extra=["--retention-s", "3600"]).start()
    for name in ("forged", "esc"):
        r = agent.request(
            "POST", "/v1/exports", json={"name": name, "path": str(roots / f"{name}.img")}
        )
        assert r.status_code == 201, r.text
    agent.stop()
    state = agent.workdir / "state"
    sessions, exports = state / "sessions", state / "exports"
    # sessions: garbage of every kind
    victim = tmp_path / "x" / "victim.json"
    victim.parent.mkdir()
    victim.write_text("precious")
    write(sessions / "a.json", [])
    write(sessions / "b.json", '"x"')
    write(sessions / "c.json", "{not json")
    write(sessions / "s-0000000000000001.json", {})
    write(
        sessions / "s-0000000000000002.json",
        ended_record("s-0000000000000002", image, state="bogus"),
    )
    escape_id = "../" * 12 + str(victim.with_suffix(""))[1:]
    write(sessions / "s-0000000000000003.json", ended_record(escape_id, image))
    write(
        sessions / "s-0000000000000004.json",
        ended_record("s-0000000000000004", image, status={"state": "weird", "pages_total": "x"}),
    )
    write(
        sessions / "s-0000000000000005.json",
        ended_record("s-0000000000000005", image, state="running", workload={"pid": "x"}),
    )
    write(
        sessions / "s-0000000000000006.json",
        ended_record("s-0000000000000006", image, error="not an object"),
    )
    good = "s-00000000000000ff"
    write(sessions / f"{good}.json", ended_record(good, image))
    # exports: garbage, a path that climbs out of the root, and forged digests
    write(exports / "bad.json", [])
    write(exports / "worse.json", {"version": 1})
    esc = json.loads((exports / "esc.json").read_text())
    (outside / "img").write_bytes((roots / "esc.img").read_bytes())
    st = os.stat(outside / "img")
    esc["path"] = str(roots / ".." / "outside" / "img")
    esc["identity"] = {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
    write(exports / "esc.json", esc)
    forged = json.loads((exports / "forged.json").read_text())
    forged["digests"] = [bytes(32).hex()] * len(forged["digests"])
    write(exports / "forged.json", forged)

    agent = LocalAgent(tmp_path, "agent", [roots], extra=["--retention-s", "3600"]).start()
    assert agent.proc is not None
    try:
        with Watch(agent) as watch:
            r = agent.request("GET", "/v1/sessions")
            assert r.status_code == 200, r.text
            ids = sorted(s["id"] for s in r.json()["sessions"])
            assert ids == ["s-0000000000000004", good], ids
            r = agent.request("GET", "/v1/sessions/s-0000000000000004")
            assert r.status_code == 200 and r.json()["state"] == "completed", r.text
            for state_filter in ("completed", "failed", "running"):
                assert agent.request("GET", f"/v1/sessions?state={state_filter}").status_code == 200

            def exported() -> dict[str, Any]:
                listed = agent.request("GET", "/v1/exports").json()["exports"]
                return {e["name"]: e["state"] for e in listed}

            assert sorted(exported()) == ["esc", "forged"]
            assert exported()["esc"] == "stale"  # its path left the root: never opened
            # forged digests: verified again after the restart, found wrong
            wait_for(lambda: exported()["forged"] == "stale", what="forged digests found")
            assert not any(p.startswith(str(outside)) for p in open_fds(agent.proc.pid))
            # forgetting deletes records by id: only the agent's own
            for sid in ids:
                assert agent.request("DELETE", f"/v1/sessions/{sid}").status_code == 200
            assert agent.request("GET", "/v1/sessions").json()["sessions"] == []
            assert victim.read_text() == "precious"
        watch.assert_healthy(MAX_RSS)
        log = agent.log_path.read_text()
        assert "s-0000000000000001.json skipped" in log
        assert "ignoring unreadable export record" in log
    finally:
        agent.stop()


def test_a_planted_record_cannot_take_another_process_uffd(tmp_path: Path) -> None:
    """A victim restores from agent A. Agent B starts with records naming the victim's pid,
    start time and uffd inode: one with regions the victim never registered, one whose
    regions do not fit B's image. B fails both without touching the victim, which
    finishes byte-exact from A."""
    roots = tmp_path / "roots"
    roots.mkdir()
    size = 8 * MiB
    image_a, image_b = roots / "a.img", roots / "b.img"
    make_image(image_a, size, seed=1)
    make_image(image_b, size // 2, seed=2)
    a = LocalAgent(tmp_path, "a", [roots]).start()
    b = LocalAgent(tmp_path, "b", [roots])
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = None
    try:
        body = {"source": {"path": str(image_a)}, "background": False, "prefetch": "none"}
        s = a.request("POST", "/v1/sessions", json=body).json()
        proc = subprocess.Popen(
            workload_command(
                s["socket"],
                size,
                "--ready-file",
                str(ready),
                "--go-file",
                str(go),
                "--verify",
                str(image_a),
            ),
            stdout=subprocess.PIPE,
        )
        wait_for(ready.exists, what="the victim to touch half its pages")
        genuine = json.loads((a.workdir / "state" / "sessions" / f"{s['id']}.json").read_text())
        workload = genuine["workload"]
        assert workload["pid"] == proc.pid
        assert workload["start_time"] == process_start_time(proc.pid)
        base, rsize, offset, page = workload["regions"][0]
        records = b.workdir / "state" / "sessions"
        records.mkdir(parents=True)
        os.chmod(b.workdir / "state", 0o700)
        unregistered = dict(workload, regions=[[base, rsize * 2, offset, page]])
        too_big = dict(workload)  # the victim's real regions, but B's image is half the size
        for sid, wl in (("s-00000000000000a1", unregistered), ("s-00000000000000a2", too_big)):
            rec = ended_record(
                sid,
                image_b,
                state="running",
                workload=wl,
                request={"source": {"path": str(image_b)}, "background": False},
            )
            write(records / f"{sid}.json", rec)
        b.start()
        with Watch(b) as watch:
            for sid in ("s-00000000000000a1", "s-00000000000000a2"):
                st = b.request("GET", f"/v1/sessions/{sid}").json()
                assert st["state"] == "failed" and st["error"]["code"] == "record_mismatch", st
            go.touch()
            out, _ = proc.communicate(timeout=60)
            seen = json.loads(out.decode().splitlines()[-1])
            assert seen["verified"], seen
            wait_for(
                lambda: a.request("GET", f"/v1/sessions/{s['id']}").json()["state"] == "completed",
                what="the genuine session to complete",
            )
        watch.assert_healthy(MAX_RSS)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        a.stop()
        b.stop()
