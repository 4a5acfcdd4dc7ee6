"""The FastAPI application: routers per resource, one error shape, and the request guard
(token from the headers, then a bounded body) in front of every route."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from pagewire import __version__
from pagewire.agent.node import AgentState
from pagewire.control.errors import install_handlers
from pagewire.control.httpguard import RequestGuard
from pagewire.control.routes import admin, exports, health, info, metrics, sessions, snapshots


def create_app(agent: AgentState) -> FastAPI:
    # /docs and /redoc with Swagger UI and ReDoc served by the agent itself (no CDN)
    app = FastAPIOffline(
        title="pagewire agent",
        version=__version__,
        description="Post-copy memory over userfaultfd: exports, sessions, progress, metrics.",
    )
    app.state.agent = agent
    install_handlers(app)
    s = agent.settings
    # With a token, everything but /healthz, /readyz and /metrics needs it: the API, and
    # /docs, /redoc and /openapi.json too (the schema tells an intruder what to try).
    app.add_middleware(
        RequestGuard,  # type: ignore[arg-type]
        token=agent.token,
        max_body=s.max_body_bytes,
        body_timeout_s=s.http_body_timeout_s,
    )
    for module in (health, metrics, info, exports, sessions, snapshots, admin):
        app.include_router(module.router)
    return app
