"""Node drain: stop taking new sessions while running ones finish."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from pagewire.control.routes.deps import Agent, require_token

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_token)])


@router.post("/drain")
async def drain(agent: Agent) -> dict[str, Any]:
    """New sessions are refused (503 draining); running ones go on. Idempotent."""
    agent.sessions.draining = True
    active = [s.id for s in agent.sessions.sessions.values() if s.active]
    return {"draining": True, "sessions_active": active}


@router.delete("/drain")
async def undrain(agent: Agent) -> dict[str, Any]:
    agent.sessions.draining = False
    return {"draining": False}
