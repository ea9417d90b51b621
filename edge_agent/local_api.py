"""The local inference API for apps on the device: Open Inference Protocol v2 over HTTP on localhost and a unix socket.

Theory of operation: one request handler (stdlib `http.server`, no web framework on a Pi) serves both listeners: a
`ThreadingHTTPServer` on `http_host:http_port` (port 0 binds an ephemeral port) and a threading `UnixStreamServer`
on `unix_socket`. The bound address is written crash-safe to `{data_dir}/api.json`, so apps and tests find it. Each
listener runs `serve_forever` in a daemon thread; `stop()` shuts both down, ends the unix socket's open connections
and removes the socket file. The unix socket also carries the SDK's framed protocol (edge_agent/sdk_server.py): its
server peeks at each connection's first byte, 0x89 (the frames' magic) or an HTTP request line.

Every inference goes to `serving.infer_arrays(name, inputs, *, version, outputs, deadline_ms, tier)`: the offload
router when one is given (`LocalApi(..., router=...)`), else `LocalServing` over the service. `deadline_ms` and
`tier` come from the OIP request's `parameters`.

Routes (KServe v2 / OIP):
    GET  /v2/health/live             200 {"live": true}
    GET  /v2/health/ready            200 {"ready": true} when a model serves, else 503
    GET  /v2                         server metadata
    GET  /v2/models/{name}           model metadata (inputs, outputs, versions)
    GET  /v2/models/{name}/ready     200 or 503
    POST /v2/models/{name}[/versions/{v}]/infer   InferRequest -> InferResponse; `parameters` carries provenance:
                                     where, reason, model_version, variant, latency_ms, energy_mj, energy_source,
                                     escalated. JSON bodies as before (checked against the local model, with the
                                     same messages), or the binary tensor extension: `Inference-Header-Content-Length`
                                     (edgefleet.common.oip_codec), binary outputs as the request asks
    GET  /v1/telemetry               open windows and outbox size (for people debugging a device)
    GET  /metrics                    Prometheus text: requests, inferences, busy seconds and joules per model
                                     version since start, outbox gauges and counted losses (edge_agent/metrics_text.py)
Errors are JSON {"error": "..."}: 400 bad request, 404 unknown model or route, 411/413 for a missing or too large
body, 408 for a body that did not arrive in time, 503 no model active, 500 the runtime failed. Any plain HTTP client
that speaks OIP JSON works.

Limits: a body over `api.max_body_mb` (a binary one: 4 x that, `max_binary_bytes`) is refused by its Content-Length
before it is read. Each request must arrive
whole (line, headers, body) within `api.read_timeout_s` of the server starting to wait for it (`_DeadlineReader`);
past it a body is answered 408 and anything else is closed, so no client holds a thread for longer, and an idle
keep-alive connection is closed after that long too.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.common import oip_codec
from edgefleet.common.fsutil import atomic_write_json
from edgefleet.common.oip_frames import MAGIC, TIERS, DeadlineReader
from edgefleet.edge_agent.errors import AgentError, EdgefleetError, InferenceError
from edgefleet.edge_agent.inference import InferenceService, LocalServing, numpy_to_tensor, request_to_numpy
from edgefleet.edge_agent.metrics_text import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edgefleet.edge_agent.metrics_text import render as render_metrics
from edgefleet.edge_agent.sdk_server import FrameHandler, status_of
from edgefleet.protos.oip import InferRequest, InferResponse

log = logging.getLogger(__name__)
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?$")
SERVER_NAME = "edgefleet-agent"


_DeadlineReader = DeadlineReader  # moved to common/oip_frames.py: the SDK's frames use it too


class _Handler(BaseHTTPRequestHandler):
    server_version = SERVER_NAME
    protocol_version = "HTTP/1.1"  # keep-alive: an app that infers in a loop reuses its connection
    api: LocalApi  # set on the subclass made per LocalApi

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain makefile() reader: replaced, and closed so the socket can close
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # api.read_timeout_s for each request, from the moment the server waits for its first line. A timeout while
        # reading the line or the headers closes the connection (BaseHTTPRequestHandler); in the body it is a 408.
        self._reader.deadline = time.monotonic() + self.api.read_timeout_s
        super().handle_one_request()

    # Unix-socket peers have no (host, port); the base class would index into ''.
    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("local api %s: " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any] | bytes, header_length: int | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.settimeout(self.api.read_timeout_s)  # each write: a client that stops reading is dropped
        self.send_response(status)
        if header_length is None:
            self.send_header("Content-Type", "application/json")
        else:  # the binary extension: JSON header, then raw tensors
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header(oip_codec.HEADER_LENGTH, str(header_length))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, data: bytes) -> None:
        self.connection.settimeout(self.api.read_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _read_body(self, limit: int, key: str) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return None
        if length < 0 or length > limit:
            self.close_connection = True  # the unread body would be parsed as the next request
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds the {limit}-byte limit "
                        f"({key}); send fewer rows per request")
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT,
                        f"the {length}-byte body did not arrive within {self.api.read_timeout_s:g} s "
                        "(api.read_timeout_s); send the whole body its Content-Length announces")
            return None
        if len(body) < length:  # the client closed its side early
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of its {length} bytes")
            return None
        return body

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        service = self.api.service
        if path == "/v2/health/live":
            return self._send(200, {"live": True})
        if path == "/v2/health/ready":
            ready = service.ready
            return self._send(200 if ready else 503, {"ready": ready} if ready else
                              {"ready": False, "error": "no model is active yet"})
        if path == "/v2":
            return self._send(200, {"name": SERVER_NAME, "version": "1", "extensions": [],
                                    "models": service.models()})
        if path == "/metrics" and self.api.telemetry is not None:
            return self._send_text(200, render_metrics(self.api.telemetry, self.api.telemetry.device_id))
        if path == "/v1/telemetry" and self.api.telemetry is not None:
            t = self.api.telemetry
            return self._send(200, {"open_windows": t.open_windows(), "outbox_batches": len(t.outbox),
                                    "outbox_bytes": t.outbox.size_bytes(), "dropped_total": t.outbox.dropped_total})
        match = _MODEL_ROUTE.match(path)
        if match and match.group(3) != "/infer":
            name, version, tail = match.groups()
            try:
                meta = service.metadata(name)
            except InferenceError as exc:
                return self._map_error(exc)
            if version is not None and version not in meta.versions:
                return self._error(404, f"model {name!r} version {version} is not active")
            if tail == "/ready":
                return self._send(200, {"name": name, "ready": True})
            return self._send(200, meta.model_dump(mode="json", exclude_none=True))
        return self._error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        match = _MODEL_ROUTE.match(path)
        if not match or match.group(3) != "/infer":
            self.close_connection = True
            return self._error(404, f"no route POST {path}")
        name, version, _ = match.groups()
        raw_length = self.headers.get(oip_codec.HEADER_LENGTH)
        if raw_length is not None:
            return self._infer_binary(name, version, raw_length)
        body = self._read_body(self.api.max_body_bytes, "api.max_body_mb")
        if body is None:
            return
        try:
            request = InferRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            return self._error(400, f"not an OIP inference request: {where}: {first.get('msg')}")
        try:
            inputs = self._json_inputs(name, request, body)
            wanted = [o.name for o in request.outputs] if request.outputs else None
            outputs, params = self.api.serving.infer_arrays(name, inputs, version=version, outputs=wanted,
                                                            **_routing(request.parameters))
            model_version = None if params.get("model_version") is None else str(params["model_version"])
            binary = _binary_outputs(request)
            if binary:
                data, header_length = oip_codec.encode_response(name, model_version, outputs, id=request.id,
                                                                parameters=params, binary=binary)
                return self._send(200, data, header_length)
            response = InferResponse(model_name=name, model_version=model_version, id=request.id,
                                     outputs=[numpy_to_tensor(k, v) for k, v in outputs.items()], parameters=params)
        except oip_codec.OipError as exc:
            return self._error(exc.status, str(exc))
        except EdgefleetError as exc:
            return self._map_error(exc)
        except Exception as exc:
            log.exception("inference on %s failed", name)
            return self._error(500, f"internal error: {type(exc).__name__}")
        self._send(200, response.model_dump_json(exclude_none=True).encode())

    def _json_inputs(self, name: str, request: InferRequest, body: bytes) -> dict[str, Any]:
        """A JSON request's tensors, checked against the local model's inputs (the messages JSON clients have
        always had); a model not on this device, when a router may send it to the cloud, is decoded unchecked."""
        try:
            specs = self.api.service.get(name).runtime.inputs
        except InferenceError:
            if self.api.router is None:
                raise
            return oip_codec.decode_request(body, None).inputs
        return request_to_numpy(request, specs)

    def _infer_binary(self, name: str, version: str | None, raw_length: str) -> None:
        """The binary tensor data extension: a JSON header of `raw_length` bytes, then raw tensors."""
        try:
            header_length = int(raw_length)
        except ValueError:
            self.close_connection = True
            return self._error(400, f"{oip_codec.HEADER_LENGTH} must be an integer, got {raw_length[:40]!r}")
        body = self._read_body(self.api.max_binary_bytes, "the binary body limit, 4 x api.max_body_mb")
        if body is None:
            return
        try:
            request = oip_codec.decode_request(body, header_length)
            outputs, params = self.api.serving.infer_arrays(name, request.inputs, version=version,
                                                            outputs=request.outputs, **_routing(request.parameters))
            model_version = None if params.get("model_version") is None else str(params["model_version"])
            data, length = oip_codec.encode_response(name, model_version, outputs, id=request.id, parameters=params,
                                                     binary=request.binary_outputs)
        except oip_codec.OipError as exc:
            return self._error(exc.status, str(exc))
        except EdgefleetError as exc:
            return self._map_error(exc)
        except Exception as exc:
            log.exception("inference on %s failed", name)
            return self._error(500, f"internal error: {type(exc).__name__}")
        self._send(200, data, length)

    def _map_error(self, exc: EdgefleetError) -> None:
        status, reason = status_of(exc)
        return self._error(status, str(exc) if status != 500 else f"{reason}: {exc}")


def _routing(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The router's deadline_ms and tier from OIP request parameters; OipError(400) for values it cannot use."""
    params = parameters or {}
    deadline_ms = params.get("deadline_ms")
    if deadline_ms is not None and (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float))
                                    or not 0 < deadline_ms < float("inf")):
        raise oip_codec.OipError(f"parameters.deadline_ms must be a positive number of milliseconds, "
                                 f"got {deadline_ms!r}")
    tier = params.get("tier", "realtime")
    if tier not in TIERS:
        raise oip_codec.OipError(f"parameters.tier must be one of {', '.join(TIERS)}, got {tier!r}")
    return {"deadline_ms": deadline_ms, "tier": tier}


