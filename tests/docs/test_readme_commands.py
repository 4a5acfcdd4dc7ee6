"""The docs are executable: every shell block in README.md and docs/*.md that a reader is told
to run is run, in order, against real agents; every JSON field the docs show exists in the
OpenAPI schema and in the real response the block before it printed; every `NNN `code`` the
docs name is an error the agent can answer with, and docs/design.md lists them all.

Each document runs in a shell of its own inside new network, mount and PID namespaces, so
its commands run word for word (the hosts `src`, `dst`, `node-a`, `node-b`, the paths
/srv/..., /run/pagewire/..., /etc/pagewire/...) without touching this machine, and every
process it started ends with it. Blocks are discovered, not listed here: a new block runs
unless its doc says why not (see tests/docs/docblocks.py for the directives). `curl` fails
on an HTTP error (as if every call had `--fail-with-body`), so an error response the doc did
not expect fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need

from .docblocks import ROOT, Block, doc_files, parse
from .errorcodes import documented_pairs, emitted_pairs

DOCS = doc_files()
CURL_WRAPPER = """#!/bin/sh
# the doc tests' curl: an HTTP error fails the command, as --fail-with-body would
for arg in "$@"; do
    case "$arg" in
        --fail | --fail-with-body) exec /usr/bin/curl "$@" ;;
        --*) ;;
        -*f*) exec /usr/bin/curl "$@" ;;
    esac
done
exec /usr/bin/curl --fail-with-body "$@"
"""
PRELUDE = """set -euo pipefail
cd {root}
ip link set lo up
for d in /srv /run/pagewire /var/lib/pagewire /etc/pagewire; do
    mkdir -p "$d" && mount -t tmpfs -o mode=0755 doctest "$d"
done
{{ cat /etc/hosts; echo "127.0.0.2 node-a src"; echo "127.0.0.3 node-b dst"; }} >"$DOCTEST/hosts"
mount --bind "$DOCTEST/hosts" /etc/hosts
export PATH="$DOCTEST/bin:$PATH"
source tests/docs/world.sh
"""


def _step(where: str, command: str, out: str, background: str | None = None) -> str:
    head = f'echo {json.dumps(where)} >"$DOCTEST/current"\n'
    if background is None:
        return head + f'{{\n{command}\n}} >"$DOCTEST/{out}" 2>&1\n'
    return (
        head
        + f'{{\n{command}\n}} >"$DOCTEST/{out}" 2>&1 &\n'
        + "for _ in $(seq 1 240); do\n"
        + f"    if {background} >/dev/null 2>&1; then break; fi\n"
        + "    sleep 0.25\ndone\n"
        + f"{background} >/dev/null\n"
    )


def script_for(blocks: list[Block]) -> str:
    """The document as one bash script: its blocks in order, each one's output in a file."""
    parts = [PRELUDE.format(root=ROOT)]
    for i, block in enumerate(blocks):
        if not block.is_command:
            continue
        for n, setup in enumerate(block.all("doc-test-setup")):
            parts.append(_step(f"{block.where} (setup)", setup, f"setup-{i}-{n}.out"))
        if block.directive("not-run") is not None:
            stand_in = block.directive("stand-in")
            if stand_in:
                parts.append(_step(f"{block.where} (stand-in)", stand_in, f"block-{i}.out"))
            continue
        parts.append(
            _step(block.where, block.commands, f"block-{i}.out", block.directive("background"))
        )
    parts.append('echo done >"$DOCTEST/current"\n')
    return "".join(parts)


def clean_env(workdir: Path) -> dict[str, str]:
    """The caller's environment less PAGEWIRE_* and any virtualenv on PATH: a reader's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEWIRE_")}
    env.pop("VIRTUAL_ENV", None)
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if "/.venv/" not in p + "/"]
    env["PATH"] = ":".join(path + ["/usr/sbin", "/sbin"])
    env["DOCTEST"] = str(workdir)
    env["DOCTEST_PYTHON"] = sys.executable
    env["PAGEWIRE_BIN"] = str(Path(sys.executable).parent / "pagewire")
    return env


def last_json(text: str) -> Any:
    """The last JSON value a command printed (whole output, else its last JSON line)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def json_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in json_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in json_keys(v)}
    return set()


