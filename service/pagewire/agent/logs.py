"""Structured logs: key=value text by default, JSON on request; session ids carried as extra.

Text lines are one record per line whatever the data: control characters in messages and
values (a file name, a peer's error details) are escaped, and a traceback's lines are
indented, so nothing a client or peer sends can forge a line. Repeated warnings and errors
are rate-limited (a flood of accept() failures must not fill the disk)."""

from __future__ import annotations

import json
import logging
import sys
import time

# color_message: uvicorn's copy of the message with terminal colours
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({9: "\\t", 10: "\\n", 13: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """text on one line: control characters (newline and ESC included) as escapes."""
    return text.translate(_ESCAPES)


def _value(value: object) -> str:
    text = escape(str(value))
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras = _extras(record)
        extras.pop("color_message", None)  # uvicorn's copy of msg with raw ANSI colour codes
        entry.update(extras)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{escape(k)}={_value(v)}" for k, v in _extras(record).items())
        message = escape(record.getMessage())
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {message}"
        if extra:
            line += " " + extra
        if record.exc_info:
            trace = self.formatException(record.exc_info).splitlines()
            line += "".join("\n  | " + escape(t) for t in trace)
        return line


class RepeatLimit(logging.Filter):
    """At most `limit` warnings or errors a minute with the same logger and message
    template; the next one let through after a pause says how many were dropped."""

    WINDOW_S = 60.0

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.windows: dict[tuple[str, int, str], list[float]] = {}  # start, count, dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if self.limit <= 0 or record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        window = self.windows.get(key)
        if window is None or now - window[0] >= self.WINDOW_S:
            dropped = int(window[2]) if window else 0
            self.windows[key] = [now, 1, 0]
            if len(self.windows) > 1000:  # forget old keys; the map stays small
                self.windows = {k: w for k, w in self.windows.items() if now - w[0] < self.WINDOW_S}
            if dropped:
                record.suppressed = dropped
            return True
        if window[1] < self.limit:
            window[1] += 1
            return True
        window[2] += 1
        return False


def configure(json_logs: bool, level: str = "info", repeat_limit: int = 10) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    handler.addFilter(RepeatLimit(repeat_limit))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
