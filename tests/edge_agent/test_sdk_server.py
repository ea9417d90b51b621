"""edge_agent/sdk_server.py: the SDK's frames on the agent's real unix socket, sent by hand, good and hostile.

Every hostile case ends the same way: an error frame or a closed connection within api.read_timeout_s, and the
server still answering the next client. Waits are bounded (WAIT_S), never timed assertions.
"""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import threading

import httpx
import numpy as np
import pytest

from edgefleet.common import oip_frames as F
from tests.sdk import kit

READ_TIMEOUT_S = 0.5
WAIT_S = 20
X = kit.sample(2)


@pytest.fixture
def served(tmp_path):
    with kit.serving(tmp_path, read_timeout_s=READ_TIMEOUT_S, max_body_bytes=64 * 1024) as s:
        yield s


def connect(sock_path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(WAIT_S)
    s.connect(str(sock_path))
    return s


def read_reply(s: socket.socket) -> F.Frame:
    return F.read_frame(s.makefile("rb"), max_payload=1 << 30)


def read_to_eof(s: socket.socket) -> bytes:
    got = b""
    while data := s.recv(65536):
        got += data
    return got


def error_of(data: bytes) -> F.Frame:
    frame = F.read_frame(io.BufferedReader(io.BytesIO(data)), max_payload=1 << 20)
    assert frame.kind == F.ERROR
    return frame


def still_serves(sock_path) -> None:
    with connect(sock_path) as s:
        s.sendall(F.join(F.encode_request("digits", {"input": X})))
        frame = read_reply(s)
    assert frame.kind == F.RESPONSE
    assert np.array_equal(F.decode_tensors(frame.header["outputs"], frame.payload, "output")["probabilities"],
                          kit.reference(X))


def test_frames_on_one_connection_equal_bare_onnxruntime(served):
    api, _, telemetry, sock = served
    with connect(sock) as s:
        rf = s.makefile("rb")
        for i, x in enumerate((X, kit.sample(5, seed=3), X[:1])):
            s.sendall(F.join(F.encode_request("digits", {"input": x}, id=f"r{i}", deadline_ms=30)))
            frame = F.read_frame(rf, max_payload=1 << 30)
            assert frame.kind == F.RESPONSE and frame.status == 200
            out = F.decode_tensors(frame.header["outputs"], frame.payload, "output")
            assert np.array_equal(out["probabilities"], kit.reference(x))
            assert frame.header["id"] == f"r{i}" and frame.header["model_version"] == "1"
            p = frame.header["parameters"]
            assert (p["where"], p["model_version"], p["energy_source"]) == ("local", 1, "estimated")
    [(_, _, _, requests, errors, rows, *_)] = telemetry.totals()
    assert (requests, errors, rows) == (3, 0, 8)


def test_an_unnamed_tensor_is_the_models_only_input_and_outputs_can_be_chosen(served):
    *_, sock = served
    with connect(sock) as s:
        s.sendall(F.join(F.encode_request("digits", {"": X}, outputs=["probabilities"])))
        frame = read_reply(s)
    assert frame.kind == F.RESPONSE
    assert np.array_equal(F.decode_tensors(frame.header["outputs"], frame.payload, "output")["probabilities"],
                          kit.reference(X))


def test_http_and_frames_share_the_socket(served):
    *_, sock = served
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent") as c:
        assert c.get("/v2/health/live").json() == {"live": True}
    still_serves(sock)


def head(kind=F.REQUEST, header_len=0, payload_len=0, magic=F.MAGIC) -> bytes:
    return F.HEAD.pack(magic, kind, 0, 0, header_len, payload_len)


CLOSING = [
    ("not a frame", b"\x89garbage that is not a frame at all....", 400, "not an edgefleet frame"),
    ("unknown kind", head(kind=9), 400, "unknown frame kind 9"),
    ("huge payload", head(header_len=2, payload_len=2**32 - 1), 413, "over the 262144-byte limit"),
    ("huge header", head(header_len=2**31), 413, "frame header declares"),
]


@pytest.mark.parametrize("case,data,status,message", CLOSING, ids=[c[0] for c in CLOSING])
def test_a_stream_out_of_step_gets_an_error_frame_and_is_closed(served, case, data, status, message):
    *_, sock = served
    with connect(sock) as s:
        s.sendall(data)
        reply = read_to_eof(s)  # the server closes after its answer
    frame = error_of(reply)
    assert frame.status == status and message in frame.header["error"], frame.header
    still_serves(sock)


def bad_frame(header: bytes | dict, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return head(header_len=len(raw), payload_len=len(payload)) + raw + payload


KEPT = [
    ("header not JSON", bad_frame(b"{nope"), 400, "not JSON"),
    ("header not an object", bad_frame(b"[1]"), 400, "must be a JSON object"),
    ("no model", bad_frame({"inputs": []}), 400, "needs 'model'"),
    ("no inputs", bad_frame({"model": "digits", "inputs": []}), 400, "carries no inputs"),
    ("sizes short of the payload", bad_frame({"model": "digits", "inputs": [["input", "FP32", [1, 64]]]}, b"\0" * 8),
     400, "needs 256 bytes"),
    ("bytes left over", bad_frame({"model": "digits", "inputs": [["input", "FP32", [0, 64]]]}, b"\0" * 4), 400,
     "bytes after its tensors"),
    ("shape too large", bad_frame({"model": "digits", "inputs": [["input", "FP32", [2**62, 64]]]}), 400,
     "needs"),
    ("bad datatype", bad_frame({"model": "digits", "inputs": [["input", "FP8", [1]]]}, b"\0"), 400,
     "unknown datatype 'FP8'"),
    ("bad tier", bad_frame({"model": "digits", "tier": "now", "inputs": [["input", "FP32", [0, 64]]]}), 400,
     "'tier' must be one of"),
    ("bad deadline", bad_frame({"model": "digits", "deadline_ms": 0, "inputs": [["input", "FP32", [0, 64]]]}),
     400, "'deadline_ms' must be a positive"),
    ("wrong dtype for the model", F.join(F.encode_request("digits", {"input": X.astype(np.float64)})), 400,
     "the model takes input FP32 [-1, 64]"),
    ("unknown model", F.join(F.encode_request("ghost", {"input": X})), 404, "not on this device"),
    ("unknown model, unnamed input", F.join(F.encode_request("ghost", {"": X})), 404, "not on this device"),
    ("unknown version", F.join(F.encode_request("digits", {"input": X}, version="4")), 404, "version 4"),
]


@pytest.mark.parametrize("case,data,status,message", KEPT, ids=[c[0] for c in KEPT])
def test_a_whole_bad_frame_gets_an_error_frame_and_the_connection_stays(served, case, data, status, message):
    *_, sock = served
    with connect(sock) as s:
        rf = s.makefile("rb")
        s.sendall(data)
        frame = F.read_frame(rf, max_payload=1 << 20)
        assert frame.kind == F.ERROR and frame.status == status and message in frame.header["error"], frame.header
        assert frame.header["reason"] in ("bad_frame", "inference", "model_not_found")
        s.sendall(F.join(F.encode_request("digits", {"input": X})))  # the same connection goes on
        assert F.read_frame(rf, max_payload=1 << 30).kind == F.RESPONSE


def test_a_frame_cut_short_and_closed_does_not_hurt(served):
    *_, sock = served
    data = F.join(F.encode_request("digits", {"input": X}))
    for cut in (3, F.HEAD.size, len(data) - 1):
        with connect(sock) as s:
            s.sendall(data[:cut])
            s.shutdown(socket.SHUT_WR)
            reply = read_to_eof(s)
        if cut >= F.HEAD.size:  # a head that arrived whole: the server says what was missing
            assert "the frame ended after" in error_of(reply).header["error"]
        else:
            assert "frame head ended" in error_of(reply).header["error"]
    still_serves(sock)


def test_a_client_stalled_mid_frame_gets_408_and_blocks_no_one(tmp_path):
    # A longer read timeout here, so that the other client is served while the stalled one is still held.
    with kit.serving(tmp_path, read_timeout_s=3.0) as (*_, sock):
        data = F.join(F.encode_request("digits", {"input": X}))
        stalled = connect(sock)
        stalled.sendall(data[:-10])  # then nothing
        answered = []

        def other() -> None:
            still_serves(sock)
            answered.append(select.select([stalled], [], [], 0)[0] == [])  # the stalled one not yet answered

        t = threading.Thread(target=other)
        t.start()
        t.join(WAIT_S)
        assert answered == [True]  # served while the stalled one still waits
        reply = read_to_eof(stalled)  # before the read deadline the server would wait here for ever
        stalled.close()
        frame = error_of(reply)
        assert frame.status == 408 and "api.read_timeout_s" in frame.header["error"]


def test_an_idle_connection_is_closed_without_a_word(served):
    *_, sock = served
    with connect(sock) as s:
        s.sendall(F.join(F.encode_request("digits", {"input": X})))
        rf = s.makefile("rb")
        assert F.read_frame(rf, max_payload=1 << 30).kind == F.RESPONSE
        assert rf.read() == b""  # idle past api.read_timeout_s: closed, no stray error frame for the SDK to misread


def test_a_silent_connection_is_dropped_at_the_peek(served):
    *_, sock = served
    with connect(sock) as s:
        assert read_to_eof(s) == b""
    still_serves(sock)


def test_a_dripping_client_is_cut_off_by_the_deadline(served):
    """Each byte well within READ_TIMEOUT_S: only the deadline on the whole frame ends it."""
    *_, sock = served
    data = F.join(F.encode_request("digits", {"input": kit.sample(40)}))
    sent = 0
    with connect(sock) as s:
        for byte in data[: len(data) // 4]:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            if select.select([s], [], [], READ_TIMEOUT_S / 5)[0]:
                break
        read_to_eof(s)
    assert sent < len(data) // 4, f"the server took {sent} dripped bytes"


def test_head_layout_is_what_the_docstring_says():
    raw = F.HEAD.pack(F.MAGIC, F.REQUEST, 0, 200, 5, 7)
    assert raw[:4] == b"\x89EF1" and struct.unpack("<BBHII", raw[4:]) == (1, 0, 200, 5, 7) and len(raw) == 16
