"""The agent's shared state: settings, sessions, exports, peer service."""

from __future__ import annotations

import time
from typing import Any

from . import __version__
from .sessions import SessionManager
from .settings import Settings


class AgentState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionManager(settings)
        self.token = settings.token()
        self.started_at = time.time()
        self.exports: Any = None
        self.peer_server: Any = None
        self.grpc_address: str = settings.advertise_grpc or settings.grpc

    async def start(self) -> None:
        self.sessions.prepare_dirs()

    async def stop(self) -> None:
        await self.sessions.shutdown()

    async def close(self) -> None:
        if self.peer_server is not None:
            await self.peer_server.stop(grace=1.0)
            self.peer_server = None

    def readiness(self) -> dict[str, bool]:
        return {
            "engine": True,
            "grpc": self.peer_server is not None,
            "accepting": not self.sessions.shutting_down,
        }

    def info(self) -> dict[str, Any]:
        from . import _uffd
        from .layout import SYSTEM_PAGE_SIZE, huge_page_sizes

        names = [n for n in dir(_uffd) if n.startswith("FEATURE_")]
        offered = [n[8:].lower() for n in names if _uffd.API_FEATURES_SUPPORTED & getattr(_uffd, n)]
        return {
            "node": self.settings.node_name,
            "version": __version__,
            "page_size": SYSTEM_PAGE_SIZE,
            "huge_page_sizes": sorted(huge_page_sizes()),
            "uffd_features": sorted(offered),
            "grpc_address": self.grpc_address,
            "tls": self.settings.tls_enabled,
            "export_roots": [str(p) for p in self.settings.export_roots],
            "sessions_active": sum(1 for s in self.sessions.sessions.values() if s.active),
            "uptime_s": round(time.time() - self.started_at, 3),
        }
