"""Exports: publish a file under an export root, list, inspect, withdraw."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from pagewire.control.errors import ErrorResponse
from pagewire.control.models import ExportRequest
from pagewire.control.routes.deps import Agent, require_token
from pagewire.core import filework
from pagewire.core.errors import Unavailable
from pagewire.exports.errors import ExportError
from pagewire.exports.live import publish_process

router = APIRouter(prefix="/v1/exports", tags=["exports"], dependencies=[Depends(require_token)])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


class ExportStatus(BaseModel):
    name: str
    path: str
    size: int
    page_size: int
    chunk_size: int
    pages: int
    zero_pages: int
    chunks: int
    state: str
    created_at: str
    pid: int | None = None
    ranges: list[dict[str, int]] | None = None


class ExportList(BaseModel):
    exports: list[ExportStatus]


def _registry(agent: Any) -> Any:
    if agent.exports is None:
        raise Unavailable("not_ready", "the export registry is not loaded yet")
    return agent.exports


@router.post("", status_code=201, response_model=ExportStatus, responses=ERRORS)
async def publish(body: ExportRequest, agent: Agent) -> dict[str, Any]:
    registry = _registry(agent)
    pool = filework.pool()

    def undo(exp: Any) -> None:
        with contextlib.suppress(ExportError):  # withdrawn meanwhile
            registry.withdraw(exp.name)

    registry.precheck(body.name)
    if body.pid is not None:
        ranges = [(r.start, r.size) for r in body.ranges] if body.ranges else None
        export = await pool.run(
            f"exporting process {body.pid}",
            publish_process,
            registry,
            body.name,
            body.pid,
            ranges,
            undo=undo,
        )
    else:
        export = await pool.run(
            f"publishing {body.path!r}", registry.publish, body.name, body.path, undo=undo
        )
    result: dict[str, Any] = export.to_json()
    return result


@router.get("", response_model=ExportList, responses=ERRORS)
async def list_exports(agent: Agent) -> dict[str, Any]:
    return {"exports": [e.to_json() for e in _registry(agent).list()]}


@router.get("/{name}", response_model=ExportStatus, responses=ERRORS)
async def get_export(name: str, agent: Agent) -> dict[str, Any]:
    result: dict[str, Any] = _registry(agent).get(name).to_json()
    return result


@router.delete("/{name}", response_model=ExportStatus, responses=ERRORS)
async def withdraw(name: str, agent: Agent) -> dict[str, Any]:
    result: dict[str, Any] = _registry(agent).withdraw(name).to_json()
    return result
