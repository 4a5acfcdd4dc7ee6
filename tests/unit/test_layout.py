"""The package's shape: an acyclic import graph, files that fit in a reader's head,
domain code free of HTTP, and a shipped extension without test-only entry points."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "pagewire"
MAX_PY_LINES = 400
MAX_C_LINES = 1000
DOMAIN = ("core", "exports", "sessions", "peer")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "proto" in path.relative_to(PACKAGE).parts:
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that this file imports at run time, local imports included
    (imports under `if TYPE_CHECKING:` are for annotations only and are not edges)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)
                elif base in known:
                    out.add(base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_is_acyclic() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(path, known) - {name} for name, path in mods.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_python_modules_fit_in_a_readers_head() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_PY_LINES
    }
    assert not long, f"modules over {MAX_PY_LINES} lines: {long}"


def test_c_files_fit_in_a_readers_head() -> None:
    csrc = PACKAGE / "csrc"
    files = list(csrc.glob("*.c")) + list(csrc.glob("*.h"))
    assert files, "the extension's C lives in service/pagewire/csrc/"
    long = {p.name: n for p in files if (n := len(p.read_text().splitlines())) > MAX_C_LINES}
    assert not long, f"C files over {MAX_C_LINES} lines: {long}"


def test_domain_code_knows_no_http() -> None:
    offenders = []
    for name, path in modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in DOMAIN:
            text = path.read_text()
            for word in ("fastapi", "starlette", "ApiError", "status_code"):
                if word in text:
                    offenders.append(f"{name}: {word}")
    assert not offenders, offenders


def test_shipped_extension_has_no_test_only_entry_points() -> None:
    from pagewire import _uffd

    # read_memory, write_memory, touch_pages and memory_equals_file are not test-only: the
    # workload client and tools read and touch attached memory with them (the GIL is
    # released, since a touch may block on a fault). The test hooks live in a test build.
    assert not hasattr(_uffd, "sha256_portable")
    assert not hasattr(_uffd.ChunkCache, "corrupt")
