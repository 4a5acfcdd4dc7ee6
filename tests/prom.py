"""A real Prometheus server (Debian package `prometheus`) for tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pagewire.tools.localagents import free_port

from tests.conftest import need


@contextmanager
def prometheus(workdir: Path, config: str, rules: str | None = None) -> Iterator[str]:
    """Run Prometheus with this config (and rules.yaml beside it); yields its base URL."""
    need(
        shutil.which("prometheus") is not None,
        "the prometheus server (Debian package 'prometheus') is not installed",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    if rules is not None:
        (workdir / "rules.yaml").write_text(rules)
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
