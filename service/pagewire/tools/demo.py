"""`pagewire demo`: two agents on this machine, a generated memory image, a workload
restored post-copy from one to the other, a live progress bar and a report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pagewire.control.models import epoch_seconds
from pagewire.tools.images import make_image
from pagewire.tools.localagents import LocalAgent
from pagewire.tools.workload import command as workload_command

MiB = 1 << 20


def progress_line(status: dict[str, Any], started: float) -> str:
    elapsed = f"{time.monotonic() - started:5.2f} s"
    if status["state"] == "awaiting_attach":
        return f"\r[{'.' * 30}] waiting for the workload to attach  {elapsed}"
    total = max(1, status["pages_total"])
    done = status["pages_present"] + status["pages_removed"]
    frac = done / total
    width = 30
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    faults = status["faults"]
    p99 = status["fault_latency_seconds"]["p99"]
    p99_text = f"{p99 * 1e3:.2f} ms" if p99 is not None else "-"
    return (
        f"\r[{bar}] {frac * 100:5.1f}%  {done}/{total} pages  "
        f"faults {faults['local'] + faults['remote'] + faults['zero']}  p99 {p99_text}  "
        f"{elapsed}  {status['state']:<10}"
    )


def _check(response: Any, what: str) -> dict[str, Any]:
    if response.status_code >= 300:
        raise RuntimeError(f"{what} failed: {response.status_code} {response.text}")
    body: dict[str, Any] = response.json()
    return body


def _start_workload(
    socket_path: str, size: int, threads: int, image: Path
) -> subprocess.Popen[bytes]:
    cmd = workload_command(
        socket_path, size, "--order", "random", "--threads", str(threads), "--verify", str(image)
    )
    return subprocess.Popen(cmd, stdout=subprocess.PIPE)


def _watch(dest: LocalAgent, session_id: str, started: float, quiet: bool) -> dict[str, Any]:
    while True:
        status = _check(dest.request("GET", f"/v1/sessions/{session_id}"), "status")
        if not quiet:
            sys.stderr.write(progress_line(status, started))
            sys.stderr.flush()
        if status["state"] not in ("awaiting_attach", "running", "paused"):
            if not quiet:
                sys.stderr.write("\n")
            return status
        time.sleep(0.1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def first_touch_s(status: dict[str, Any], workload: dict[str, Any], started_at: float) -> float:
    """From starting the workload to its first page in hand: process start, handoff, first
    fault (the page's own latency is the workload's measure, attach the agent's)."""
    attached = epoch_seconds(status.get("attached_at"))
    first = float(workload.get("first_touch_us") or 0) / 1e6
    return (attached - started_at if attached is not None else 0.0) + first


def build_report(
    status: dict[str, Any],
    workload: dict[str, Any],
    total_s: float,
    size: int,
    started_at: float | None = None,
) -> dict[str, Any]:
    lat = status["fault_latency_seconds"]
    first = first_touch_s(status, workload, started_at) if started_at is not None else None
    return {
        "image_mib": size // MiB,
        "state": status["state"],
        "time_to_first_touch_ms": _ms(first),
        "total_s": round(total_s, 3),
        "faults": status["faults"],
        "fault_latency_p50_ms": _ms(lat["p50"]),
        "fault_latency_p99_ms": _ms(lat["p99"]),
        "pages_total": status["pages_total"],
        "pages_zero": status["pages_zero"],
        "pages_prefetched": status["pages_prefetched"],
        "pages_background": status["pages_background"],
        "bytes_received": status["bytes_received"],
        "bytes_installed": (status["pages_present"] - status["pages_zero"]) * 4096,
        "verification": "passed" if workload.get("verified") else "FAILED",
        "verification_detail": workload.get("detail"),
    }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n} bytes)"


def print_report(report: dict[str, Any]) -> None:
    f = report["faults"]
    lines = [
        "pagewire demo report",
        f"  image                 {report['image_mib']} MiB, restored post-copy peer to peer",
        f"  session               {report['state']}",
        f"  time to first touch   {_fmt_ms(report['time_to_first_touch_ms'])} "
        "(workload start to its first page)",
        f"  total time            {report['total_s']:.2f} s",
        f"  faults                local {f['local']}  remote {f['remote']}  zero {f['zero']}",
        f"  fault latency         p50 {_fmt_ms(report['fault_latency_p50_ms'])}  "
        f"p99 {_fmt_ms(report['fault_latency_p99_ms'])}",
        f"  pages                 {report['pages_total']} total, {report['pages_zero']} zero, "
        f"{report['pages_prefetched']} prefetched, {report['pages_background']} background",
        f"  bytes received        {_fmt_mb(report['bytes_received'])}",
        f"  bytes installed       {_fmt_mb(report['bytes_installed'])}",
        f"  verification          {report['verification']} ({report['verification_detail']})",
    ]
    print("\n".join(lines))


def run_demo(
    size_mib: int = 256,
    threads: int = 2,
    workdir: Path | None = None,
    quiet: bool = False,
    json_report: bool = False,
) -> int:
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="pagewire-demo-")) if workdir is None else workdir
    size = size_mib * MiB
    roots = base / "images"
    roots.mkdir(parents=True, exist_ok=True)
    image = roots / "memory.img"
    source = LocalAgent(base, "source", [roots])
    dest = LocalAgent(base, "destination", [])
    try:
        if not quiet:
            print(f"generating a {size_mib} MiB memory image ...", file=sys.stderr)
        make_image(image, size, seed=42)
        source.start()
        dest.start()
        _check(
            source.request("POST", "/v1/exports", json={"name": "demo", "path": str(image)}),
            "publishing the export",
        )
        body = {"source": {"peer": source.grpc, "export": "demo"}}
        session = _check(dest.request("POST", "/v1/sessions", json=body), "creating the session")
        started = time.monotonic()
        started_at = time.time()
        workload = _start_workload(session["socket"], size, threads, image)
        status = _watch(dest, session["id"], started, quiet)
        out, _ = workload.communicate(timeout=300)
        total_s = time.monotonic() - started
        lines = out.decode().strip().splitlines()
        workload_report = json.loads(lines[-1]) if lines else {}
        report = build_report(status, workload_report, total_s, size, started_at)
        if json_report:
            print(json.dumps(report))
        else:
            print_report(report)
        ok = report["verification"] == "passed" and status["state"] == "completed"
        return 0 if ok else 1
    finally:
        dest.stop()
        source.stop()
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
