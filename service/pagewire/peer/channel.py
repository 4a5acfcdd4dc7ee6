"""The source side of the native data channel: exports registered with the C server and
one-session tokens handed out over gRPC (OpenChannel)."""

from __future__ import annotations

import asyncio
import os
import secrets

from pagewire import _uffd
from pagewire.exports.registry import Export, ExportInvalid, ExportStale

# a token serves one session's two connections, made when its workload attaches; this
# bounds how long an unused one lives
TOKEN_TTL_S = 900.0


class ChannelServer:
    def __init__(self, host: str, port: int = 0) -> None:
        self.server = _uffd.DataServer(host, port)
        self.ids: dict[tuple[str, str], int] = {}

    @property
    def port(self) -> int:
        return self.server.port

    def _register(self, export: Export) -> int:
        key = (export.name, export.generation)
        if key in self.ids:
            return self.ids[key]
        fd = os.open(export.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            ident = export.identity
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
                ident.dev,
                ident.ino,
                ident.size,
                ident.mtime_ns,
            ):
                export.mark_stale()
                raise ExportStale(f"export {export.name!r} is stale: its file changed")
            export_id = len(self.ids)
            self.server.add_export(
                export_id, fd, export.size, export.page_size, export.chunk_size, export.zero_map
            )
        finally:
            os.close(fd)
        self.ids[key] = export_id
        return export_id

    def grant(self, export: Export) -> tuple[int, bytes]:
        if export.path.startswith("pid:"):
            raise ExportInvalid("a live process export is served over gRPC only")
        export.check()
        export_id = self._register(export)
        token = secrets.token_bytes(16)
        self.server.grant(token, export_id)
        asyncio.get_running_loop().call_later(TOKEN_TTL_S, self.server.revoke, token)
        return self.port, token

    def withdraw(self, name: str) -> None:
        for (export_name, _), export_id in list(self.ids.items()):
            if export_name == name:
                self.server.remove_export(export_id)

    def bytes_sent(self) -> int:
        return self.server.stats()["bytes_sent"]

    def close(self) -> None:
        self.server.close()
