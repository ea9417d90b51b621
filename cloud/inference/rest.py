"""The Open Inference Protocol (KServe v2) REST data plane, `/v2`, as a plain ASGI app: `DataPlane`.

Theory: the data plane runs per request what the control plane runs per operator action, so it is written for
that. FastAPI's dependency injection and pydantic validation cost a few hundred microseconds a request, more than
a small model's whole inference; here one `__call__` matches the path by hand, reads the three headers it needs in
one pass, decodes the body with the shared codec (common/oip_codec.py: JSON, or the binary tensor extension when
`Inference-Header-Content-Length` is sent), calls the pool and writes the answer (binary when the request asks,
per output `binary_data` or `binary_data_output` for all). app.py hands it every `/v2` request before FastAPI's
middleware sees it; standalone.py serves it alone. Under uvicorn, install httptools and uvloop: uvicorn's pure-Python
parser (h11) costs ~200 us a request, more than all of this module's work (bench/offload_cloud.py).

Where a request runs: `ModelPool.run_us` is a non-blocking estimate of a run. A request whose token and resolution
are cached, whose model runs under `INLINE_MAX_US` and whose body is small runs on the event loop: the executor's
thread hops (~100 us measured on this 2-core box) would cost more than the run. Anything that may block (a token or
registry lookup, a first load, a batch wait, a big model or body) runs in the data plane's own thread pool, sized
so a full batch can gather.

Refusals (the OIP error body `{"error": "..."}`, every message saying what to do): 400 a bad body or tensor (naming
the model's signature), 401 no or unknown token, 403 an enrollment token, 404 an unknown model, version or path,
413 a body over `infer_max_body_mb`, judged on Content-Length before a byte is read (the connection is then
closed, so the rest is never read). Health and server metadata answer without a token (load balancers probe
them); model metadata, readiness and inference need a device or admin token (auth.py caches them for 5 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgefleet.cloud.errors import CloudError, Invalid, ModelInvalid, TooLarge, Unauthorized
from edgefleet.cloud.inference.auth import TokenCache
from edgefleet.cloud.inference.pool import InferResult, ModelPool
from edgefleet.common.oip_codec import HEADER_LENGTH, OipError, decode_request, encode_response

log = logging.getLogger(__name__)

# 300 us: runs shorter than this cost less inline than the two thread hops of an executor. Measured on the digits
# MLP (~13 us a run), binary bodies, httptools: inline answered 5.2-5.6k req/s at concurrency 16 against 4.4k through
# the executor, and ~100 us sooner at concurrency 1 (p50 193-212 us against 296-317 us, client-observed).
INLINE_MAX_US = 300.0
# 64 KiB: a body up to this may run inline (the digits model's batch of 250 rows); past it, in a thread.
INLINE_MAX_BODY_BYTES = 64 * 1024
# 64 KiB: a refused request's body up to this is read and dropped, keeping the connection; a larger one closes it
# (reading it would cost more than a new connection; closing with unread bytes can reset the answer, RFC 9112 9.6).
DRAIN_MAX_BYTES = 64 * 1024
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
_JSON = [(b"content-type", b"application/json")]
_BINARY = b"application/octet-stream"
_SERVER = {"name": "edgefleet", "version": "1", "extensions": ["binary_tensor_data"]}


class DataPlane:
    """The ASGI app. `pool` answers, `tokens` authenticates, `max_body_bytes` caps a request body."""

    def __init__(self, pool: ModelPool, tokens: TokenCache, *, max_body_bytes: int, threads: int = 64) -> None:
        self.pool = pool
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        # 64 threads: a batch of up to infer_batch_max_size requests waits in threads, plus the ones running.
        self._executor = ThreadPoolExecutor(max_workers=max(threads, 2 * pool.batch_max_size),
                                            thread_name_prefix="edgefleet-infer")
        self.ready = True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # served alone (standalone.py): nothing to start
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        try:
            status, body, headers = await self._handle(scope, receive)
        except OipError as exc:
            status, body, headers = _error(exc.status, str(exc))
        except CloudError as exc:
            status, body, headers = _cloud_error(exc)
        except Exception:  # the server keeps answering; the traceback goes to the log
            log.exception("inference request %s %s failed", scope.get("method"), scope.get("path"))
            status, body, headers = _error(500, "internal error in the inference server; the cloud's log has the "
                                                "traceback; retry, and report it if it persists")
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------------------------------------------ routing

    async def _handle(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes, list]:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        if not parts or parts[0] != "v2":
            return _error(404, f"no route {path}; the inference server serves /v2 (Open Inference Protocol)")
        parts = parts[1:]
        if parts in ([], [""]):
            _method(method, "GET")
            return _json(_SERVER)
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _method(method, "GET")
            return _json({parts[1]: True if parts[1] == "live" else self.ready},
                         200 if parts[1] == "live" or self.ready else 503)
        if parts[0] != "models" or len(parts) < 2:
            return _error(404, f"no route {path}; see /v2/models/{{name}}[/versions/{{version}}][/ready|/infer]")
        name, rest = parts[1], parts[2:]
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer")) or not name:
            return _error(404, f"no route {path}; see /v2/models/{{name}}[/versions/{{version}}][/ready|/infer]")
        action = rest[0] if rest else "metadata"
        length, header_length, authorization, encoding = _headers(scope)
        if action == "infer":
            _method(method, "POST")
            if length is not None and length > self.max_body_bytes:
                raise TooLarge(f"the request body is {length} bytes, over the server's limit of "
                               f"{self.max_body_bytes} bytes (infer_max_body_mb); send fewer rows per request")
        else:
            _method(method, "GET")
        try:
            if self.tokens.cached(authorization) is None:
                await self._in_thread(self.tokens.check, authorization)
        except CloudError:
            if length is not None and 0 < length <= DRAIN_MAX_BYTES:
                await _read(receive, DRAIN_MAX_BYTES)  # keep the connection: the body is small
            raise
        if action == "metadata":
            return _json(await self._in_thread(self.pool.metadata, name, version))
        if action == "ready":
            ready = await self._in_thread(self.pool.ready, name, version)
            if not ready:
                # Resolve again for the 404's message (a name or version that does not exist, said as such).
                await self._in_thread(self.pool.metadata, name, version)
            return _json({"name": name, "ready": ready})
        if encoding not in (None, "identity"):
            raise Invalid(f"Content-Encoding {encoding} is not supported; send the body uncompressed")
        body = await _read(receive, self.max_body_bytes)
        return await self._infer(name, version, body, header_length)

    async def _infer(self, name: str, version: str | None, body: bytes, header_length: int | None
                     ) -> tuple[int, bytes, list]:
        request = decode_request(body, header_length, max_elements=self.max_body_bytes)
        run_us = self.pool.run_us(name, version)
        # The estimate is of the requests seen so far; a body much larger than those may run much longer.
        if run_us is not None and run_us <= INLINE_MAX_US and len(body) <= INLINE_MAX_BODY_BYTES:
            result = self.pool.infer(name, version, request.inputs, request.outputs)
        else:
            result = await self._in_thread(self.pool.infer, name, version, request.inputs, request.outputs)
        return _answer(result, request.id, request.binary_outputs)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _answer(result: InferResult, request_id: str | None, binary: set[str] | bool) -> tuple[int, bytes, list]:
    body, header_length = encode_response(result.model_name, result.model_version, result.outputs, id=request_id,
                                          parameters={"variant": result.variant}, binary=binary)
    if header_length is None:
        return 200, body, list(_JSON)
    return 200, body, [(b"content-type", _BINARY), (_HEADER_LENGTH, str(header_length).encode())]


def _headers(scope: dict[str, Any]) -> tuple[int | None, int | None, str | None, str | None]:
    length = header_length = authorization = encoding = None
    for key, value in scope["headers"]:
        if key == b"content-length":
            length = _int(value, "Content-Length")
        elif key == _HEADER_LENGTH:
            header_length = _int(value, HEADER_LENGTH)
        elif key == b"authorization":
            authorization = value.decode("latin-1")
        elif key == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
    return length, header_length, authorization, encoding


def _int(value: bytes, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OipError(f"{what} must be a whole number of bytes, got {value[:40]!r}") from None


async def _read(receive: Any, limit: int) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise TooLarge(f"the request body is over the server's limit of {limit} bytes (infer_max_body_mb)")
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OipError("the client went away before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a chunked body declares no length: counted as it comes
            raise TooLarge(f"the request body is over the server's limit of {limit} bytes (infer_max_body_mb); "
                           "send fewer rows per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed(f"{method} is not allowed here; use {allowed}")


class _MethodNotAllowed(OipError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 405)


def _json(doc: Any, status: int = 200) -> tuple[int, bytes, list]:
    return status, json.dumps(doc, separators=(",", ":")).encode(), list(_JSON)


def _error(status: int, message: str) -> tuple[int, bytes, list]:
    headers = list(_JSON)
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is never read
    return status, json.dumps({"error": message}).encode(), headers


def _cloud_error(exc: CloudError) -> tuple[int, bytes, list]:
    if isinstance(exc, ModelInvalid):
        status = 500  # the stored model does not load: the server's problem, not the request's
    elif isinstance(exc, Invalid):
        status = 400  # OIP answers a bad request with 400 (the control plane's 422)
    else:
        status = exc.status_code
    status, body, headers = _error(status, exc.message)
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    return status, body, headers


__all__ = ["DataPlane", "INLINE_MAX_US"]
