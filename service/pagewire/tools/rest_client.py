"""A small synchronous client for an agent's REST API (httpx), for the CLI and orchestrators.

    from pagewire.tools.rest_client import PagewireClient, ApiError

    with PagewireClient("http://127.0.0.1:7070", token=None) as api:
        s = api.create_session({"path": "/srv/snapshots/vm1.mem"})
        ...  # hand s["socket"] to the workload
        final = api.wait(s["id"], timeout=600)

base_url is http://HOST:PORT, or unix:PATH for an agent whose --http is a unix socket.
Every error response raises ApiError(status, code, message), the agent's own error code
and text; an agent that cannot be reached raises ApiError with status 0 and code
"unreachable". Bodies are plain dicts, exactly the JSON of the API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

ENDED_STATES = ("completed", "failed", "cancelled")
ACTIVE_STATES = ("awaiting_attach", "running", "paused")
DEFAULT_URL = "http://127.0.0.1:7070"


class ApiError(Exception):
    """An error answer of the agent (or status 0, code "unreachable", without an answer)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """The error of a 4xx/5xx response; a body without the error shape is described."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            return cls(response.status_code, str(err.get("code")), str(err.get("message", "")))
        text = response.text.strip().replace("\n", " ")[:200]
        reason = response.reason_phrase or "error"
        return cls(response.status_code, f"http_{response.status_code}", text or reason)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events from the lines of a stream: (event name, data) per event.

    Follows the EventSource rules that matter here: "data" lines are joined with newlines,
    the event name defaults to "message", comments (":") and other fields are ignored, and
    an event is dispatched at a blank line (one left unterminated at the end is dropped).
    """
    event = ""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)


class PagewireClient:
    """The REST API of one agent. Use as a context manager, or call close()."""

    def __init__(
        self, base_url: str = DEFAULT_URL, token: str | None = None, timeout: float = 30.0
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"accept": "application/json", "user-agent": "pagewire-client"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        transport = None
        http_base = self.base_url
        if self.base_url.startswith("unix:"):  # an agent listening on a unix socket
            transport = httpx.HTTPTransport(uds=self.base_url[len("unix:") :])
            http_base = "http://agent"
        self._http = httpx.Client(
            base_url=http_base, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> PagewireClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code, "bad_response", f"{method} {path}: the body is not JSON"
            ) from None

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(0, "unreachable", f"{self.base_url}: {exc or type(exc).__name__}")

    # -- node

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/healthz")
        return result

    def readyz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/readyz")
        return result

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/v1/info")
        return result

    # -- exports

    def create_export(self, name: str, path: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST", "/v1/exports", json={"name": name, "path": path}
        )
        return result

    def list_exports(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/v1/exports")["exports"]
        return result

    def get_export(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/exports/{_seg(name)}")
        return result

    def delete_export(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/v1/exports/{_seg(name)}")
        return result

    # -- sessions

    def create_session(self, source: dict[str, Any], **options: Any) -> dict[str, Any]:
        """POST /v1/sessions. options: prefetch, background, on_source_lost, pause_timeout_s,
        attach_timeout_s, socket ({"uid", "gid", "mode"}); None values are left out."""
        body = {"source": source, **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = self._request("POST", "/v1/sessions", json=body)
        return result

    def list_sessions(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else None
        result: list[dict[str, Any]] = self._request("GET", "/v1/sessions", params=params)[
            "sessions"
        ]
        return result

    def get_session(self, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/sessions/{_seg(session_id)}")
        return result

    def cancel_session(self, session_id: str) -> dict[str, Any]:
        """DELETE: cancels a running session (missing pages poisoned) or forgets an ended one."""
        result: dict[str, Any] = self._request("DELETE", f"/v1/sessions/{_seg(session_id)}")
        return result

    def events(self, session_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The session's event stream: ("progress", status) about once a second, then
        ("end", final status); iteration stops after "end" or when the agent closes the
        stream. Events whose data is not a JSON object are skipped."""
        path = f"/v1/sessions/{_seg(session_id)}/events"
        headers = {"accept": "text/event-stream"}
        try:
            with self._http.stream("GET", path, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                for name, data in parse_sse(response.iter_lines()):
                    try:
                        body = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(body, dict):
                        continue
                    yield name, body
                    if name == "end":
                        return
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def watch(
        self, session_id: str, poll_interval: float = 1.0
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Like events(), but always ends with ("end", final status): follows the event
        stream, reconnects if it closes early, and polls GET /v1/sessions/{id} when the
        agent has no event stream (404 on the route while the session exists)."""
        polling = False
        while True:
            if not polling:
                try:
                    for name, status in self.events(session_id):
                        yield name, status
                        if name == "end":
                            return
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    polling = True  # raises the 404 below if the session itself is unknown
            status = self.get_session(session_id)
            if status.get("state") in ENDED_STATES:
                yield "end", status
                return
            if polling:
                yield "progress", status
            time.sleep(poll_interval)

    def wait(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the session has ended (completed, failed or cancelled) and return its
        final status; TimeoutError after timeout seconds (checked at each progress event)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for name, status in self.watch(session_id):
            if name == "end":
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"session {session_id} still {status.get('state')} after {timeout} s"
                )
        raise AssertionError("watch() ends with an end event")  # pragma: no cover


def _seg(value: str) -> str:
    """One path segment, percent-encoded."""
    return quote(value, safe="")


__all__ = ["ACTIVE_STATES", "ENDED_STATES", "ApiError", "PagewireClient", "parse_sse"]
