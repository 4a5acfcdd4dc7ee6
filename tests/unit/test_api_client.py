"""The API client's parts that need no agent: SSE parsing, error decoding, the progress bar.

Everything that talks to an agent runs against a real one in tests/integration/test_cli.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pagewire.tools.localagents import free_port
from pagewire.tools.progress import RateMeter, fmt_seconds, fraction, render
from pagewire.tools.rest_client import ApiError, PagewireClient, parse_sse


def status(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "s-1",
        "state": "running",
        "pages_total": 100,
        "pages_present": 0,
        "pages_removed": 0,
        "page_size": 4096,
        "fault_latency_seconds": {"p50": None, "p99": None, "max": None},
    }
    base.update(kw)
    return base


# -- server-sent events


def test_sse_events_and_data() -> None:
    lines = [
        "event: progress",
        'data: {"a": 1}',
        "",
        "event: end",
        'data: {"a": 2}',
        "",
    ]
    assert list(parse_sse(lines)) == [("progress", '{"a": 1}'), ("end", '{"a": 2}')]


def test_sse_multiline_data_comments_and_defaults() -> None:
    lines = [": keep-alive", "", "id: 7", "data:x", "data: y", "retry: 100", "", "data: z\r\n", ""]
    assert list(parse_sse(lines)) == [("message", "x\ny"), ("message", "z")]


def test_sse_unterminated_event_is_dropped_and_empty_events_skipped() -> None:
    assert list(parse_sse(["event: progress", "", "event: end", "data: {}"])) == []


def test_sse_colon_in_value_kept() -> None:
    assert list(parse_sse(['data: {"t": "a:b"}', ""])) == [("message", '{"t": "a:b"}')]


# -- errors


def test_error_from_error_shape() -> None:
    body = {"error": {"code": "session_not_found", "message": "no session s-x"}}
    err = ApiError.from_response(httpx.Response(404, json=body))
    assert (err.status, err.code, err.message) == (404, "session_not_found", "no session s-x")
    assert str(err) == "session_not_found: no session s-x"


def test_error_from_other_bodies() -> None:
    err = ApiError.from_response(httpx.Response(502, text="<html>\nbad gateway</html>"))
    assert (err.status, err.code, err.message) == (502, "http_502", "<html> bad gateway</html>")
    err = ApiError.from_response(httpx.Response(500, json={"detail": "x"}))
    assert (err.status, err.code) == (500, "http_500")
    err = ApiError.from_response(httpx.Response(503))
    assert (err.code, err.message) == ("http_503", "Service Unavailable")


def test_unreachable_agent_is_an_api_error() -> None:
    port = free_port()  # nothing listens there
    with PagewireClient(f"http://127.0.0.1:{port}", timeout=2.0) as api:
        with pytest.raises(ApiError) as info:
            api.list_sessions()
    assert info.value.status == 0 and info.value.code == "unreachable"
    with PagewireClient(f"http://127.0.0.1:{port}", timeout=2.0) as api:
        with pytest.raises(ApiError) as info:
            list(api.events("s-1"))
    assert info.value.code == "unreachable"


def test_unix_socket_url_unreachable(tmp_path: Any) -> None:
    with PagewireClient(f"unix:{tmp_path / 'none.sock'}", timeout=2.0) as api:
        with pytest.raises(ApiError) as info:
            api.info()
    assert info.value.code == "unreachable"


def test_token_header() -> None:
    api = PagewireClient("http://127.0.0.1:1/", token="s3cret")
    assert api._http.headers["authorization"] == "Bearer s3cret"
    assert api.base_url == "http://127.0.0.1:1"
    api.close()
    api = PagewireClient("http://127.0.0.1:1")
    assert "authorization" not in api._http.headers
    api.close()


# -- progress bar


def test_render_bar() -> None:
    line = render(
        status(pages_present=50, fault_latency_seconds={"p50": 35e-6, "p99": 1.2e-3}),
        12.5 * (1 << 20),
        width=10,
    )
    assert line.startswith("[#####.....]  50.0%  50/100 pages")
    assert "12.5 MiB/s" in line and "p50 35us p99 1.20ms" in line and line.endswith("running")
    assert "\n" not in line and "\r" not in line


def test_render_unknowns_and_bounds() -> None:
    waiting = render(status(pages_total=0, pages_present=0, state="awaiting_attach"), None)
    assert waiting.startswith("[" + "." * 30 + "] waiting for the workload to attach")
    assert "0/0" not in waiting
    line = render(status(pages_total=0, pages_present=0, state="running"), None)
    assert line.startswith("[" + "." * 30 + "]   0.0%  0/0 pages")
    assert " - " in line and "p50 - p99 -" in line
    done = render(status(pages_present=90, pages_removed=10, state="completed"), None, width=4)
    assert done.startswith("[####] 100.0%  90/100 pages")
    assert fraction(status(pages_total=0, state="completed")) == 1.0
    assert fraction(status(pages_present=500)) == 1.0


def test_fmt_seconds() -> None:
    assert fmt_seconds(None) == "-"
    assert fmt_seconds(2e-6) == "2us"
    assert fmt_seconds(0.25) == "250.00ms"
    assert fmt_seconds(3.0) == "3.00s"


def test_rate_meter() -> None:
    meter = RateMeter(smoothing=1.0)
    assert meter.update(status(pages_present=0), now=10.0) is None
    assert meter.update(status(pages_present=256), now=11.0) == 256 * 4096
    assert meter.update(status(pages_present=256), now=12.0) == 0.0
    smooth = RateMeter(smoothing=0.5)
    smooth.update(status(pages_present=0), now=0.0)
    smooth.update(status(pages_present=100), now=1.0)
    assert smooth.update(status(pages_present=100), now=2.0) == pytest.approx(50 * 4096)
