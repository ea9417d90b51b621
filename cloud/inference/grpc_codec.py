"""`ModelInferRequest` tensors <-> numpy, for grpc_server.py: raw bytes and typed `InferTensorContents`.

Theory: the Open Inference Protocol's gRPC form carries a tensor's values either in `raw_input_contents` (one bytes
item per input, in input order: little-endian, row-major, BOOL one byte per element; what tritonclient sends) or in
the typed field of `InferTensorContents` that matches its datatype (`fp32_contents`, `int64_contents`, ...). The
proto forbids mixing the two in one request. Raw bytes become arrays without a copy (`np.frombuffer`); typed
values are copied once. Every shape is checked against the bytes or values that came with it before numpy sees
it, with exact Python integers, so a declared shape of 2**62 elements is a refusal, never an allocation.

Answers follow KServe's convention (its Python server, `InferRequest._use_raw_outputs`): a request that sent raw
inputs gets `raw_output_contents`, as Triton always answers and tritonclient expects; a request with typed
contents gets typed contents back. An output with no typed field (FP16) makes the whole answer raw, because the
proto does not allow mixing the two.

Refusals are the cloud's errors: `Invalid` (INVALID_ARGUMENT) saying what was wrong and what to send instead,
`TooLarge` (RESOURCE_EXHAUSTED) past the element limit. BYTES tensors are refused: edgefleet's models take numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgefleet.cloud.errors import Invalid, TooLarge
from edgefleet.protos.oip import DATATYPES, NUMPY_TO_DATATYPE

_LE = {name: np.dtype(dtype).newbyteorder("<") for name, dtype in DATATYPES.items()}
# The InferTensorContents field that carries each datatype (the proto's comments); FP16 has none: raw only.
_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
          "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
           "fp64_contents", "bytes_contents")
_KNOWN = ", ".join(DATATYPES)


def decode_inputs(request: Any, *, max_elements: int) -> tuple[dict[str, np.ndarray], bool]:
    """The request's inputs as named arrays, and whether they came raw (then the answer is raw too)."""
    tensors = request.inputs
    raw = request.raw_input_contents
    if not tensors:
        raise Invalid("the request has no inputs; send each model input in 'inputs' (ModelMetadata lists them)")
    if raw and len(raw) != len(tensors):
        raise Invalid(f"the request has {len(raw)} raw_input_contents for {len(tensors)} inputs; send exactly one "
                      "bytes item per input, in the order of 'inputs'")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        where = f"input {name!r}" if name else f"inputs[{i}]"
        if not name:
            raise Invalid(f"{where} has no name; name every input as the model does (ModelMetadata lists them)")
        if name in out:
            raise Invalid(f"{where} is given twice; send each input once")
        datatype = tensor.datatype
        dtype = _LE.get(datatype)
        if dtype is None:
            extra = " (BYTES tensors are not supported: the models take numbers)" if datatype == "BYTES" else ""
            raise Invalid(f"{where}: unknown datatype {datatype!r}{extra}; use one of {_KNOWN}")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise Invalid(f"{where}: shape {shape} has a negative dimension; send the actual size of each one")
        count = math.prod(shape)  # exact: no int64 wrap for a hostile [2**40, 2**40]
        if count > max_elements:
            raise TooLarge(f"{where}: shape {shape} holds {count} elements, over the server's limit of "
                           f"{max_elements}; send fewer rows per request")
        if raw:
            if tensor.HasField("contents"):
                raise Invalid(f"{where} has typed contents in a request with raw_input_contents; send every input "
                              "one way, raw or typed, not both")
            array = _from_raw(raw[i], dtype, count, shape, where)
        else:
            array = _from_typed(tensor, datatype, dtype, count, shape, where)
        try:
            out[name] = array.reshape(shape)
        except ValueError as exc:  # a zero-size shape numpy cannot index, e.g. [0, 2**70]
            raise Invalid(f"{where}: shape {shape} is too large ({exc})") from None
    return out, bool(raw)


def _from_raw(data: bytes, dtype: np.dtype, count: int, shape: list[int], where: str) -> np.ndarray:
    if len(data) != count * dtype.itemsize:
        raise Invalid(f"{where}: raw_input_contents has {len(data)} bytes but shape {shape} of "
                      f"{NUMPY_TO_DATATYPE[dtype.newbyteorder('=').name]} needs {count * dtype.itemsize} "
                      f"({count} x {dtype.itemsize}); send the tensor's little-endian row-major bytes")
    array = np.frombuffer(data, dtype=dtype)
    if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
        raise Invalid(f"{where}: a BOOL byte is neither 0 nor 1; send one byte per element, 0 or 1")
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _from_typed(tensor: Any, datatype: str, dtype: np.dtype, count: int, shape: list[int], where: str) -> np.ndarray:
    field = _FIELD.get(datatype)
    contents = tensor.contents
    given = [f for f in _FIELDS if len(getattr(contents, f))]
    if field is None:  # FP16
        raise Invalid(f"{where}: {datatype} has no typed contents field in the protocol; send it in "
                      "raw_input_contents")
    wrong = [f for f in given if f != field]
    if wrong:
        raise Invalid(f"{where}: a {datatype} tensor's values go in contents.{field}, not {', '.join(wrong)}")
    values = getattr(contents, field)
    if len(values) != count:
        hint = " (or send raw_input_contents)" if not given else ""
        raise Invalid(f"{where}: contents.{field} has {len(values)} values but shape {shape} needs {count}{hint}")
    native = dtype.newbyteorder("=")
    if field in ("int_contents", "uint_contents") and native.itemsize < 4:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(native)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise Invalid(f"{where}: a value of contents.{field} is outside the range of {datatype} "
                          f"({info.min}..{info.max})")
        return wide.astype(native)
    return np.array(values, dtype=native)


def requested_outputs(request: Any) -> list[str] | None:
    names = [o.name for o in request.outputs]
    if not names:
        return None
    if not all(names):
        raise Invalid("a requested output has no name; name each output wanted, or request none to get all")
    return names


def fill_response(response: Any, outputs: dict[str, np.ndarray], *, raw: bool) -> None:
    """`outputs` into `response`: raw_output_contents when `raw` (or an output has no typed field), else typed."""
    datatypes = {}
    for name, array in outputs.items():
        datatype = NUMPY_TO_DATATYPE.get(array.dtype.name)
        if datatype is None:
            raise Invalid(f"output {name!r} has dtype {array.dtype.name}, which the protocol cannot carry; this "
                          "model cannot be served over OIP")
        datatypes[name] = datatype
    raw = raw or any(d not in _FIELD for d in datatypes.values())
    for name, array in outputs.items():
        tensor = response.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        if raw:
            response.raw_output_contents.append(_le_bytes(array))
        else:
            getattr(tensor.contents, _FIELD[datatypes[name]]).extend(array.ravel().tolist())


def _le_bytes(array: np.ndarray) -> bytes:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


_LITTLE = np.little_endian

__all__ = ["decode_inputs", "fill_response", "requested_outputs"]
