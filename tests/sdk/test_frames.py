"""common/oip_frames.py: the frame format itself, every datatype both ways, and the readers' limits."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edgefleet.common import oip_frames as F
from edgefleet.protos.oip import DATATYPES


def roundtrip(parts) -> F.Frame:
    return F.read_frame(io.BufferedReader(io.BytesIO(F.join(parts))), max_payload=1 << 20)


def test_the_datatype_table_is_protos():
    assert F.DATATYPES == DATATYPES  # kept apart so that the SDK imports no pydantic


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_and_odd_shapes_come_back_bit_equal(datatype):
    rng = np.random.default_rng(0)
    dtype = np.dtype(DATATYPES[datatype])
    base = (rng.random((3, 4, 5)) * 100).astype(dtype)
    tensors = {"a": base, "strided": base[:, ::2, 1], "scalar": base[0, 0, 0].reshape(()), "empty": base[:0],
               "swapped": base.astype(dtype.newbyteorder(">")) if dtype.itemsize > 1 else base}
    frame = roundtrip(F.encode_request("m", tensors, version="2", outputs=["y"], deadline_ms=3.5, tier="background",
                                       id="q"))
    req = F.decode_request(frame)
    assert (req.model, req.version, req.outputs, req.deadline_ms, req.tier, req.id) == (
        "m", "2", ["y"], 3.5, "background", "q")
    assert list(req.inputs) == list(tensors)
    for name, want in tensors.items():
        got = req.inputs[name]
        assert got.shape == want.shape and got.dtype.name == dtype.name and np.array_equal(got, want), name
        assert got.flags.writeable  # the frame's own buffer, not a read-only bytes


def test_responses_and_errors():
    frame = roundtrip(F.encode_response({"y": np.arange(4, dtype=np.int64)}, {"where": "local"}, model_version="3",
                                        id="z"))
    assert (frame.kind, frame.status, frame.header["model_version"], frame.header["id"]) == (F.RESPONSE, 200, "3", "z")
    assert F.decode_tensors(frame.header["outputs"], frame.payload, "output")["y"].tolist() == [0, 1, 2, 3]
    frame = roundtrip([F.encode_error(413, "too big", reason="bad_frame", id="z")])
    assert (frame.kind, frame.status, frame.header) == (F.ERROR, 413, {"error": "too big", "reason": "bad_frame",
                                                                       "id": "z"})


def test_limits_and_garbage():
    data = F.join(F.encode_request("m", {"x": np.zeros(100, np.float32)}))
    with pytest.raises(F.FrameError, match="over the 399-byte limit") as info:
        F.read_frame(io.BufferedReader(io.BytesIO(data)), max_payload=399)
    assert info.value.status == 413 and not info.value.in_step
    with pytest.raises(F.FrameError, match="ended after"):
        F.read_frame(io.BufferedReader(io.BytesIO(data[:-1])), max_payload=1 << 20)
    with pytest.raises(F.FrameEOF):
        F.read_frame(io.BufferedReader(io.BytesIO(b"")), max_payload=1 << 20)
    with pytest.raises(F.FrameError, match="cannot carry"):
        F.encode_request("m", {"x": np.array(["text"])})
    with pytest.raises(F.FrameError, match="negative"):
        F.decode_tensors([["x", "FP32", [-1]]], memoryview(b""), "input")


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel_timeouts", "python_timeouts"])
def test_a_deadline_reader_waits_no_longer_than_its_deadline(kernel):
    """Both ways of waiting: SO_RCVTIMEO on a blocking socket (the SDK's frames) and Python's socket timeouts. A
    read within the deadline returns what came; a peer that sends a byte now and then cannot stretch a read past
    the deadline (plus the kernel mode's slack); a passed deadline is TimeoutError before any wait."""
    import socket
    import time

    a, b = socket.socketpair()
    try:
        reader = F.DeadlineReader(a, kernel_timeouts=kernel)
        assert reader.kernel is kernel and (not kernel or a.gettimeout() is None)  # kernel mode: blocking
        buf = bytearray(16)
        b.sendall(b"abc")
        reader.deadline = time.monotonic() + 5.0
        assert reader.readinto(buf) == 3 and bytes(buf[:3]) == b"abc" and reader.received == 3
        reader.deadline = time.monotonic() + 0.3
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            while True:  # nothing comes: the read gives up at the deadline
                reader.readinto(buf)
        waited = time.monotonic() - started
        assert 0.25 <= waited <= 0.3 + F._SLACK_S + 0.2, waited
        reader.deadline = time.monotonic() - 1.0
        with pytest.raises(TimeoutError, match="deadline passed"):
            reader.readinto(buf)
    finally:
        a.close()
        b.close()


def test_send_timeout_bounds_a_write_to_a_peer_that_stops_reading():
    import socket
    import time

    a, b = socket.socketpair()
    try:
        a.settimeout(None)
        assert F.send_timeout(a, 0.2)
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            while True:  # b never reads: the buffers fill, then the kernel gives up after 0.2 s
                a.send(b"x" * 65536)
        assert time.monotonic() - started < 5.0
    finally:
        a.close()
        b.close()
