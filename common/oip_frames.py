"""The SDK's framed wire format on the agent's unix socket: length-prefixed frames, a small JSON header, raw tensors.

Theory: an app on the device asks the local agent for one small inference at a time, so the cost that matters is
what sits around `session.run`: HTTP parsing, JSON number lists and a connection per call. A frame is a fixed
16-byte head (`HEAD`), then a JSON header of `header_len` bytes, then `payload_len` bytes of raw tensors:

    magic b"\\x89EF1" | kind u8 | flags u8 (0) | status u16 | header_len u32 | payload_len u32   (little-endian)

The first byte, 0x89, starts no HTTP request line, so the agent tells a framed client from an HTTP one on the same
socket by peeking at one byte (edge_agent/local_api.py). The header names the tensors as `[name, datatype, shape]`
triples, in the order their bytes follow (little-endian, row-major; BOOL one byte each), so no tensor is ever
turned into a Python list. Kinds:

    REQUEST   {"model", "version", "outputs", "deadline_ms", "tier", "id", "inputs": [[name, datatype, shape]...]}
              a tensor named "" is the model's only input (the SDK's `infer(model, array)`)
    RESPONSE  {"id", "model_version", "outputs": [[name, datatype, shape]...], "parameters": {...provenance}}
    ERROR     {"id", "error": message, "reason": code}; `status` is the HTTP status the same error has on the API

A reader never trusts a length: the header is at most MAX_HEADER_BYTES, the payload at most the reader's limit,
the tensors' sizes must add up to the payload exactly, and the whole frame must arrive before the reader's deadline
(`DeadlineReader`), so no peer can make the other allocate without bound or wait for ever. A bad frame is a
`FrameError` carrying the status to answer with; after one the stream is out of step and is closed.

Imports numpy and the standard library only: the SDK that apps import loads no pydantic through this module (the
datatype table is kept equal to protos/oip.py's by a test).
"""

from __future__ import annotations

import io
import json
import math
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"\x89EF1"
HEAD = struct.Struct("<4sBBHII")
_unpack = HEAD.unpack
REQUEST, RESPONSE, ERROR = 1, 2, 3
KINDS = (REQUEST, RESPONSE, ERROR)
MAX_HEADER_BYTES = 64 * 1024  # a request header names a few tensors; 64 KiB is hundreds of them
TIERS = ("realtime", "background")

# OIP datatype <-> numpy dtype name; equal to protos.oip.DATATYPES (tests/common/test_oip_frames.py checks).
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
_LE = {name: np.dtype(dtype).newbyteorder("<") for name, dtype in DATATYPES.items()}
# Keyed by dtype object, not dtype.name: that property is Python code (3.8 us a call here), a dict get is 0.07 us.
_OIP_OF = {np.dtype(dtype): name for name, dtype in DATATYPES.items()}
_LITTLE = np.little_endian


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


# The header is JSON, encoded and decoded on every request by both ends: json's C encoder made once (json.dumps
# makes one per call: 7.7 us for a response header here, against 4.2) and its C scanner called directly (json.loads
# of bytes first sniffs the encoding in Python: 6.7 us, against 4.0). The pure-Python forms where _json is missing.
try:
    from json.encoder import c_make_encoder as _c_make_encoder
    from json.encoder import encode_basestring_ascii as _ascii
except ImportError:  # pragma: no cover - CPython always has _json
    _c_make_encoder = None
if _c_make_encoder is not None:
    _c_encode = _c_make_encoder(None, _not_json, _ascii, None, ":", ",", False, False, True)

    def _dumps(header: dict[str, Any]) -> bytes:
        return "".join(_c_encode(header, 0)).encode()
else:  # pragma: no cover
    def _dumps(header: dict[str, Any]) -> bytes:
        return json.dumps(header, separators=(",", ":")).encode()
_DECODER = json.JSONDecoder()
_scan = _DECODER.scan_once


