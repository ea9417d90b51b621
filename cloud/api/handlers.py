"""The three places errors become responses, all as `protos.api.ErrorBody` JSON (see `app.py`).

    CloudError              -> its status_code and code, its message (written for a person to act on)
    RequestValidationError  -> 422 "invalid", naming the first wrong field (body.labels.site, query.name, ...)
    anything else           -> 500 "internal", logged with its stack; the client never sees the trace

Starlette's own 404/405 (unknown path, wrong method) take the same shape, so a client parses one error format.
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

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in ((401, "Missing or unknown token"), (403, "Token not allowed here"), (422, "Invalid input"))
}


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


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own errors (unknown path, wrong method) in the same shape as ours.
    assert isinstance(exc, StarletteHTTPException)
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