def example_keys(text: str) -> set[str]:
    """Field names in a JSON example, which may hold `...` or `|` alternatives."""
    return set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*:', text))


def shown_responses(blocks: list[Block]) -> list[tuple[int, Block]]:
    """JSON examples right after a command block (nothing but blank lines between): the
    response that command prints. Returns (index of the command block, the example)."""
    pairs = []
    for i in range(1, len(blocks)):
        prev, block = blocks[i - 1], blocks[i]
        if block.lang == "json" and prev.is_command and prev.directive("not-run") is None:
            source = prev.path.read_text().splitlines()
            between = source[prev.line + prev.text.count("\n") + 1 : block.line - 1]
            if not any(line.strip() for line in between):
                pairs.append((i - 1, block))
    return pairs


@pytest.mark.root
@pytest.mark.uffd
@pytest.mark.timeout(600)
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_commands_run(doc: Path, tmp_path: Path) -> None:
    need(os.geteuid() == 0, "the docs run in their own namespaces (unshare needs root)")
    need(shutil.which("unshare") is not None, "unshare (util-linux)")
    blocks = parse(doc)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "curl").write_text(CURL_WRAPPER)
    (tmp_path / "bin" / "curl").chmod(0o755)
    (tmp_path / "doc.sh").write_text(script_for(blocks))
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "bash",
            str(tmp_path / "doc.sh"),
        ],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=540,
    )
    where = (tmp_path / "current").read_text().strip() if (tmp_path / "current").exists() else "?"
    if result.returncode != 0 or where != "done":
        outputs = "\n".join(
            f"--- {p.name}:\n{p.read_text()[-3000:]}"
            for p in sorted(tmp_path.glob("*.out")) + sorted(tmp_path.glob("*.log"))
        )
        pytest.fail(
            f"{where} failed (exit {result.returncode}):\n{result.stderr[-3000:]}\n{outputs}"
        )
    for index, example in shown_responses(blocks):
        real = last_json((tmp_path / f"block-{index}.out").read_text())
        assert real is not None, (
            f"{blocks[index].where} printed no JSON; {example.where} shows some"
        )
        missing = example_keys(example.text) - json_keys(real)
        assert not missing, f"{example.where} shows fields the real response lacks: {missing}"


def openapi_fields() -> set[str]:
    from pagewire.agent.node import AgentState
    from pagewire.agent.settings import Settings
    from pagewire.control.app import create_app

    schema = create_app(AgentState(Settings())).openapi()
    return {
        name for s in schema["components"]["schemas"].values() for name in s.get("properties", {})
    }


def test_json_examples_use_real_fields() -> None:
    """Every field of every ```json example in the docs is a field of the REST API."""
    fields = openapi_fields()
    unknown = {
        block.where: sorted(example_keys(block.text) - fields)
        for doc in DOCS
        for block in parse(doc)
        if block.lang == "json" and example_keys(block.text) - fields
    }
    assert not unknown, f"fields the OpenAPI schema does not have: {unknown}"


def test_error_codes_named_in_docs_are_real() -> None:
    emitted = emitted_pairs()
    for doc in DOCS:
        wrong = documented_pairs(doc.read_text()) - emitted
        assert not wrong, f"{doc.relative_to(ROOT)} names errors the agent never answers: {wrong}"


def test_design_lists_every_error_code() -> None:
    listed = documented_pairs((ROOT / "docs" / "design.md").read_text())
    missing = emitted_pairs() - listed
    assert not missing, f"docs/design.md does not list: {sorted(missing)}"


def test_every_skipped_block_says_why() -> None:
    for doc in DOCS:
        for block in parse(doc):
            reason = block.directive("not-run")
            if reason is not None:
                assert len(reason) >= 10, f"{block.where}: not-run needs a reason"