class FrameError(ValueError):
    """A frame that cannot be accepted; `status` is what the agent answers with (400 garbage, 413 too large).
    `in_step`: the frame was read whole (its header is what was wrong), so the stream can go on."""

    def __init__(self, message: str, status: int = 400, *, in_step: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.in_step = in_step


class FrameEOF(EOFError):
    """The peer closed the stream cleanly between two frames."""


@dataclass
class Frame:
    kind: int
    status: int
    header: dict[str, Any]
    payload: memoryview


@dataclass
class FrameRequest:
    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    outputs: list[str] | None = None
    deadline_ms: float | None = None
    tier: str = "realtime"
    id: str | None = None


class DeadlineReader(io.RawIOBase):
    """A socket as a raw stream whose every read waits at most until `deadline` (monotonic seconds).

    A per-read timeout alone lets a peer that sends one byte now and then hold a thread for ever; a deadline bounds
    the whole message (an HTTP request, a frame) instead. Wrap it in `io.BufferedReader`: one recv then usually
    brings a whole small frame. `received` counts the bytes read, so a server can tell an idle connection from
    a message cut short.

    `kernel_timeouts=True` (the SDK's frames, both ends): the socket is made blocking and waits by the kernel's own
    SO_RCVTIMEO, set only when the time left falls below it by more than `_SLACK_S` (a frame read within its
    deadline then costs one recv, where a Python socket timeout costs an ioctl to set it and a poll before every
    recv: 4 of the 6 syscalls an SDK request cost the agent). A read may so wait up to `_SLACK_S` past the deadline.
    Where the platform refuses the option (a struct timeval it lays out otherwise), Python's timeouts are used.
    `send_timeout(sock, s)` is the writing side's counterpart (SO_SNDTIMEO)."""

    def __init__(self, sock: socket.socket, *, kernel_timeouts: bool = False) -> None:
        self.sock = sock
        self.deadline = math.inf
        self.received = 0
        self._rcvtimeo: float | None = None  # the SO_RCVTIMEO set; None: Python's timeouts
        if kernel_timeouts and _set_timeo(sock, socket.SO_RCVTIMEO, _MAX_TIMEO_S):
            sock.settimeout(None)
            self._rcvtimeo = _MAX_TIMEO_S

    @property
    def kernel(self) -> bool:
        """True when reads wait by SO_RCVTIMEO (the socket is blocking)."""
        return self._rcvtimeo is not None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the read deadline passed")
            current = self._rcvtimeo
            if current is None:
                self.sock.settimeout(remaining)
                break
            if current > remaining + _SLACK_S:
                _set_timeo(self.sock, socket.SO_RCVTIMEO, remaining)
                self._rcvtimeo = remaining
            try:
                n = self.sock.recv_into(buffer)
            except BlockingIOError:  # SO_RCVTIMEO ran out; the deadline decides (a lower one may be set above)
                self._rcvtimeo = min(current, remaining)
                continue
            self.received += n
            return n
        n = self.sock.recv_into(buffer)
        self.received += n
        return n


_SLACK_S = 0.1  # how far past its deadline a read with kernel timeouts may wait
_MAX_TIMEO_S = 3600.0  # SO_RCVTIMEO before any deadline: an hour (zero would mean for ever)
_TIMEVAL = struct.Struct("ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec} where both are a C long


def _set_timeo(sock: socket.socket, option: int, seconds: float) -> bool:
    """SO_RCVTIMEO / SO_SNDTIMEO to `seconds` (at least a millisecond); False where the platform refuses it."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))
    except (OSError, struct.error):
        return False
    return True


def send_timeout(sock: socket.socket, seconds: float) -> bool:
    """Writes on a blocking `sock` give up after `seconds` (BlockingIOError) by the kernel's SO_SNDTIMEO: no poll
    before each send. False where the platform refuses it (then use `sock.settimeout`)."""
    return _set_timeo(sock, socket.SO_SNDTIMEO, seconds)


# -- writing -----------------------------------------------------------------------------------------------------------


def _tensor_parts(tensors: dict[str, np.ndarray]) -> tuple[list[list[Any]], list[memoryview], int]:
    entries: list[list[Any]] = []
    chunks: list[memoryview] = []
    size = 0
    for name, value in tensors.items():
        array = value if type(value) is np.ndarray else np.asarray(value)
        dtype = array.dtype
        datatype = _OIP_OF.get(dtype) if _LITTLE or dtype.byteorder == "|" else None
        if datatype is None:  # not native little-endian, or not a type the protocol carries
            datatype = NUMPY_TO_DATATYPE.get(dtype.name)
            if datatype is None:
                raise FrameError(f"tensor {name!r} has dtype {dtype.name}, which the protocol cannot carry; "
                                 f"use one of {', '.join(DATATYPES.values())}")
            array = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
        elif not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        entries.append([name, datatype, list(array.shape)])
        chunk = memoryview(array).cast("B") if array.size else memoryview(b"")
        chunks.append(chunk)
        size += chunk.nbytes
    return entries, chunks, size


def _frame(kind: int, status: int, header: dict[str, Any], chunks: list[memoryview], size: int) -> list[Any]:
    raw = _dumps(header)
    return [HEAD.pack(MAGIC, kind, 0, status, len(raw), size), raw, *chunks]


def encode_request(model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                   outputs: list[str] | None = None, deadline_ms: float | None = None, tier: str = "realtime",
                   id: str | None = None) -> list[Any]:
    """A request frame as buffers to send in order (b"".join them, or sendmsg): head, header, tensor bytes."""
    entries, chunks, size = _tensor_parts(inputs)
    header: dict[str, Any] = {"model": model, "inputs": entries}
    if version is not None:
        header["version"] = str(version)
    if outputs is not None:
        header["outputs"] = list(outputs)
    if deadline_ms is not None:
        header["deadline_ms"] = deadline_ms
    if tier != "realtime":
        header["tier"] = tier
    if id is not None:
        header["id"] = id
    return _frame(REQUEST, 0, header, chunks, size)


def encode_response(outputs: dict[str, np.ndarray], parameters: dict[str, Any], *, model_version: str | None = None,
                    id: str | None = None) -> list[Any]:
    entries, chunks, size = _tensor_parts(outputs)
    header: dict[str, Any] = {"outputs": entries, "parameters": parameters}
    if model_version is not None:
        header["model_version"] = model_version
    if id is not None:
        header["id"] = id
    return _frame(RESPONSE, 200, header, chunks, size)


def encode_error(status: int, message: str, *, reason: str = "error", id: str | None = None) -> bytes:
    header: dict[str, Any] = {"error": message, "reason": reason}
    if id is not None:
        header["id"] = id
    return b"".join(_frame(ERROR, max(0, min(int(status), 0xFFFF)), header, [], 0))


def join(parts: list[Any]) -> bytes:
    return b"".join(parts)


# -- reading -----------------------------------------------------------------------------------------------------------


def parse_head(head: bytes, *, max_payload: int) -> tuple[int, int, int, int]:
    """A frame's 16-byte head -> (kind, status, header_len, payload_len), every length checked against the limits."""
    magic, kind, _flags, status, header_len, payload_len = HEAD.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"not an edgefleet frame (starts {bytes(head[:4])!r}, expected {MAGIC!r}); speak the "
                         "framed protocol from edgefleet.sdk, or HTTP")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}; this agent knows {list(KINDS)}: upgrade the agent or the SDK")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"the frame header declares {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit",
                         413)
    if payload_len > max_payload:
        raise FrameError(f"the frame declares {payload_len} bytes of tensors, over the {max_payload}-byte limit "
                         "(4 x api.max_body_mb); send fewer rows per request", 413)
    return kind, status, header_len, payload_len


