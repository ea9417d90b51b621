"""The three places errors become responses, all as `protos.api.ErrorBody` JSON (see `app.py`).

    CloudError              -> its status_code and code, its message (written for a person to act on)
    RequestValidationError  -> 422 "invalid", naming the first wrong field (body.labels.site, query.name, ...)
    anything else           -> 500 "internal", logged with its stack; the client never sees the trace

Starlette's own 404/405 (unknown path, wrong method) take the same shape, so a client parses one error format; its
400 for a body it cannot parse at all (not UTF-8, a broken form) is a 422 "invalid" like any other bad input.
An HTTPException that carries a CloudError (`limits.Refused`, raised from inside FastAPI's body parsing, which lets
only HTTPExceptions through) is answered as that CloudError, with the exception's headers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.cloud.errors import CloudError
from edgefleet.protos.api import ErrorBody

log = logging.getLogger("edgefleet.cloud.api")

# What each error status means, described once for the OpenAPI schema: every route documents ERROR_RESPONSES (the
# app's default), and names the others it can answer with `responses=error_responses(404, ...)`.
_ERROR_DESCRIPTIONS = {
    401: "Missing or unknown token",
    403: "Token not allowed here",
    404: "Not found: the message names what is missing",
    409: "Conflicts with the cloud's current state",
    413: "Request body over its limit: the detail names the setting",
    416: "Range not satisfiable: download from byte 0 again",
    422: "Invalid input: the message names the first wrong field",
}


def error_responses(*codes: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each an `ErrorBody`; `(code, description)` words one for a route."""
    described = [c if isinstance(c, tuple) else (c, _ERROR_DESCRIPTIONS[c]) for c in codes]
    return {code: {"model": ErrorBody, "description": what} for code, what in described}


ERROR_RESPONSES = error_responses(401, 403, 422)


def error_response(status: int, code: str, message: str, detail: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=code, message=message, detail=detail)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


async def _on_cloud_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CloudError)
    if exc.status_code >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return error_response(exc.status_code, exc.code, exc.message, exc.detail, headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc) or "request"


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = _field(first.get("loc", ()))
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', msg)}); send a JSON object"
    elif first.get("type") == "extra_forbidden":
        message = f"{where}: unknown field; remove it (check the spelling against /docs)"
    else:
        message = f"{where}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    # Field names and reasons only: echoing `input` would reflect the caller's (possibly secret) payload.
    fields = [{"field": _field(e.get("loc", ())), "reason": str(e.get("msg", ""))} for e in errors[:20]]
    return error_response(422, "invalid", message, {"fields": fields})


def _unparsable_body(request: Request, exc: StarletteHTTPException) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return (f"the request body is not valid JSON (byte {exc.__cause__.start} is not UTF-8); "
                "send a JSON object encoded as UTF-8")
    if ctype.startswith("multipart/"):
        return f"the form could not be read ({exc.detail}); send it as multipart/form-data (see /docs)"
    return f"the request body could not be read ({exc.detail}); check it against /docs"


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own errors (unknown path, wrong method) in the same shape as ours.
    assert isinstance(exc, StarletteHTTPException)
    carried = getattr(exc, "error", None)  # limits.Refused: raised from inside body parsing
    if isinstance(carried, CloudError):
        return error_response(carried.status_code, carried.code, carried.message, carried.detail,
                              headers=getattr(exc, "headers", None))
    if exc.status_code == 400:
        # A body FastAPI or Starlette could not parse at all: bytes that are not UTF-8 where JSON is declared,
        # a broken multipart form. Invalid input like any other (422), saying what was wrong with it.
        return error_response(422, "invalid", _unparsable_body(request, exc))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: f"no such endpoint: {request.url.path} (see /docs)",
               405: f"{request.method} is not allowed on {request.url.path} (see /docs)"}.get(
        exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "the cloud hit an unexpected error; the details are in its log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(CloudError, _on_cloud_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
