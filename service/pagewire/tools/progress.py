"""A one-line progress bar for a session status (the CLI's watch, the demo)."""

from __future__ import annotations

import time
from typing import Any

MiB = 1 << 20


def fmt_seconds(value: float | None) -> str:
    """A latency in the unit that suits it: "35us", "1.20ms", "2.50s"; "-" when unknown."""
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1.0:
        return f"{value * 1e3:.2f}ms"
    return f"{value:.2f}s"


def fmt_rate(rate_bytes_s: float | None) -> str:
    return "-" if rate_bytes_s is None else f"{rate_bytes_s / MiB:.1f} MiB/s"


def fraction(status: dict[str, Any]) -> float:
    """Share of the region that needs nothing more: present plus removed pages, of all."""
    total = int(status.get("pages_total") or 0)
    if total <= 0:
        return 1.0 if status.get("state") == "completed" else 0.0
    done = int(status.get("pages_present") or 0) + int(status.get("pages_removed") or 0)
    return min(1.0, max(0.0, done / total))


def render(status: dict[str, Any], rate_bytes_s: float | None, width: int = 30) -> str:
    """One line without newline or carriage return, for example
    "[##########....................]  33.3%  1365/4096 pages    12.5 MiB/s  p50 35us p99 1.20ms
    running". rate_bytes_s is the install rate the caller measured (RateMeter), None if unknown.
    """
    if status.get("state") == "awaiting_attach":
        return f"[{'.' * width}] waiting for the workload to attach  awaiting_attach"
    frac = fraction(status)
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    latency = status.get("fault_latency_seconds") or {}
    return (
        f"[{bar}] {frac * 100:5.1f}%  "
        f"{status.get('pages_present', 0)}/{status.get('pages_total', 0)} pages  "
        f"{fmt_rate(rate_bytes_s):>11}  "
        f"p50 {fmt_seconds(latency.get('p50'))} p99 {fmt_seconds(latency.get('p99'))}  "
        f"{status.get('state', '?')}"
    )


class RateMeter:
    """Install rate in bytes/s from successive statuses (present pages times page size),
    smoothed over recent samples."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None

    def update(self, status: dict[str, Any], now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        page_size = int(status.get("page_size") or 4096)
        present = int(status.get("pages_present") or 0) * page_size
        if self._last is not None:
            t0, b0 = self._last
            if now - t0 > 1e-3:
                sample = max(0.0, (present - b0) / (now - t0))
                rate = self.rate
                self.rate = (
                    sample
                    if rate is None
                    else self.smoothing * sample + (1 - self.smoothing) * rate
                )
        self._last = (now, present)
        return self.rate


__all__ = ["RateMeter", "fmt_rate", "fmt_seconds", "fraction", "render"]