def make_frame(kind: int, status: int, body: bytearray | bytes, header_len: int) -> Frame:
    """The frame whose header and payload are `body` (header first, `header_len` bytes of it)."""
    view = memoryview(body)
    header: Any = {}
    if header_len:
        try:
            text = str(view[:header_len], "utf-8")
            header, end = _scan(text, 0)
            if end != len(text) and text[end:].strip():
                raise ValueError(f"extra data after the JSON object at {end}")
        except StopIteration:
            raise FrameError("the frame header is not JSON: it does not start with a JSON value",
                             in_step=True) from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise FrameError(f"the frame header is not JSON: {exc}", in_step=True) from None
    if type(header) is not dict:
        raise FrameError("the frame header must be a JSON object", in_step=True)
    return Frame(kind, status, header, view[header_len:])


def read_frame(rfile: Any, *, max_payload: int) -> Frame:
    """One frame from a buffered binary stream. FrameEOF: closed before a frame began; FrameError: not a frame, too
    large, or cut short; TimeoutError (from a DeadlineReader) passes through."""
    head = rfile.read(HEAD.size)
    if len(head) != HEAD.size:
        if not head:
            raise FrameEOF()
        raise FrameError(f"the frame head ended after {len(head)} of its {HEAD.size} bytes")
    magic, kind, _flags, status, header_len, payload_len = _unpack(head)
    if magic != MAGIC or kind not in KINDS or header_len > MAX_HEADER_BYTES or payload_len > max_payload:
        parse_head(head, max_payload=max_payload)  # raises the FrameError that says which
    n = header_len + payload_len
    body = bytearray(n)
    got = rfile.readinto(body) if n else 0
    if got != n:
        raise FrameError(f"the frame ended after {got} of its {n} bytes; send every byte its head announces")
    return make_frame(kind, status, body, header_len)


