"""The fenced blocks of the project's Markdown docs, with the doc-test directives before them.

A shell block (```sh, ```bash, ```shell, ```console) is a command a reader is told to run;
tests/docs/test_readme_commands.py runs every one of them in order, per document. HTML
comments just before a block (blank lines allowed) steer that:

    <!-- not-run: REASON -->          do not run it; REASON says why (required)
    <!-- stand-in: COMMAND -->        with not-run: run COMMAND in its place (e.g. a workload
                                      process where the doc starts Firecracker)
    <!-- doc-test-setup: COMMAND -->  run COMMAND first: what the doc presumes exists
    <!-- background: READY-COMMAND -->  the block keeps running (an agent): start it in the
                                      background and wait until READY-COMMAND succeeds

A directive may span lines; several may precede one block. Setup commands may call the
functions of tests/docs/world.sh (start_agent, make_image, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(
    r"<!--\s*(not-run|stand-in|doc-test-setup|background)\s*:\s*(.*?)\s*-->", re.DOTALL
)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_command(self) -> bool:
        return self.lang in SHELL_LANGS

    @property
    def commands(self) -> str:
        """What to run: the text of a sh/bash/shell block; of a console block, the lines after
        a `$ ` prompt (and their continuation lines), not the output shown."""
        if self.lang != "console":
            return self.text
        kept: list[str] = []
        continued = False
        for line in self.text.splitlines():
            if line.startswith("$ ") or continued:
                kept.append(line[2:] if line.startswith("$ ") and not continued else line)
                continued = line.endswith("\\")
        return "\n".join(kept)

    def directive(self, name: str) -> str | None:
        return next((v for k, v in self.directives if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.directives if k == name]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    prose: list[str] = []  # text since the last block, where its directives live
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        indent, ticks, lang = m.group(1), m.group(2), m.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        directives = _directives_just_before("\n".join(prose))
        blocks.append(Block(path, i + 1, lang, "\n".join(body), directives))
        prose = []
        i = j + 1
    return blocks


def _directives_just_before(prose: str) -> list[tuple[str, str]]:
    """The directives in the trailing run of comments and blank lines before a block."""
    tail = prose.rstrip()
    found: list[tuple[str, str]] = []
    while tail.endswith("-->"):
        start = tail.rfind("<!--")
        if start < 0:
            break
        m = DIRECTIVE.fullmatch(tail[start:])
        if m:
            found.insert(0, (m.group(1), " ".join(m.group(2).split())))
        tail = tail[:start].rstrip()
    return found
