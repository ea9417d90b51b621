"""A client for any Open Inference Protocol (KServe v2) REST server: the cloud's /v2, Triton, KServe, MLServer.

Theory: offload sits on the request path, so the client is the cheapest correct one: stdlib `http.client`, one
keep-alive connection per thread (a connection serves one request at a time; `threading.local` keeps the router's
threads from queueing on each other and from locking), TCP_NODELAY (headers and body leave in one write anyway),
and the binary tensor data extension by default (`Inference-Header-Content-Length`, raw little-endian tensors: no
JSON number formatting either way), JSON as an option for servers without it. The body codec is the shared one
(common/oip_codec.py), so the agent, the cloud and the SDK speak byte-identical bodies.

Timeouts: `connect_timeout_s` bounds the TCP (and TLS) handshake, `timeout_s` every read after it. A connection
that the server closed while idle (keep-alive timeouts differ: uvicorn 5 s, Triton's own) fails on its first use;
that request is sent once more on a fresh connection, never more, and never after the server answered anything.

Errors are wrapped where they enter (edge_agent/errors.py): no answer, a refused connection, a timeout, a 5xx, a
429, a refused token (401/403) or a body that is not OIP -> `CloudUnavailable` (the router's breaker counts it and
local serves); 404 -> `ModelNotFound`; any other 4xx -> `InferenceError`; each with the server's own message.

Servers without the binary extension: MLServer 1.7 answers a binary body 500 (its error handler fails on the raw
bytes) or 422 `json_invalid` (SeldonIO/MLServer#324). The first binary request that gets either is sent once more as
JSON; when JSON is answered, this client stays on JSON (`binary` turns False, logged once), so such a server is a
slower target, not a dead one that opens the breaker.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from edgefleet.common.oip_codec import HEADER_LENGTH, DecodedResponse, OipError, decode_response, encode_request
from edgefleet.edge_agent.errors import CloudUnavailable, InferenceError, ModelNotFound

log = logging.getLogger(__name__)
# 256 MiB: far above any response a model the fleet ships returns; a server that claims more is broken.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_RETRYABLE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def _server_message(body: bytes) -> str:
    """The error text an OIP server sent: {"error": ...} (KServe, Triton, MLServer), {"detail": ...} (FastAPI)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace").strip() or "no message"
    if isinstance(doc, dict):
        for key in ("error", "detail", "message"):
            if doc.get(key):
                return str(doc[key])[:1000]
    return str(doc)[:300]


