"""Prometheus exposition (no token: scrapers authenticate by network policy)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagewire.control.routes.deps import Agent

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(agent: Agent) -> Response:
    return Response(generate_latest(agent.metrics), media_type=CONTENT_TYPE_LATEST)