def decode_tensors(entries: Any, payload: memoryview, what: str) -> dict[str, np.ndarray]:
    """`[[name, datatype, shape], ...]` over `payload` -> named arrays (views of the payload, no copy)."""
    if type(entries) is not list:
        raise FrameError(f"'{what}s' must be a list of [name, datatype, shape]")
    out: dict[str, np.ndarray] = {}
    offset = 0
    available = len(payload)
    # Plain loops and type() checks: this runs on every request at both ends (a generator per shape cost 2 us).
    for i, entry in enumerate(entries):
        if type(entry) is not list or len(entry) != 3:
            raise FrameError(f"{what}s[{i}] must be [name, datatype, shape]")
        name, datatype, shape = entry
        if type(name) is not str:
            raise FrameError(f"{what}s[{i}]: the name must be a string")
        if name in out:
            raise FrameError(f"{what} {name!r} is given twice")
        dtype = _LE.get(datatype) if type(datatype) is str else None
        if dtype is None:
            raise FrameError(f"{what} {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        if type(shape) is not list:
            raise FrameError(f"{what} {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise FrameError(f"{what} {name!r}: shape must be a list of non-negative integers, got {shape!r}")
            count *= d  # Python ints: exact, no int64 wrap
        size = count * dtype.itemsize
        if offset + size > available:
            raise FrameError(f"{what} {name!r}: shape {shape} of {datatype} needs {size} bytes but the frame "
                             f"carries {available - offset} for it")
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
        offset += size
        out[name] = array.reshape(shape) if len(shape) != 1 else array
    if offset != available:
        raise FrameError(f"the frame carries {available - offset} bytes after its tensors; the shapes must "
                         "account for every payload byte")
    return out


def decode_request(frame: Frame) -> FrameRequest:
    """A REQUEST frame -> FrameRequest; FrameError (400) naming the bad field."""
    h = frame.header
    if frame.kind != REQUEST:
        raise FrameError(f"expected a request frame (kind {REQUEST}), got kind {frame.kind}")
    model = h.get("model")
    if not isinstance(model, str) or not model:
        raise FrameError("the request header needs 'model': the model's name")
    version = h.get("version")
    if version is not None and not isinstance(version, str):
        raise FrameError("'version' must be a string")
    outputs = h.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise FrameError("'outputs' must be a list of output names")
    deadline_ms = h.get("deadline_ms")
    if deadline_ms is not None and (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float))
                                    or not 0 < deadline_ms < math.inf):
        raise FrameError(f"'deadline_ms' must be a positive number of milliseconds, got {deadline_ms!r}")
    tier = h.get("tier", "realtime")
    if tier not in TIERS:
        raise FrameError(f"'tier' must be one of {', '.join(TIERS)}, got {tier!r}")
    request_id = h.get("id")
    inputs = decode_tensors(h.get("inputs"), frame.payload, "input")
    if not inputs:
        raise FrameError("the request carries no inputs; send at least one tensor")
    return FrameRequest(model, inputs, version, outputs, deadline_ms, tier,
                        None if request_id is None else str(request_id))


__all__ = ["DATATYPES", "ERROR", "HEAD", "MAGIC", "MAX_HEADER_BYTES", "NUMPY_TO_DATATYPE", "REQUEST", "RESPONSE",
           "TIERS", "DeadlineReader", "Frame", "FrameEOF", "FrameError", "FrameRequest", "decode_request",
           "decode_tensors", "encode_error", "encode_request", "encode_response", "join", "make_frame", "parse_head",
           "read_frame", "send_timeout"]
