"""The SDK's side of the agent's unix socket: framed requests (common/oip_frames.py) on a persistent connection.

Theory of operation: `edgefleet.sdk.Client` keeps one connection per app thread and sends one request frame at a
time; the agent answers each with a response or an error frame on the same connection. The connection arrives on
the local API's unix socket, whose server peeks at its first byte (local_api.py `_UnixServer`): the frames' magic
starts with 0x89, which starts no HTTP request line, so HTTP clients and the SDK share one socket, one permission
(the agent's group) and one entry in api.json. A second socket (api.sdk_socket) would have meant a second path to
configure, secure and discover, for a saving of one peek per connection (not per request: connections persist).

Every request goes to `api.serving.infer_arrays(...)`: the offload router when the agent has one, else
`LocalServing` over the inference service; the frame header's deadline_ms and tier reach the router as they came.
A tensor named "" is the model's only input (the SDK's `infer(model, array)`), resolved here from the local model.

Nothing a peer sends can crash the server or hold its thread: each frame (head, header, tensors) must arrive
within api.read_timeout_s of the server starting to wait for it (`DeadlineReader`). A connection idle that long is
closed without a word (the SDK reconnects, and retries a request the agent never began to read); a frame cut short
past the deadline gets a 408 error frame, a frame too large for the limits a 413 and a stream that is not frames a
400, each then closed, since the stream is out of step. A whole frame with a bad header or bad tensors is answered
with an error frame and the connection stays. Errors carry the status the HTTP API gives the same error and the
error's `reason` code, which the SDK maps to its typed errors (`status_of`).
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import time
from typing import Any

from edgefleet.common.oip_codec import OipError
from edgefleet.common.oip_frames import (
    HEAD,
    DeadlineReader,
    FrameEOF,
    FrameError,
    decode_request,
    encode_error,
    encode_response,
    read_frame,
    send_timeout,
)
from edgefleet.edge_agent.errors import EdgefleetError, InferenceError

log = logging.getLogger(__name__)
_SMALL = 64 * 1024  # below this a reply is joined and sent in one write; above, its buffers go one by one


def status_of(exc: EdgefleetError) -> tuple[int, str]:
    """The HTTP status and reason code of an agent error, for the HTTP API and the error frames alike. By reason
    code, so errors the offload router adds map without this module knowing their classes."""
    reason = getattr(exc, "reason", "error")
    if reason == "model_not_found":
        return 404, reason
    if reason == "model_not_ready":
        return 503, reason
    if reason == "cloud_unavailable":
        return 503, reason
    if "budget" in reason or "deadline" in reason:
        return 504, reason
    if isinstance(exc, InferenceError):
        return 400, reason
    return 500, reason


def only_input(api: Any, model: str) -> str:
    """The name of `model`'s only input, for a request that sent one unnamed tensor."""
    loaded = api.service._models.get(model)  # the service's own lock-free hot-path read
    if loaded is not None and len(loaded.input_checks) == 1:
        return loaded.first_input
    try:
        specs = api.service.get(model).runtime.inputs
    except InferenceError:
        if api.router is None:
            raise  # not on this device and nowhere else to go: the service's own ModelNotFound / ModelNotReady
        raise InferenceError(f"model {model!r} is not served on this device, so its input's name is unknown here: "
                             "pass the inputs as {name: array}") from None
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise InferenceError(f"model {model!r} takes {len(specs)} inputs ({names}); pass them as {{name: array}}")
    return specs[0].name


def answer(api: Any, frame: Any) -> list[Any] | bytes:
    """The reply to one whole frame; never raises (an error is an error frame)."""
    request_id = None
    try:
        req = decode_request(frame)
        request_id = req.id
        inputs = req.inputs
        if "" in inputs:
            if len(inputs) != 1:
                raise FrameError("an unnamed input must be the only one; name every input when there are several")
            inputs = {only_input(api, req.model): inputs[""]}
        outputs, params = api.serving.infer_arrays(req.model, inputs, version=req.version, outputs=req.outputs,
                                                   deadline_ms=req.deadline_ms, tier=req.tier)
        version = params.get("model_version")
        return encode_response(outputs, params, model_version=None if version is None else str(version),
                               id=request_id)
    except FrameError as exc:
        return encode_error(exc.status, str(exc), reason="bad_frame", id=request_id)
    except OipError as exc:
        return encode_error(exc.status, str(exc), reason="inference", id=request_id)
    except EdgefleetError as exc:
        status, reason = status_of(exc)
        message = str(exc) if status != 500 else f"{reason}: {exc}"
        return encode_error(status, message, reason=reason, id=request_id)
    except Exception as exc:
        log.exception("framed inference on the unix socket failed")
        return encode_error(500, f"internal error: {type(exc).__name__}; the agent's log has the details",
                            reason="internal", id=request_id)


def _send(sock: socket.socket, reply: list[Any] | bytes, timeout_s: float | None) -> bool:
    """Write a reply; False when the peer is gone or stopped reading for `timeout_s` (a client that stops reading is
    dropped, as on the HTTP API). `timeout_s` None: the socket's SO_SNDTIMEO already bounds every write."""
    if timeout_s is not None:
        sock.settimeout(timeout_s)
    try:
        if isinstance(reply, bytes):
            sock.sendall(reply)
        elif sum(HEAD.unpack_from(reply[0])[4:]) <= _SMALL:  # the head says how long the rest is
            sock.sendall(b"".join(reply))
        else:
            for part in reply:
                sock.sendall(part)
    except OSError:
        return False
    return True


class FrameHandler(socketserver.BaseRequestHandler):
    """One SDK connection: frames in a loop until the peer closes, stalls or sends garbage. `server.api` is the
    LocalApi (serving, service, read_timeout_s, max_binary_bytes)."""

    def handle(self) -> None:
        api = self.server.api  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        timeout_s = api.read_timeout_s
        # Kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO): a small request then costs the agent a recv and a send, no
        # poll or ioctl around them (oip_frames.DeadlineReader).
        reader = DeadlineReader(sock, kernel_timeouts=send_timeout(sock, timeout_s))
        write_timeout_s: float | None = None if reader.kernel else timeout_s
        rfile = io.BufferedReader(reader, _SMALL)
        while True:
            reader.deadline = time.monotonic() + timeout_s
            mark = reader.received
            try:
                frame = read_frame(rfile, max_payload=api.max_binary_bytes)
            except FrameEOF:
                return
            except FrameError as exc:
                sent = _send(sock, encode_error(exc.status, str(exc), reason="bad_frame"), write_timeout_s)
                if exc.in_step and sent:
                    continue  # read whole, only its header was bad: the next frame starts where it ended
                return
            except TimeoutError:
                if reader.received != mark:  # cut short mid-frame; an idle connection just closes
                    _send(sock, encode_error(408, f"the frame did not arrive whole within {timeout_s:g} s "
                                                  "(api.read_timeout_s); send every byte its head announces",
                                             reason="timeout"), write_timeout_s)
                return
            except OSError:
                return
            if not _send(sock, answer(api, frame), write_timeout_s):
                return