def _binary_outputs(request: InferRequest) -> set[str] | bool:
    """What a JSON request asked to get back binary (tritonclient can send JSON inputs and want binary outputs)."""
    if (request.parameters or {}).get("binary_data_output"):
        return True
    return {o.name for o in request.outputs or () if (o.parameters or {}).get("binary_data")}


def _bind_failure(where: str, key: str, exc: OSError, *, other: str | None = None) -> str:
    why = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot serve the local API on {where}: the address is already in use (another agent, or another "
                f"program, holds it); stop it or change {key}")
    return f"cannot serve the local API on {where}: {why}; change {other or key}"


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """HTTP and the SDK's frames on one socket: the first byte of a connection says which (sdk_server.py)."""

    daemon_threads = True
    allow_reuse_address = False
    api: LocalApi

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread (ThreadingMixIn), so a silent client holds only itself, and only until
        # api.read_timeout_s. One peek per connection: the SDK's connections persist.
        request.settimeout(self.api.read_timeout_s)
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        with self.lock:
            self.connections.add(request)
        try:
            if first == MAGIC[:1]:
                FrameHandler(request, client_address, self)
            else:
                self.RequestHandlerClass(request, client_address, self)
        finally:
            with self.lock:
                self.connections.discard(request)

    def close_connections(self) -> None:
        """End every open connection (stop(): an SDK connection persists, it must not outlive the API)."""
        with self.lock:
            open_now = list(self.connections)
        for request in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LocalApi:
    def __init__(self, service: InferenceService, *, http_host: str = "127.0.0.1", http_port: int = 0,
                 unix_socket: str | Path | None = None, api_json: str | Path | None = None,
                 max_body_bytes: int = 16 * 1024 * 1024, read_timeout_s: float = 10.0, telemetry=None,
                 router=None, max_binary_bytes: int | None = None) -> None:
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s!r}")
        self.read_timeout_s = read_timeout_s
        self.service = service
        # Every inference goes through `serving` (the offload router's infer_arrays shape): the router when given,
        # else the service alone.
        self.router = router
        self.serving = router if router is not None else LocalServing(service)
        self.telemetry = telemetry
        self.http_host = http_host
        self.http_port = http_port
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self.api_json = Path(api_json) if api_json else None
        self.max_body_bytes = max_body_bytes
        # Binary bodies (the extension, the SDK's frames): 4 x the JSON limit, the same peak memory. A JSON number
        # parses into a Python float and a list slot (~32 bytes for ~8 of text); raw tensors are used in place.
        # 16 MB JSON -> 64 MB binary: thirteen 640x640x3 float images (4.9 MB each) in one request.
        self.max_binary_bytes = max_binary_bytes if max_binary_bytes is not None else 4 * max_body_bytes
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.handler = type("Handler", (_Handler,), {"api": self})
        # Headers and body leave in two writes; with Nagle on, the client's delayed ACK adds 40 ms to every
        # keep-alive request (measured: 44 ms per request, 0.3 ms without). TCP only: a unix socket has no Nagle.
        self.tcp_handler = type("TcpHandler", (self.handler,), {"disable_nagle_algorithm": True})

    @classmethod
    def from_config(cls, config, service: InferenceService, telemetry=None, router=None) -> LocalApi:
        return cls(service, http_host=config.api.http_host, http_port=config.api.http_port,
                   unix_socket=config.api.unix_socket or None, api_json=config.api_json_path,
                   max_body_bytes=int(config.api.max_body_mb * 1024 * 1024),
                   read_timeout_s=config.api.read_timeout_s, telemetry=telemetry, router=router)

    @property
    def address(self) -> tuple[str, int]:
        server = self._servers[0]
        host, port = server.server_address[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> LocalApi:
        """Bind both listeners and serve; a bind that fails is one `AgentError` naming the address and config key."""
        try:
            http = ThreadingHTTPServer((self.http_host, self.http_port), self.tcp_handler)
        except OSError as exc:
            raise AgentError(_bind_failure(f"{self.http_host}:{self.http_port}",
                                           "api.http_port in the config (0: any free port)", exc,
                                           other="api.http_host or api.http_port in the config")) from None
        http.daemon_threads = True
        self._servers.append(http)
        if self.unix_socket is not None:
            self.unix_socket.parent.mkdir(parents=True, exist_ok=True)
            if self.unix_socket.exists() or self.unix_socket.is_symlink():
                if not stat.S_ISSOCK(self.unix_socket.lstat().st_mode):
                    http.server_close()
                    raise AgentError(f"{self.unix_socket} exists and is not a socket; remove it or change "
                                     "api.unix_socket")
                self.unix_socket.unlink()  # stale socket from a previous run
            try:
                unix = _UnixServer(str(self.unix_socket), self.handler)
            except OSError as exc:
                http.server_close()
                raise AgentError(_bind_failure(str(self.unix_socket), "api.unix_socket in the config", exc)) from None
            unix.api = self
            os.chmod(self.unix_socket, 0o660)  # the agent's group: apps join it to infer
            self._servers.append(unix)
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"local-api-{type(server).__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.api_json is not None:
            host, port = self.address
            atomic_write_json(self.api_json, {"http_host": host, "http_port": port, "url": self.url,
                                              "unix_socket": str(self.unix_socket) if self.unix_socket else None,
                                              "pid": os.getpid()})
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
            if isinstance(server, _UnixServer):
                server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> LocalApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
