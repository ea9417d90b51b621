"""Request limits at the HTTP edge: who is calling is settled before a byte of the body is read, then the body is
read under a cap.

Theory: FastAPI reads a route's body (JSON or a form) before it resolves the route's dependencies, so a token check
that is only a dependency ran after the whole body was in memory (measured before this module: a 200 MB body
without a token got its 401 after 1.4 s, and three at once took the cloud from 130 MB to 1.45 GB). `RequestLimits`
is an ASGI middleware that hands the app a guarded `receive` for every request that carries a body. The first time
anything asks for body bytes (FastAPI's body parsing, a form parser, a route streaming its raw body) the router has
already chosen the route (`scope["route"]`), and the guard, before it reads anything:

1. resolves the bearer token (`Fleet.authenticate`, in a worker thread) when the route depends on `deps.principal`,
   and applies the route's role checks (`deps.admin`, `deps.enrollment`, `deps.device_or_admin`, found among its
   dependencies); the principal is kept in the request state, where `deps.principal` picks it up;
2. refuses a declared Content-Length over the route's cap;
3. then counts the body as it passes and refuses it at the cap, chunked bodies too.

A refusal raises `Refused`, an HTTPException because FastAPI's body parsing passes only those on unchanged (it turns
anything else into a 400); `handlers` answers it as the `CloudError` it carries (401, 403 or 413 `ErrorBody`) with
`Connection: close`, so uvicorn closes the connection instead of reading the unread rest and throwing it away. Any
other answer sent before the whole body came in (a 401 from a route that checks the token before it streams its
body, a 404) says `Connection: close` too. Except where the rest of the body is declared and small
(`DRAIN_MAX_BYTES`): closing with unread bytes on the way makes the kernel answer them with a reset, which can take
the answer with it (RFC 9112 9.6; the fuzzing in tests/cloud/test_api_fuzz.py lost a 401 so), so uvicorn reads that
rest and throws it away, and the connection stays open. Requests without a body are not touched.

Caps (`body_limit`): a JSON body (or a route that takes none) `max_json_body_kb`; a form (the distillation upload)
`max_model_mb + 2 x max_transfer_mb` (the transfer set and an optional test set) plus 1 MiB of framing; a route that
reads its raw body itself names the setting that caps it with `openapi_extra={"x-body-limit": "max_model_mb"}`
(model upload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import params
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.cloud.api.deps import admin, bearer_token, device_or_admin, enrollment, principal
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.cloud.auth import Principal
from edgefleet.cloud.errors import CloudError, Invalid, TooLarge

if TYPE_CHECKING:
    from fastapi import FastAPI

    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

# 1 MiB: the multipart framing and the spec JSON around the distillation's two files.
FORM_SLACK_BYTES = 1024 * 1024
BODY_LIMIT_KEY = "x-body-limit"  # openapi_extra key of a route that reads its raw body itself
# 64 KiB: one default loopback socket buffer; draining that much costs less than a reset that loses the answer.
DRAIN_MAX_BYTES = 64 * 1024
_ROLE_CHECKS = (admin, enrollment, device_or_admin)


@dataclass(frozen=True)
class BodyLimit:
    bytes: int
    setting: str  # the setting(s) to raise, named in the refusal
    shown: str  # the cap as a person reads it
    what: str  # what is too large
    advice: str

    def too_large(self, got: str) -> TooLarge:
        return TooLarge(f"{self.what} is larger than the {self.setting} limit of {self.shown} ({got}); {self.advice}",
                        detail={"limit_bytes": self.bytes, "setting": self.setting})


def body_limit(route: APIRoute | None, settings: Settings) -> BodyLimit:
    """The most bytes `route` reads from a request body, and the setting that says so."""
    declared = (route.openapi_extra or {}).get(BODY_LIMIT_KEY) if route is not None else None
    if declared == "max_model_mb":
        return BodyLimit(settings.max_model_bytes, "max_model_mb", f"{settings.max_model_mb:g} MB", "the model",
                         "make it smaller (quantize, prune, distill) or raise max_model_mb in the cloud's settings")
    if declared is not None:
        raise ValueError(f"route {route.path if route else '?'}: unknown {BODY_LIMIT_KEY} {declared!r}")
    if route is not None and route.body_field is not None and isinstance(route.body_field.field_info, params.Form):
        # The transfer set and, optionally, a test set: each held to max_transfer_mb on its own.
        total = settings.max_model_bytes + 2 * settings.max_transfer_bytes + FORM_SLACK_BYTES
        return BodyLimit(total, "max_model_mb + 2 x max_transfer_mb",
                         f"{settings.max_model_mb:g} + 2 x {settings.max_transfer_mb:g} MB (transfer and test sets; "
                         "+1 MiB of form framing)",
                         "the upload", "send smaller files or raise the limits in the cloud's settings")
    return BodyLimit(settings.max_json_body_bytes, "max_json_body_kb", f"{settings.max_json_body_kb} KiB",
                     "the request body", "no JSON body the API takes is this large; check what is being sent")


def document_refusals(openapi: dict[str, Any]) -> dict[str, Any]:
    """The guard's 413 in the OpenAPI schema of every operation that takes a body (its 401 and 403 are the app's
    default responses); an operation's own 413, worded for it, stays. `ErrorBody` is in the schema's components
    already: every operation documents it."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    description = error_responses(413)[413]["description"]
    for operation in (op for item in openapi.get("paths", {}).values() for op in item.values()):
        if isinstance(operation, dict) and "requestBody" in operation:
            operation.setdefault("responses", {}).setdefault(
                "413", {"description": description, "content": {"application/json": {"schema": ref}}})
    return openapi


