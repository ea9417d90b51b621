"""Small ONNX models built with onnx.helper for the artifact, cost-model, converter and LiteRT tests.

Built by hand rather than exported from torch so that every weight shape is known for the hand-computed MAC
counts and no test depends on the exporter. Dynamic batch ("N"), opset 17, float32, seeded He-style weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _weight(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(nodes, inits, in_shape, out_dim, name="input", out="logits") -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp(n_in=64, hidden=(32,), n_out=10, seed=0, bias=True) -> bytes:
    rng = np.random.default_rng(seed)
    nodes, inits, prev, width = [], {}, "input", n_in
    sizes = [*hidden, n_out]
    for i, size in enumerate(sizes):
        inits[f"w{i}"] = _weight(rng, (size, width), width)
        inputs = [prev, f"w{i}"]
        if bias:
            inits[f"b{i}"] = (rng.standard_normal(size) * 0.1).astype(np.float32)
            inputs.append(f"b{i}")
        out = "logits" if i == len(sizes) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", inputs, [out], transB=1))
        if i < len(sizes) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
        width = size
    return _model(nodes, inits, [n_in], n_out)


def matmul(n_in=64, n_out=32, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["logits"])]
    return _model(nodes, {"w": _weight(rng, (n_in, n_out), n_in)}, [n_in], n_out)


def dscnn(channels=16, hw=28, n_out=10, seed=0) -> bytes:
    """Conv 3x3/2 (1->c), depthwise 3x3, pointwise (c->2c), depthwise 3x3, pointwise, global pool, Gemm."""
    rng = np.random.default_rng(seed)
    c, c2 = channels, 2 * channels
    inits = {"w0": _weight(rng, (c, 1, 3, 3), 9), "b0": np.zeros(c, np.float32),
             "w1": _weight(rng, (c, 1, 3, 3), 9), "b1": np.zeros(c, np.float32),
             "w2": _weight(rng, (c2, c, 1, 1), c), "b2": np.zeros(c2, np.float32),
             "w3": _weight(rng, (c2, 1, 3, 3), 9), "b3": np.zeros(c2, np.float32),
             "w4": _weight(rng, (c2, c2, 1, 1), c2), "b4": np.zeros(c2, np.float32),
             "wf": _weight(rng, (n_out, c2), c2), "bf": np.zeros(n_out, np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c2),
        helper.make_node("Conv", ["c3", "w4", "b4"], ["c4"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("GlobalAveragePool", ["r4"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    return _model(nodes, inits, [1, hw, hw], n_out)


def dscnn_macs(channels=16, hw=28, n_out=10) -> int:
    """Hand count (onnx-tool's convention: bias adds one MAC per output element) of `dscnn`'s matmul-like ops."""
    c, c2, s = channels, 2 * channels, (hw + 1) // 2
    conv0 = s * s * c * 9 + s * s * c
    dw1 = s * s * c * 9 + s * s * c
    pw2 = s * s * c2 * c + s * s * c2
    dw3 = s * s * c2 * 9 + s * s * c2
    pw4 = s * s * c2 * c2 + s * s * c2
    return conv0 + dw1 + pw2 + dw3 + pw4 + c2 * n_out + n_out


def single_conv(c_in, c_out, k, group, hw=28, transpose=False) -> bytes:
    rng = np.random.default_rng(0)
    op = "ConvTranspose" if transpose else "Conv"
    shape = (c_in, c_out // group, k, k) if transpose else (c_out, c_in // group, k, k)
    pad = 0 if transpose else k // 2
    out_hw = hw + k - 1 if transpose else hw
    nodes = [helper.make_node(op, ["input", "w"], ["y"], kernel_shape=[k, k], group=group, pads=[pad] * 4),
             helper.make_node("Flatten", ["y"], ["logits"])]
    return _model(nodes, {"w": _weight(rng, shape, c_in * k * k)}, [c_in, hw, hw], c_out * out_hw * out_hw)


def samples(shape, n=256, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def tflite_or_skip(onnx_bytes: bytes, calib_x, work, precision: str):
    """A real .tflite from the converter venv (see `converter_or_skip`)."""
    return converter_or_skip().convert(onnx_bytes, calib_x, work, precision=precision)


def converter_or_skip():
    """The converter venv, built on first use.

    A venv that cannot be built fails the test: a skip would hide a broken converter. On a machine with no package
    index, set EDGEFLEET_SKIP_TFLITE=1 to skip these tests on purpose (the reason is printed).
    """
    import os

    import pytest

    from edgefleet.cloud.distill.converter import ConverterEnv
    from edgefleet.cloud.distill.errors import ConverterUnavailable

    env = ConverterEnv()
    try:
        env.ensure()
    except ConverterUnavailable as exc:
        if os.environ.get("EDGEFLEET_SKIP_TFLITE") == "1":
            pytest.skip(f"EDGEFLEET_SKIP_TFLITE=1 and the converter venv is unavailable: {exc.message.splitlines()[0]}")
        raise
    return env
