"""The main job, `pagewire demo`, at a small size: two agents, a generated image, a
post-copy restore, and a passing byte-for-byte verification."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("require_uffd")


def test_demo_reports_a_passing_verification(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagewire.tools.cli",
            "demo",
            "--size-mib",
            "16",
            "--quiet",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr.decode()
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["verification"] == "passed" and report["state"] == "completed"
    # the bulk fill may beat the workload to every page of a small image: then no latency
    faulted = sum(report["faults"].values()) > 0
    assert (report["fault_latency_p50_ms"] is not None) == faulted, report


def test_demo_human_report_and_progress_bar(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagewire.tools.cli",
            "demo",
            "--size-mib",
            "8",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "verification          passed" in text and "time to first touch" in text
    # figures rounded for people: "1.20 ms", never "1.1985999999999999 ms"
    assert not re.search(r"\d\.\d{4,}", text), text
    first = re.search(r"time to first touch\s+(\d+\.\d\d) ms", text)
    assert first and float(first.group(1)) > 0.1, text  # process start + handoff + first page
    # a figure in ms when there were faults; "-" when the fill beat the workload to every
    # page (an 8 MiB image over two bulk connections can)
    faults = re.search(r"faults\s+local (\d+)\s+remote (\d+)\s+zero (\d+)", text)
    assert faults, text
    latency = r"p50 \d+\.\d\d ms" if sum(map(int, faults.groups())) else r"p50 -"
    assert re.search(r"fault latency\s+" + latency, text), text
    assert "0/0 pages" not in out.stderr.decode()  # before attach it says it waits
    assert "100.0%" in out.stderr.decode()  # the live bar reached the end
