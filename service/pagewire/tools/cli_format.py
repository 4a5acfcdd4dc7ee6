"""How the CLI shows what the API answers: tables, field lists, sizes, times, rates."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pagewire.control.models import epoch_seconds
from pagewire.tools.progress import fmt_seconds

MiB = 1 << 20


def emit_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


def output(args: argparse.Namespace, body: dict[str, Any], human: Callable[[Any], str]) -> None:
    """The raw JSON with --json, else the human form."""
    print(json.dumps(body, indent=2) if args.json else human(body))


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )


def fields(pairs: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in pairs)


def fmt_size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def fmt_time(value: object) -> str | None:
    """Epoch seconds as UTC ISO 8601; strings are shown as they are."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
    return str(value)


def fmt_error(err: dict[str, Any] | None) -> str:
    return f"{err.get('code')}: {err.get('message')}" if err else "-"


def fmt_source(source: dict[str, Any]) -> str:
    if "path" in source:
        return str(source["path"])
    where = source.get("node") or source.get("peer") or "?"
    return f"{source.get('export', '?')}@{where}"


def export_fields(e: dict[str, Any]) -> str:
    return fields(
        [
            ("name", e.get("name")),
            ("path", e.get("path")),
            ("state", e.get("state")),
            ("size", f"{fmt_size(int(e.get('size', 0)))} ({e.get('size')} bytes)"),
            ("page_size", e.get("page_size")),
            ("chunk_size", e.get("chunk_size")),
            ("pages", e.get("pages")),
            ("zero_pages", e.get("zero_pages")),
            ("chunks", e.get("chunks")),
            ("created_at", fmt_time(e.get("created_at"))),
        ]
    )


def session_fields(s: dict[str, Any], extra: list[tuple[str, object]] | None = None) -> str:
    faults = s.get("faults") or {}
    lat = s.get("fault_latency_seconds") or {}
    err = s.get("error")
    pairs: list[tuple[str, object]] = [
        ("id", s.get("id")),
        ("state", s.get("state")),
        ("source", fmt_source(s.get("source") or {})),
        ("socket", s.get("socket")),
        (
            "pages",
            f"{s.get('pages_present')}/{s.get('pages_total')} present, "
            f"{s.get('pages_zero')} zero, {s.get('pages_removed')} removed",
        ),
        (
            "faults",
            f"local {faults.get('local')}, remote {faults.get('remote')}, "
            f"zero {faults.get('zero')}",
        ),
        ("prefetched", s.get("pages_prefetched")),
        ("background", s.get("pages_background")),
        ("received", fmt_size(int(s.get("bytes_received") or 0))),
        (
            "fault_latency",
            f"p50 {fmt_seconds(lat.get('p50'))}  p99 {fmt_seconds(lat.get('p99'))}  "
            f"max {fmt_seconds(lat.get('max'))}",
        ),
        ("workload_pid", s.get("workload_pid")),
        ("created_at", fmt_time(s.get("created_at"))),
        ("attached_at", fmt_time(s.get("attached_at"))),
        ("completed_at", fmt_time(s.get("completed_at"))),
        ("error", fmt_error(err) if err else None),
    ]
    return fields(pairs + (extra or []))


def mean_rate(status: dict[str, Any]) -> float | None:
    """Bytes present per second from attach to the end, None if unknown."""
    start = epoch_seconds(status.get("attached_at"))
    end = epoch_seconds(status.get("completed_at"))
    page_size = status.get("page_size")
    if start is None or end is None or not page_size:
        return None
    if end <= start:
        return None
    return int(status.get("pages_present") or 0) * int(page_size) / (end - start)
