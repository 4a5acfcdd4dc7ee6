"""Live snapshots: create, inspect, list."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from pagewire.control.errors import ErrorResponse
from pagewire.control.models import SnapshotRequest, with_rfc3339
from pagewire.control.routes.deps import Agent, require_token
from pagewire.control.routes.sessions import PROGRESS_INTERVAL_S
from pagewire.control.routes.sessions import sse_event as sse
from pagewire.core.errors import Unavailable

router = APIRouter(
    prefix="/v1/snapshots", tags=["snapshots"], dependencies=[Depends(require_token)]
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 422, 503)
}


def _manager(agent: Any) -> Any:
    if agent.snapshots is None:
        raise Unavailable("not_ready", "the agent is starting")
    return agent.snapshots


@router.post("", status_code=201, responses=ERRORS)
async def create_snapshot(body: SnapshotRequest, agent: Agent) -> dict[str, Any]:
    """Returns a socket: the workload hands over its region registered in WP mode
    (pagewire.client.attach_for_snapshot). The snapshot is the memory at the instant the
    agent protects it; the finished file becomes the export `name`."""
    snap = await _manager(agent).create(body)
    return with_rfc3339(snap.status())


@router.get("", responses=ERRORS)
async def list_snapshots(agent: Agent) -> dict[str, Any]:
    return {"snapshots": [with_rfc3339(s.status()) for s in _manager(agent).snapshots.values()]}


@router.get("/{snapshot_id}", responses=ERRORS)
async def get_snapshot(snapshot_id: str, agent: Agent) -> dict[str, Any]:
    return with_rfc3339(_manager(agent).get(snapshot_id).status())


@router.get(
    "/{snapshot_id}/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "progress events, then one end event",
        },
    },
)
async def snapshot_events(snapshot_id: str, agent: Agent) -> StreamingResponse:
    """Server-sent events, as for sessions: `progress` about once a second, then `end`."""
    snap = _manager(agent).get(snapshot_id)

    async def stream() -> AsyncIterator[str]:
        while snap.active:
            yield sse("progress", snap.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(snap.ended.wait(), PROGRESS_INTERVAL_S)
        yield sse("end", snap.status())

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
