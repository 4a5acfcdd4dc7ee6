"""The one error shape: {"error": {"code": "snake_case", "message": "human text"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagewire.core import errors as domain


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# value-range failures are bounds (422); everything else about a body is malformed (400)
BOUNDS_TYPES = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_long",
    "too_short",
    "string_too_long",
    "string_too_short",
}


# the session source is a tagged union: pydantic puts the tag in the error location
# (source.path.peer); the user wrote source.peer
SOURCE_TAGS = {"path", "peer", "node"}
# errors raised with PydanticCustomError(code, ...) whose type is already the API code
CUSTOM_CODES = {"invalid_path", "invalid_source"}
HTTP_CODES = {
    400: "malformed_body",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def field_name(loc: tuple[Any, ...]) -> str:
    """The field as the user wrote it: no "body" prefix, no union tags."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "source" and parts[i + 1] in SOURCE_TAGS and i + 2 < len(parts):
            del parts[i + 1]
    return ".".join(str(p) for p in parts)


def _describe(errors: list[Any]) -> tuple[int, str, str]:
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    where = field_name(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "extra field not permitted"
    text = f"{where}: {msg}" if where else msg
    if kind == "json_invalid":
        return 400, "malformed_json", f"the body is not valid JSON: {first.get('msg', '')}"
    if kind in BOUNDS_TYPES:
        return 422, "out_of_bounds", text
    if first.get("loc") == ("body",) and kind in ("model_attributes_type", "dict_type", "missing"):
        return (
            400,
            "malformed_body",
            "the body must be a JSON object (Content-Type: application/json)",
        )
    if kind == "extra_forbidden":
        return 400, "unknown_field", text
    if kind in CUSTOM_CODES:
        return 400, kind, text
    return 400, "invalid_request", text


# the one place a domain error becomes an HTTP status
STATUS_OF: list[tuple[type[domain.PagewireError], int]] = [
    (domain.InvalidRequest, 400),
    (domain.Forbidden, 403),
    (domain.NotFound, 404),
    (domain.Conflict, 409),
    (domain.LimitReached, 429),
    (domain.PeerUnavailable, 502),
    (domain.Unavailable, 503),
]


def status_of(exc: domain.PagewireError) -> int:
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(domain.PagewireError)
    async def _domain_error(_: Request, exc: domain.PagewireError) -> JSONResponse:
        return error_response(status_of(exc), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _describe(list(exc.errors()))
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's 400 is a body it could not parse (e.g. JSON nested too deeply)
        code = HTTP_CODES.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error"
        )
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