class Refused(StarletteHTTPException):
    """A request refused by the guard, carrying its `CloudError`; answered by `handlers`, with Connection: close
    unless the rest of the body is small enough to drain (`close=False`)."""

    def __init__(self, error: CloudError, *, close: bool = True) -> None:
        headers = {"Connection": "close"} if close else {}
        if error.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        super().__init__(error.status_code, error.message, headers=headers)
        self.error = error


@dataclass(frozen=True)
class _Policy:
    needs_token: bool
    roles: tuple[Callable[..., Any], ...]


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def _policy(route: APIRoute) -> _Policy:
    calls = list(_calls(route.dependant))
    return _Policy(needs_token=principal in calls, roles=tuple(c for c in _ROLE_CHECKS if c in calls))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != "0")


class RequestLimits:
    """The middleware (see the module docstring); `api` is the app, whose state holds the `Fleet`."""

    def __init__(self, app: ASGIApp, *, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._policies: dict[int, _Policy] = {}  # by id(route): routes compare by path, so they are not hashable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        guarded = _GuardedReceive(self, scope, receive)

        async def send_closing(message: Message) -> None:
            # An answer before the whole body came in (a refusal, or a route that never reads it) closes the
            # connection: uvicorn would otherwise read the rest of the body only to throw it away. A small declared
            # rest is drained instead (see the module docstring).
            if message["type"] == "http.response.start" and not guarded.finished and not guarded.drainable():
                headers = list(message.get("headers", []))
                if not any(key.lower() == b"connection" for key, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, guarded, send_closing)

    def policy(self, route: APIRoute) -> _Policy:
        known = self._policies.get(id(route))
        if known is None:
            known = self._policies[id(route)] = _policy(route)
        return known


class _GuardedReceive:
    def __init__(self, limits: RequestLimits, scope: Scope, receive: Receive) -> None:
        self.limits = limits
        self.scope = scope
        self.receive = receive
        self.limit: BodyLimit | None = None  # set by the check before the first read
        self.seen = 0
        self.finished = False  # the last body message came in

    def drainable(self) -> bool:
        """The rest of the body is declared (Content-Length, not chunked) and at most DRAIN_MAX_BYTES."""
        declared = _header(self.scope, b"content-length")
        if declared is None or not declared.strip().isdigit() or _header(self.scope, b"transfer-encoding"):
            return False
        return int(declared) - self.seen <= DRAIN_MAX_BYTES

    async def __call__(self) -> Message:
        if self.limit is None:
            try:
                self.limit = await self._check()
            except CloudError as exc:
                raise Refused(exc, close=not self.drainable()) from None
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit.bytes:
                raise Refused(self.limit.too_large(f"more than {self.limit.bytes} bytes sent"))
            self.finished = not message.get("more_body", False)
        return message

    async def _check(self) -> BodyLimit:
        route = self.scope.get("route")
        route = route if isinstance(route, APIRoute) else None
        fleet: Fleet = self.limits.api.state.fleet
        if route is not None:
            policy = self.limits.policy(route)
            state = self.scope.setdefault("state", {})
            who = state.get("principal")
            if policy.needs_token and not isinstance(who, Principal):
                who = await run_in_threadpool(fleet.authenticate, bearer_token(_header(self.scope, b"authorization")))
                state["principal"] = who
            for check in policy.roles:
                check(who)
        limit = body_limit(route, fleet.settings)
        declared = _header(self.scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise Invalid(f"Content-Length {declared!r} is not a number")
            if int(declared) > limit.bytes:
                raise limit.too_large(f"Content-Length {int(declared)} bytes")
        return limit
