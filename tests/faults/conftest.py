"""The fault-injection suite's record: scenario x runs x wrong bytes x hangs x time to
recover, printed at the end of the run and written to bench/results/faults.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Outcome:
    scenario: str
    wrong_bytes: int
    hung: bool
    recover_s: float | None
    total_s: float
    detail: str


OUTCOMES: list[Outcome] = []
# PAGEWIRE_FAULT_RUNS=10 runs every scenario ten times (bench/results/faults.md counts them)
RUNS = int(os.environ.get("PAGEWIRE_FAULT_RUNS", "1"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if RUNS > 1 and "record" in metafunc.fixturenames:
        metafunc.fixturenames.append("fault_run")
        metafunc.parametrize("fault_run", range(RUNS), ids=lambda i: f"run{i}")


def table() -> str:
    rows = [
        "| scenario | runs | wrong bytes | hangs | SIGBUS | time to recover (s) | total (s) "
        "| detail |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by: dict[str, list[Outcome]] = {}
    for o in OUTCOMES:
        by.setdefault(o.scenario, []).append(o)
    for name, outs in by.items():
        recover = [o.recover_s for o in outs if o.recover_s is not None]
        recover_text = f"{max(recover):.2f}" if recover else "-"
        rows.append(
            f"| {name} | {len(outs)} | {sum(o.wrong_bytes for o in outs)} | "
            f"{sum(o.hung for o in outs)} | "
            f"{sum('SIGBUS' in o.detail.split(', ') for o in outs)} | {recover_text} | "
            f"{max(o.total_s for o in outs):.2f} | {outs[-1].detail} |"
        )
    return "\n".join(rows)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    text = table()
    terminalreporter.write_line("")
    terminalreporter.write_line("fault-injection outcomes:")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    out = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


@pytest.fixture
def record() -> Any:
    def add(
        scenario: str,
        wrong_bytes: int,
        hung: bool,
        recover_s: float | None,
        total_s: float,
        detail: str = "",
    ) -> None:
        OUTCOMES.append(Outcome(scenario, wrong_bytes, hung, recover_s, total_s, detail))

    return add
