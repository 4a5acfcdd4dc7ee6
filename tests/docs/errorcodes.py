"""The (HTTP status, error code) pairs the agent's source can answer with, found by reading it
(AST): `SomeError(404, "x", ...)`-like calls, `(502, "x")` tuples, `{404: "x"}` dicts, and
exception classes holding both a `code = "x"` and an `http_status = 409`."""

from __future__ import annotations

import ast
import re

from .docblocks import ROOT

PACKAGE = ROOT / "service" / "pagewire"
CLIENT_SIDE = {"rest_client.py", "cli_api.py", "cli.py", "cli_format.py"}
CODE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _status(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int and 400 <= node.value < 600:
        return node.value
    return None


def _code(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE.match(node.value):
        return node.value
    return None


def _call_pair(args: list[ast.expr]) -> tuple[int | None, str | None]:
    """A status among a call's positional arguments and the first code after it:
    `ApiError(404, "x")`, `refuse(send, 408, "x", ...)`, `raw_response(503, "Service
    Unavailable", "x", ...)` (a reason phrase is not a code)."""
    for i, arg in enumerate(args):
        status = _status(arg)
        if status is not None:
            code = next((c for a in args[i + 1 :] if (c := _code(a))), None)
            return status, code
    return None, None


def _pairs_in(tree: ast.AST) -> set[tuple[int, str]]:
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2:
            pair = _call_pair(node.args)
        elif isinstance(node, ast.Tuple) and len(node.elts) >= 2:
            pair = (_status(node.elts[0]), _code(node.elts[1]))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if key is not None and _status(key) and _code(value):
                    found.add((_status(key), _code(value)))  # type: ignore[arg-type]
            continue
        elif isinstance(node, ast.ClassDef):
            attrs = {
                t.id: stmt.value
                for stmt in node.body
                if isinstance(stmt, ast.Assign)
                for t in stmt.targets
                if isinstance(t, ast.Name)
            }
            status_node = attrs.get("http_status") or attrs.get("status")
            pair = (
                _status(status_node) if status_node else None,
                _code(attrs["code"]) if "code" in attrs else None,
            )
        else:
            continue
        if pair[0] is not None and pair[1] is not None:
            found.add(pair)  # type: ignore[arg-type]
    return found


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _domain_pairs(trees: list[ast.AST]) -> set[tuple[int, str]]:
    """Domain errors (core/errors.py): `NotFound("code", ...)` calls, `(NotFound, "code")`
    pairs and classes with a `code = "x"` below a domain kind; control/errors.py's
    STATUS_OF gives the status."""
    from pagewire.control.errors import STATUS_OF

    status_of_kind = {kind.__name__: status for kind, status in STATUS_OF}
    classes: dict[str, tuple[list[str], str | None]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                code = None
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "code" for t in stmt.targets
                    ):
                        code = _code(stmt.value)
                bases = [b for b in map(_name, node.bases) if b]
                classes[node.name] = (bases, code)

    def status(name: str, seen: frozenset[str] = frozenset()) -> int | None:
        if name in status_of_kind:
            return status_of_kind[name]
        for base in classes.get(name, ([], None))[0]:
            if base not in seen and (found := status(base, seen | {name})):
                return found
        return None

    found = {
        (st, code)
        for name, (_, code) in classes.items()
        if code and (st := status(name)) and name not in status_of_kind
    }
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and (name := _name(node.func)):
                st, code = status(name), _code(node.args[0])
            elif (
                isinstance(node, ast.Tuple)
                and len(node.elts) == 2
                and (name := _name(node.elts[0]))
            ):
                st, code = status(name), _code(node.elts[1])  # (NotFound, "x") in a map
            else:
                continue
            if st and code:
                found.add((st, code))
    return found


def emitted_pairs() -> set[tuple[int, str]]:
    pairs: set[tuple[int, str]] = set()
    trees = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in CLIENT_SIDE or "proto" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        trees.append(tree)
        pairs |= _pairs_in(tree)
    return pairs | _domain_pairs(trees)


def documented_pairs(text: str) -> set[tuple[int, str]]:
    """Every `NNN `code`` in a doc: an HTTP status followed by a backticked error code."""
    return {(int(s), c) for s, c in re.findall(r"\b([45]\d\d)\s+`([a-z][a-z0-9_]*)`", text)}
