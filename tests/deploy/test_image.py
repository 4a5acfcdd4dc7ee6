"""deploy/Dockerfile built for real (buildah, chroot isolation, an offline Debian base) and a
region restored through the agent started from the image with the DaemonSet's arguments and
environment: scripts/image_check.sh, which says how. Slow (minutes on a fresh machine: the
base rootfs and the build); CI runs it as its own step after the suite."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(1800)
def test_image_builds_and_restores_a_region() -> None:
    need(os.geteuid() == 0, "buildah and the agent's uffd handoff need root")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image_check.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed: the image's agent restored" in result.stderr
    assert '"state":"completed"' in result.stdout
    print(f"image check took {time.monotonic() - started:.0f} s")
