"""Why an export cannot be published or served: domain errors (core/errors.py), each with
its documented code. control/errors.py gives their HTTP status, peer/status.py their gRPC
status."""

from __future__ import annotations

from pagewire.core.errors import (
    Conflict,
    InvalidRequest,
    LimitReached,
    NotFound,
    PagewireError,
    Unavailable,
)

# a valid export name (ExportInvalid otherwise): the registry's check and the API's schemas
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_RULE = "1-63 of a-z 0-9 . _ -, starting with a letter or digit (no upper case)"


class ExportError(PagewireError):
    """Base of the export errors: every kind has its own documented code."""

    code = "export_error"

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class ExportNotFound(ExportError, NotFound, LookupError):
    code = "export_not_found"


class ExportExists(ExportError, Conflict):
    code = "export_exists"


class ExportLimit(ExportError, LimitReached):
    code = "too_many_exports"


class ExportInvalid(ExportError, InvalidRequest, ValueError):
    code = "export_invalid"


class ExportStale(ExportError, Conflict):
    code = "export_stale"


class ExportVerifying(ExportError, Unavailable):
    """Reloaded after a restart, its digests being computed again: retry shortly. Not
    stale (that is a conflict); callers that refuse both catch both."""

    code = "export_verifying"


class ChunkOutOfRange(ExportError, InvalidRequest, IndexError):
    code = "chunk_out_of_range"


class StateUnwritable(ExportError, Unavailable):
    """The export's record cannot be written (read-only state dir, ENOSPC)."""

    code = "state_unwritable"
