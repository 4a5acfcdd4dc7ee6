"""Node information."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from pagewire.control.routes.deps import Agent, require_token

router = APIRouter(tags=["info"], dependencies=[Depends(require_token)])


@router.get("/v1/info")
async def info(agent: Agent) -> dict[str, Any]:
    return agent.info()
