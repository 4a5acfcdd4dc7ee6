"""Domain errors: what went wrong, in the domain's words. Only control/ maps them to HTTP.

Each error carries a snake_case code (the documented error code) and a message for a
human; its class says what kind of failure it is.
"""

from __future__ import annotations


class PagewireError(Exception):
    """Base of every refusal the agent explains to its caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidRequest(PagewireError):
    """The request is malformed or names something impossible."""


class Forbidden(PagewireError):
    """The caller may not do this (a path outside the export roots, a process not allowed)."""


class NotFound(PagewireError):
    """No such export, session, snapshot or file."""


class Conflict(PagewireError):
    """The name or file exists already, or the object is in the wrong state."""


class LimitReached(PagewireError):
    """A configured limit (sessions, exports, bytes in flight) is reached; retry later."""


class PeerUnavailable(PagewireError):
    """A peer agent could not be reached or refused in a way that is not the caller's fault."""


class Unavailable(PagewireError):
    """The agent cannot take this now (draining, shutting down, state dir unwritable)."""
