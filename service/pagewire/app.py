"""The FastAPI application: routers per resource, one error shape, body size bound."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

from . import __version__
from .api import admin, exports, health, info, metrics, sessions, snapshots
from .errors import error_response, install_handlers
from .state import AgentState

MAX_BODY_BYTES = 1 << 20


def create_app(agent: AgentState) -> FastAPI:
    # /docs and /redoc with Swagger UI and ReDoc served by the agent itself (no CDN)
    app = FastAPIOffline(
        title="pagewire agent",
        version=__version__,
        description="Post-copy memory over userfaultfd: exports, sessions, progress, metrics.",
    )
    app.state.agent = agent
    install_handlers(app)

    @app.middleware("http")
    async def bound_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(
                413, "body_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes"
            )
        return await call_next(request)

    for module in (health, metrics, info, exports, sessions, snapshots, admin):
        app.include_router(module.router)
    return app
