"""Sessions: create, list, inspect, cancel or forget."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from pagewire.control.errors import ErrorResponse
from pagewire.control.models import (
    SessionList,
    SessionRequest,
    SessionState,
    SessionStatus,
    with_rfc3339,
)
from pagewire.control.routes.deps import Agent, require_token

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_token)])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503)
}


@router.post("", status_code=201, response_model=SessionStatus, responses=ERRORS)
async def create_session(body: SessionRequest, agent: Agent) -> dict[str, Any]:
    session = await agent.sessions.create(body)
    return session.status()


@router.get("", response_model=SessionList, responses=ERRORS)
async def list_sessions(
    agent: Agent, state: SessionState | None = Query(default=None)
) -> dict[str, Any]:
    items = [s.status() for s in agent.sessions.sessions.values() if state in (None, s.state)]
    return {"sessions": items}


@router.get("/{session_id}", response_model=SessionStatus, responses=ERRORS)
async def get_session(session_id: str, agent: Agent) -> dict[str, Any]:
    return agent.sessions.get(session_id).status()


@router.delete("/{session_id}", response_model=SessionStatus, responses=ERRORS)
async def delete_session(session_id: str, agent: Agent) -> dict[str, Any]:
    """Cancel a running session (missing pages poisoned) or forget an ended one."""
    manager = agent.sessions
    session = manager.get(session_id)
    if session.active:
        await manager.cancel(session)
    else:
        manager.forget(session)
    return session.status()


PROGRESS_INTERVAL_S = 1.0


def sse_event(kind: str, status: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(with_rfc3339(status))}\n\n"


@router.get(
    "/{session_id}/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "progress events, then one end event",
        },
    },
)
async def session_events(session_id: str, agent: Agent) -> StreamingResponse:
    """Server-sent events: `progress` about once a second, then one `end` when it ends."""
    session = agent.sessions.get(session_id)

    async def stream() -> AsyncIterator[str]:
        while session.active:
            yield sse_event("progress", session.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.ended.wait(), PROGRESS_INTERVAL_S)
        yield sse_event("end", session.status())

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
