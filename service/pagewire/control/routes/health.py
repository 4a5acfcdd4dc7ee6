"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pagewire.control.routes.deps import Agent

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(agent: Agent) -> JSONResponse:
    """503 until the engine and gRPC are up, and once shutdown begins. A drained agent stays
    ready (it still serves its exports to peers) but reports "accepting": false."""
    checks = agent.readiness()
    shutting_down = agent.sessions.shutting_down
    # every check but "accepting" (a drained agent still serves its exports) must hold
    ready = all(ok for name, ok in checks.items() if name != "accepting") and not shutting_down
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )
