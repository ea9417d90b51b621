"""`Client`: one call to infer on the device, answered by the local agent over its unix socket, with provenance.

    from edgefleet.sdk import Client
    with Client() as agent:
        result = agent.infer("digits", x, deadline_ms=20)          # x: np.ndarray, or {input name: array}
        result.outputs["probabilities"], result.provenance.where   # "local" | "cloud", and why: .reason

Theory of operation: the agent decides where each request runs (its offload router); the SDK carries the request
there as cheaply as it can and turns every failure into one typed error (sdk/errors.py). It speaks the framed
protocol of common/oip_frames.py (16-byte head, small JSON header, raw tensor bytes) on the agent's unix socket:
no HTTP parsing, no tensor turned into a Python list. Each thread that calls `infer` keeps its own connection
(`threading.local`), so calls from several threads run side by side and none waits on another's reply.

Finding the agent: `Client(socket=PATH)`, else $EDGEFLEET_AGENT_SOCKET, else the `unix_socket` the agent wrote to
`{data_dir}/api.json` (data_dir: the argument, $EDGEFLEET_DATA_DIR, or /var/lib/edgefleet), looked up again on each
new connection, so an agent restarted on another path is found. The agent closes a connection idle longer than its
api.read_timeout_s; a request that finds its reused connection closed with no byte of a reply goes once more on a
fresh one. The usual cause is that idle close, which happens only before the agent read a byte of the request;
should the agent die mid-request instead, the retry runs an inference twice, which changes nothing but its
counters.

Imports numpy and the standard library only (and common/oip_frames.py, which imports no more): an app pays for
no HTTP or validation library. `Client.standalone(...)` (sdk/embedded.py) runs the model in the app's own process.
"""

from __future__ import annotations

import io
import json
import os
import socket as _socket
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgefleet.common.oip_frames import (
    ERROR,
    HEAD,
    TIERS,
    DeadlineReader,
    FrameEOF,
    FrameError,
    decode_tensors,
    encode_request,
    read_frame,
    send_timeout,
)
from edgefleet.sdk.errors import AgentUnavailable, InvalidInput, SdkError, from_reply

SOCKET_ENV = "EDGEFLEET_AGENT_SOCKET"
DATA_DIR_ENV = "EDGEFLEET_DATA_DIR"
DEFAULT_DATA_DIR = "/var/lib/edgefleet"  # the agent's data_dir in its sample config (edge_agent/config.py)
MAX_REPLY_BYTES = 1 << 31  # a reply's tensors; the agent is trusted, this only bounds a corrupted length
_SMALL = 64 * 1024
_tuple_new = tuple.__new__  # NamedTuples built without their Python-level __new__ (hot path)


class Provenance(NamedTuple):
    """Where a request ran and what it cost. `reason`: the offload policy's word for the choice
    (edge_agent/offload_policy.py, e.g. "local_within_budget", "deadline_local_too_slow"); `energy_source`:
    "measured", "estimated" or "none"; `parameters`: everything the agent said, as it said it."""

    where: str
    reason: str
    model_version: Any
    variant: str
    latency_ms: float | None
    energy_mj: float | None
    energy_source: str
    escalated: bool
    parameters: dict[str, Any] | None = None


class Result(NamedTuple):
    outputs: dict[str, np.ndarray]
    provenance: Provenance


def provenance_of(params: dict[str, Any]) -> Provenance:
    return _tuple_new(Provenance, (params.get("where", "local"), params.get("reason", ""),
                                   params.get("model_version"), params.get("variant", ""), params.get("latency_ms"),
                                   params.get("energy_mj"), params.get("energy_source", "none"),
                                   bool(params.get("escalated", False)), params))


def result_of(frame: Any) -> Result:
    """A reply frame -> Result, or the typed error it carries."""
    header = frame.header
    if frame.kind == ERROR:
        raise from_reply(frame.status, str(header.get("reason", "error")), str(header.get("error", "")))
    try:
        outputs = decode_tensors(header.get("outputs"), frame.payload, "output")
    except FrameError as exc:
        raise AgentUnavailable(f"the agent sent a reply the SDK cannot read ({exc}); upgrade the SDK to the "
                               "agent's version") from None
    params = header.get("parameters")
    return _tuple_new(Result, (outputs, provenance_of(params if isinstance(params, dict) else {})))


def request_parts(model: str, inputs: Any, deadline_ms: float | None, tier: str, version: str | None,
                  outputs: list[str] | None) -> list[Any]:
    """The request frame's buffers; InvalidInput for what the agent would refuse anyway, without the round trip."""
    if type(inputs) is np.ndarray:
        inputs = {"": inputs}  # "": the model's only input, named by the agent
    elif not isinstance(inputs, dict):
        try:
            inputs = {"": np.asarray(inputs)}
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"inputs must be a numpy array or a dict of them, got {type(inputs).__name__} "
                               f"({exc})") from None
    if tier not in TIERS:
        raise InvalidInput(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if deadline_ms is not None and not (isinstance(deadline_ms, (int, float)) and deadline_ms > 0):
        raise InvalidInput(f"deadline_ms must be a positive number of milliseconds, got {deadline_ms!r}")
    try:
        return encode_request(model, inputs, version=version, outputs=outputs, deadline_ms=deadline_ms, tier=tier)
    except FrameError as exc:
        raise InvalidInput(str(exc)) from None


def find_socket(socket: str | os.PathLike[str] | None = None, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The agent's unix socket path (see the module docstring); AgentUnavailable saying how to point at it."""
    if socket is not None:
        return os.fspath(socket)
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    base = Path(data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    api_json = base / "api.json"
    try:
        info = json.loads(api_json.read_text())
    except FileNotFoundError:
        raise AgentUnavailable(f"no agent found: {api_json} does not exist (is edgefleet-agent running with "
                               f"data_dir {base}?); pass Client(socket=PATH) or set {SOCKET_ENV}") from None
    except (OSError, ValueError) as exc:
        raise AgentUnavailable(f"cannot read {api_json} ({exc}); pass Client(socket=PATH) or set "
                               f"{SOCKET_ENV}") from None
    path = info.get("unix_socket") if isinstance(info, dict) else None
    if not path:
        raise AgentUnavailable(f"the agent serves no unix socket ({api_json} has none); set api.unix_socket in its "
                               "config and restart it")
    return str(path)


class _Conn:
    __slots__ = ("path", "sock", "reader", "rfile", "used")

    def __init__(self, path: str, timeout_s: float) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            why = exc.strerror or str(exc)
            hint = ("is edgefleet-agent running?" if isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                    else "is this user in the agent's group?" if isinstance(exc, PermissionError) else "")
            raise AgentUnavailable(f"cannot connect to the agent at {path}: {why}; {hint}".rstrip("; ")) from None
        self.path = path
        self.sock = sock
        # Kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO) once, not a Python timeout set per call: a request then costs
        # a send and a recv, no ioctl or poll around them (oip_frames.DeadlineReader).
        self.reader = DeadlineReader(sock, kernel_timeouts=send_timeout(sock, timeout_s))
        self.rfile = io.BufferedReader(self.reader, _SMALL)
        self.used = False

    def exchange(self, parts: list[Any], timeout_s: float) -> Any:
        """Send one request frame and read its reply frame. ConnectionError when the agent had closed the
        connection before reading any of it (safe to send again); other errors as they come."""
        sock = self.sock
        if not self.reader.kernel:
            sock.settimeout(timeout_s)
        mark = self.reader.received
        try:
            if sum(HEAD.unpack_from(parts[0])[4:]) <= _SMALL:  # the head says how long the rest is
                sock.sendall(b"".join(parts))
            else:
                for part in parts:
                    sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionError(str(exc)) from None
        except BlockingIOError:  # SO_SNDTIMEO: the agent stopped reading
            raise TimeoutError("the agent took no more of the request") from None
        self.reader.deadline = time.monotonic() + timeout_s
        try:
            return read_frame(self.rfile, max_payload=MAX_REPLY_BYTES)
        except (FrameEOF, ConnectionResetError) as exc:
            if self.reader.received == mark:
                raise ConnectionError(str(exc) or "closed") from None
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Client:
    """A handle on the local agent; safe to share between threads (each gets its own connection)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout_s: float = 10.0,
                 data_dir: str | os.PathLike[str] | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._socket = socket
        self._data_dir = data_dir
        self._local = threading.local()
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()

    @classmethod
    def standalone(cls, model_path: str | os.PathLike[str], cloud_url: str | None = None, token: str | None = None,
                   **options: Any):
        """No agent: the model runs in this process (ONNX Runtime), the offload policy decides, and the cloud's OIP
        server answers what must go there. Options: sdk/embedded.py `Standalone`."""
        from edgefleet.sdk.embedded import Standalone

        return Standalone(model_path, cloud_url=cloud_url, token=token, **options)

    @property
    def socket_path(self) -> str:
        return find_socket(self._socket, self._data_dir)

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Conn(self.socket_path, self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._conns.discard(conn)

    def infer(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray, deadline_ms: float | None = None,
              tier: str = "realtime", *, version: str | None = None, outputs: list[str] | None = None) -> Result:
        """Run `model` on `inputs` where the agent's policy says; the outputs and where, why and at what cost.
        Raises ModelUnknown, InvalidInput, CloudUnreachable, BudgetUnmet or AgentUnavailable (sdk/errors.py)."""
        parts = request_parts(model, inputs, deadline_ms, tier, version, outputs)
        for attempt in (0, 1):
            conn = self._conn()
            reused = conn.used
            try:
                frame = conn.exchange(parts, self.timeout_s)
            except ConnectionError:
                self._drop(conn)
                if reused and attempt == 0:
                    continue  # closed while idle (before the agent read this request): send it again
                raise AgentUnavailable(f"the agent closed the connection at {conn.path}; is it "
                                       "restarting? retry shortly") from None
            except TimeoutError:
                self._drop(conn)  # a late reply would answer the next request
                raise AgentUnavailable(f"the agent did not answer within {self.timeout_s:g} s (timeout_s); it may "
                                       "be overloaded: retry, or raise timeout_s") from None
            except (FrameError, FrameEOF, OSError) as exc:
                self._drop(conn)
                raise AgentUnavailable(f"the connection to the agent broke ({exc}); retry") from None
            conn.used = True
            return result_of(frame)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "Provenance", "Result", "SdkError", "find_socket"]