class OffloadClient:
    def __init__(self, url: str, *, token: str = "", connect_timeout_s: float = 0.5, timeout_s: float = 2.0,
                 binary: bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"offload url must be http://host[:port][/prefix] or https://..., got {url!r}")
        if connect_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got connect {connect_timeout_s}, read {timeout_s}")
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.binary = binary
        self._binary_proven = False  # a binary request was answered: a later 500 is the server's, not the format's
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []  # every thread's connection, for close()
        self._all_lock = threading.Lock()

    def set_token(self, token: str) -> None:
        self.token = token

    # -- the connection -----------------------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout_s, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout_s)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.timeout_s)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.conn = conn
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._all_lock:
                if conn in self._all:
                    self._all.remove(conn)

    def close(self) -> None:
        """Close every thread's connection; the next request opens a new one."""
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    def _fail(self, what: str, exc: BaseException) -> CloudUnavailable:
        if isinstance(exc, TimeoutError):
            return CloudUnavailable(f"the offload server {self.url} did not answer {what} within "
                                    f"{self.timeout_s * 1000:g} ms (offload.timeout_ms); local inference serves")
        if isinstance(exc, ConnectionRefusedError):
            return CloudUnavailable(f"the offload server {self.url} refused the connection ({what}): is it "
                                    "running, and is offload.url right?")
        return CloudUnavailable(f"the offload server {self.url} is unreachable ({what}): "
                                f"{type(exc).__name__}: {exc}")

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        what = f"{method} {path}"
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._connect()
                conn.request(method, self.prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                length = response.getheader("Content-Length")
                if length is not None and int(length) > MAX_RESPONSE_BYTES:
                    self._drop()
                    raise CloudUnavailable(f"the offload server {self.url} answered {what} with {length} bytes, "
                                           f"over the {MAX_RESPONSE_BYTES}-byte limit")
                data = response.read()
                if response.will_close:
                    self._drop()
                return response.status, response, data
            except _RETRYABLE as exc:
                self._drop()
                if not reused or attempt:  # a fresh connection that fails is the server's answer
                    raise self._fail(what, exc) from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._drop()
                raise self._fail(what, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- OIP ----------------------------------------------------------------------------------------------------------

    def _model_path(self, model: str, version: str | None) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path + f"/versions/{quote(str(version), safe='')}" if version is not None else path

    def _check(self, status: int, data: bytes, what: str) -> None:
        if status < 300:
            return
        message = _server_message(data)
        if status == 404:
            raise ModelNotFound(f"the offload server {self.url} has no {what}: {message}")
        if status in (401, 403):
            raise CloudUnavailable(f"the offload server {self.url} refused this device's token ({status}): "
                                   f"{message}; check offload.token, or enroll the device again")
        if 400 <= status < 500 and status != 429:
            raise InferenceError(f"the offload server refused the request for {what} ({status}): {message}")
        raise CloudUnavailable(f"the offload server {self.url} failed on {what} ({status}): {message}")

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
              outputs: list[str] | None = None, request_id: str | None = None,
              parameters: dict[str, Any] | None = None) -> DecodedResponse:
        """One inference on the server; its outputs as numpy arrays and its `parameters` (provenance)."""
        binary = self.binary
        what = f"model {model!r}" + (f" version {version}" if version is not None else "")
        status, response, data = self._post(model, version, inputs, outputs, request_id, parameters, binary)
        if binary and not self._binary_proven and (status == 500 or (status == 422 and b"json" in data.lower())):
            # Maybe a server without the binary extension (see the module docstring): JSON once.
            status, response, data = self._post(model, version, inputs, outputs, request_id, parameters, False)
            if status < 300:
                self.binary = False
                log.warning("the offload server %s refused a binary-extension body and answered JSON: sending JSON "
                            "from now on (set offload.binary = false to say so)", self.url)
        elif binary and status < 300:
            self._binary_proven = True
        self._check(status, data, what)
        raw_length = response.getheader(HEADER_LENGTH)
        try:
            return decode_response(data, int(raw_length) if raw_length is not None else None)
        except (OipError, ValueError) as exc:
            raise CloudUnavailable(f"the offload server {self.url} sent an answer for {what} that is not an OIP "
                                   f"inference response: {exc}") from None

    def _post(self, model: str, version: str | None, inputs: dict[str, np.ndarray], outputs: list[str] | None,
              request_id: str | None, parameters: dict[str, Any] | None,
              binary: bool) -> tuple[int, http.client.HTTPResponse, bytes]:
        try:
            body, header_length = encode_request(inputs, outputs=outputs, binary=binary, binary_outputs=binary,
                                                 id=request_id, parameters=parameters)
        except OipError as exc:
            raise InferenceError(str(exc)) from None
        if header_length is None:
            headers = {"Content-Type": "application/json"}
        else:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        return self._request("POST", self._model_path(model, version) + "/infer", body, headers)

    def live(self) -> bool:
        status, _, _ = self._request("GET", "/v2/health/live")
        return status == 200

    def ready(self, model: str, version: str | None = None) -> bool:
        status, _, _ = self._request("GET", self._model_path(model, version) + "/ready")
        return status == 200

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        status, _, data = self._request("GET", self._model_path(model, version))
        self._check(status, data, f"model {model!r}")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CloudUnavailable(f"the offload server {self.url} sent model metadata that is not JSON: "
                                   f"{exc}") from None
        return doc if isinstance(doc, dict) else {}


__all__ = ["MAX_RESPONSE_BYTES", "OffloadClient"]
