"""The image recipe, read (test_image.py builds and runs it for real): multi-stage,
the compiler only in the builder, a wheel built with `pip wheel`, an unprivileged default user."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .common import DEPLOY


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def text(self, *keywords: str) -> str:
        return "\n".join(arg for kw, arg in self.instructions if not keywords or kw in keywords)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages, with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"bad FROM: {line}"
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m[1])
            stages.append(Stage(base, m[2]))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def stages() -> list[Stage]:
    return parse_dockerfile((DEPLOY / "Dockerfile").read_text())[1]


def test_multi_stage_on_slim_bookworm() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    assert [s.name for s in all_stages] == ["builder", "runtime"]
    for stage in all_stages:
        assert stage.base == "python:3.11-slim-bookworm"


def test_builder_compiles_a_wheel() -> None:
    builder = stages()[0]
    run = builder.text("RUN")
    for package in ("gcc", "linux-libc-dev", "libxxhash-dev"):
        assert re.search(rf"apt-get install .*\b{package}\b", run), package
    assert re.search(r"\bpip wheel\b.*--wheel-dir /wheels \.", run)
    copied = builder.text("COPY")
    for path in ("pyproject.toml", "setup.py", "service"):
        assert path in copied


def test_runtime_has_no_compiler_and_installs_the_wheel_offline() -> None:
    runtime = stages()[-1]
    everything = runtime.text()
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|linux-libc-dev|-dev)\b", everything)
    assert "apt-get install" not in everything
    run = runtime.text("RUN")
    assert "from=builder" in run
    assert re.search(r"pip install --no-index --find-links /wheels pagewire", run)


def test_runtime_defaults() -> None:
    runtime = stages()[-1]
    (user,) = [arg for kw, arg in runtime.instructions if kw == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [arg for kw, arg in runtime.instructions if kw == "ENTRYPOINT"]
    assert entrypoint == '["pagewire"]'
    exposed = " ".join(arg for kw, arg in runtime.instructions if kw == "EXPOSE").split()
    assert exposed == ["7070", "7071", "7072"]


def test_dockerignore_keeps_local_builds_out() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") :][0] == "**"
    for pattern in ("**/*.so", "**/__pycache__"):
        assert pattern in ignore
    for kept in ("!pyproject.toml", "!setup.py", "!service/**", "!proto/**"):
        assert kept in ignore
