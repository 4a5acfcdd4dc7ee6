"""The fault-injection suite's record: scenario x runs x wrong bytes x hangs x time to
recover, printed at the end of the run; with PAGEWIRE_FAULT_RUNS above 1 (a measurement,
not the test command's single pass) also written to bench/results/faults.md."""

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


HEADER = """# Fault injection: outcomes per scenario and workload kind

Produced by `PAGEWIRE_FAULT_RUNS={runs} .venv/bin/python -m pytest tests/faults` (root, two
agents in network namespaces, 2 shared cores): {runs} runs per row.

Workload kinds: `client` is `pagewire.client` (negotiates POISON, reads the verdict);
`firecracker` is `tests/fc_workload.py` (EVENT_REMOVE only, two regions, both page-size
keys, socket and uffd held open, never reads a reply). "wrong bytes" counts runs where a
byte differed from the image (zeros included); "SIGBUS" counts runs where the workload died
by SIGBUS (never exit 137); "time to recover" is the longest time, over the runs, from the
fault's end (source `/readyz` 200 again, link up) to pages arriving again. For
`not_registered` the workload's first page may be served before the refusal (it then reads
the image's own bytes and exits 2 by design, never zeros); its registered ranges are
poisoned.

"""


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
    if RUNS > 1:
        out = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(HEADER.format(runs=RUNS) + text + "\n")


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
