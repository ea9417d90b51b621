"""The local inference API for apps on the device: Open Inference Protocol v2 over HTTP on localhost and a unix socket.

Theory of operation: one request handler (stdlib `http.server`, no web framework on a Pi) serves both listeners: a
`ThreadingHTTPServer` on `http_host:http_port` (port 0 binds an ephemeral port) and a threading `UnixStreamServer`
on `unix_socket`. The bound address is written crash-safe to `{data_dir}/api.json`, so apps and tests find it. Each
listener runs `serve_forever` in a daemon thread; `stop()` shuts both down and removes the socket file.

Routes (KServe v2 / OIP):
    GET  /v2/health/live             200 {"live": true}
    GET  /v2/health/ready            200 {"ready": true} when a model serves, else 503
    GET  /v2                         server metadata
    GET  /v2/models/{name}           model metadata (inputs, outputs, versions)
    GET  /v2/models/{name}/ready     200 or 503
    POST /v2/models/{name}[/versions/{v}]/infer   InferRequest -> InferResponse; `parameters` carries provenance:
                                     where="local", model_version, latency_ms, energy_mj, energy_source
    GET  /v1/telemetry               open windows and outbox size (for people debugging a device)
    GET  /metrics                    Prometheus text: requests, inferences, busy seconds and joules per model
                                     version since start, outbox gauges and counted losses (edge_agent/metrics_text.py)
Errors are JSON {"error": "..."}: 400 bad request, 404 unknown model or route, 411/413 for a missing or too large
body, 408 for a body that did not arrive in time, 503 no model active, 500 the runtime failed. Any plain HTTP client
that speaks OIP JSON works.

Limits: a body over `api.max_body_mb` is refused by its Content-Length before it is read. Each request must arrive
whole (line, headers, body) within `api.read_timeout_s` of the server starting to wait for it (`_DeadlineReader`);
past it a body is answered 408 and anything else is closed, so no client holds a thread for longer, and an idle
keep-alive connection is closed after that long too.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
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

from edgefleet.common.fsutil import atomic_write_json
from edgefleet.edge_agent.errors import AgentError, EdgefleetError, InferenceError, ModelNotFound, ModelNotReady
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.metrics_text import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edgefleet.edge_agent.metrics_text import render as render_metrics
from edgefleet.protos.oip import InferRequest

log = logging.getLogger(__name__)
_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?$")
SERVER_NAME = "edgefleet-agent"


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as a raw stream whose every read waits at most until `deadline` (monotonic s).

    A per-read socket timeout alone lets a client that sends one byte now and then hold a thread for ever; the
    deadline bounds the whole request instead (its line, headers and body), and an idle keep-alive connection too.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the read deadline passed")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


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

    def _send(self, status: int, body: dict[str, Any] | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.settimeout(self.api.read_timeout_s)  # each write: a client that stops reading is dropped
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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

    def _read_body(self) -> bytes | None:
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
        if length < 0 or length > self.api.max_body_bytes:
            self.close_connection = True  # the unread body would be parsed as the next request
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {length} bytes exceeds the {self.api.max_body_bytes}-byte limit (api.max_body_mb)")
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
        body = self._read_body()
        if body is None:
            return
        name, version, _ = match.groups()
        try:
            request = InferRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            return self._error(400, f"not an OIP inference request: {where}: {first.get('msg')}")
        try:
            response = self.api.service.infer(name, request, version=version)
        except EdgefleetError as exc:
            return self._map_error(exc)
        except Exception as exc:
            log.exception("inference on %s failed", name)
            return self._error(500, f"internal error: {type(exc).__name__}")
        self._send(200, response.model_dump_json(exclude_none=True).encode())

    def _map_error(self, exc: EdgefleetError) -> None:
        if isinstance(exc, ModelNotFound):
            return self._error(404, str(exc))
        if isinstance(exc, ModelNotReady):
            return self._error(503, str(exc))
        if isinstance(exc, InferenceError):
            return self._error(400, str(exc))
        return self._error(500, f"{exc.reason}: {exc}")


def _bind_failure(where: str, key: str, exc: OSError, *, other: str | None = None) -> str:
    why = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot serve the local API on {where}: the address is already in use (another agent, or another "
                f"program, holds it); stop it or change {key}")
    return f"cannot serve the local API on {where}: {why}; change {other or key}"


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class LocalApi:
    def __init__(self, service: InferenceService, *, http_host: str = "127.0.0.1", http_port: int = 0,
                 unix_socket: str | Path | None = None, api_json: str | Path | None = None,
                 max_body_bytes: int = 16 * 1024 * 1024, read_timeout_s: float = 10.0, telemetry=None) -> None:
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s!r}")
        self.read_timeout_s = read_timeout_s
        self.service = service
        self.telemetry = telemetry
        self.http_host = http_host
        self.http_port = http_port
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self.api_json = Path(api_json) if api_json else None
        self.max_body_bytes = max_body_bytes
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.handler = type("Handler", (_Handler,), {"api": self})
        # Headers and body leave in two writes; with Nagle on, the client's delayed ACK adds 40 ms to every
        # keep-alive request (measured: 44 ms per request, 0.3 ms without). TCP only: a unix socket has no Nagle.
        self.tcp_handler = type("TcpHandler", (self.handler,), {"disable_nagle_algorithm": True})

    @classmethod
    def from_config(cls, config, service: InferenceService, telemetry=None) -> LocalApi:
        return cls(service, http_host=config.api.http_host, http_port=config.api.http_port,
                   unix_socket=config.api.unix_socket or None, api_json=config.api_json_path,
                   max_body_bytes=int(config.api.max_body_mb * 1024 * 1024),
                   read_timeout_s=config.api.read_timeout_s, telemetry=telemetry)

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
