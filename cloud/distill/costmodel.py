"""Cost model: predict a candidate's p95 latency, energy per inference and size on a device class from op counts.

Theory: a small model's single-sample latency on one device is a fixed per-call cost plus work divided by an
effective throughput,

    latency_ms = overhead_ms [+ int8_overhead_ms] + macs / (gmacs_per_s[precision] * 1e9) * 1e3
    p95_ms     = latency_ms * p95_factor
    mJ         = active_watts * latency_ms          (W x ms = mJ; idle power excluded, so "estimated")

The int8 path pays a fixed extra cost per call (quantize the input, dequantize the output, requantize between
operators ONNX Runtime could not fuse) and earns a higher throughput, so a very small model predicts slower in int8
than in fp32 and a larger one faster; that crossover is a property of the model, not a special case, and
tests/cloud/distill/test_costmodel.py checks it against ONNX Runtime on the build machine. Operation counts come
from onnx-tool when it can profile the graph, else from our own counter for Gemm/MatMul/Conv/ConvTranspose;
`OpCounts.counter` says which. A class's figures start from `DEFAULTS` below (kept here, keyed by class name, so
the foundation's catalog schema stays as it is) and are refit from fleet telemetry by `refit`, per row (per
inference): a batched request's latency is its fixed cost plus its rows' work, so batched and single-row windows fit
the same line, and the fitted latency is the telemetry's mean (what energy adds up from; p95 keeps `p95_factor`).
`refit_moves` names the figures a refit would move by more than `MAX_REFIT_FACTOR`, which a person confirms first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from edgefleet.protos.messages import DeviceClassInfo

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class OpCounts:
    macs: int  # multiply-accumulates per sample (batch 1)
    params: int
    bytes_moved: int  # weights read once + every activation written once and read once, per sample
    model_bytes: int
    counter: str  # "onnx-tool" or "edgefleet"


@dataclass(frozen=True)
class Calibration:
    device_class: str
    gmacs_per_s: dict[str, float]  # effective throughput per precision, single sample
    overhead_ms: float  # fixed cost per call (session run, input/output copies)
    active_watts: float
    idle_watts: float
    source: str
    samples: int = 0
    int8_overhead_ms: float = 0.0  # extra fixed cost per int8 call (QDQ at the edges, unfused requantization)
    p95_factor: float = 1.8  # p95 / median of single-sample runs


@dataclass(frozen=True)
class Prediction:
    p95_ms: float
    mj_per_inference: float
    size_mb: float
    latency_ms: float  # the median-like figure the energy is computed from
    energy_source: str = "estimated"


@dataclass(frozen=True)
class Observation:
    """A deployed variant's fleet telemetry per row (per inference), with the op counts its build recorded.

    `row_ms` and `row_mj` are means per row; `batch` is the mean rows per request, which spreads each request's
    fixed cost over its rows: row_ms = (overhead_ms + batch x macs / throughput) / batch. A request of 1,200 rows
    is 1,200 inferences here, never one slow one.
    """

    precision: Precision
    macs: int
    row_ms: float
    row_mj: float | None = None
    batch: float = 1.0
    rows: int = 0  # inferences behind the figures
    windows: int = 1  # telemetry windows behind the figures


@dataclass(frozen=True)
class Measured:
    p50_ms: float
    p95_ms: float
    threads: int  # 0: ONNX Runtime's default
    runs: int


# Per-class starting figures. Every figure is an assumption unless marked measured; refit() replaces them with fleet
# telemetry. Throughputs are *effective* single-sample figures for small models, far below peak.
DEFAULTS: dict[str, dict] = {
    # Measured on the build machine (AMD EPYC VM, 2 vCPUs, AVX2, ORT 1.32, 1 intra-op thread, median of 2000 runs)
    # over 4 MLPs (3.5k-1.1M MACs) and 4 DS-CNNs (155k-5.5M MACs): fp32 ~12 GMAC/s on Gemm chains and ~38 on
    # DS-CNNs -> 20; int8 QDQ ~33 and ~52 -> 40; per-call 0.011 ms; int8 extra 0.004 ms (MLP) to 0.02 ms
    # (DS-CNN) -> 0.01; p95/median 1.2-2.2 -> 1.8. fp16 on ORT CPU runs through Cast nodes and fp32 kernels
    # (measured about fp32 speed or slower) -> 15. See test_costmodel.py::test_x86_prediction_matches_measurement.
    "x86-cpu": dict(gmacs_per_s={"fp32": 20.0, "fp16": 15.0, "int8": 40.0}, overhead_ms=0.011,
                    int8_overhead_ms=0.01, p95_factor=1.8, source="measured on the build machine (ORT CPU)"),
    # Cortex-A72 @ 1.5 GHz, 4 cores: peak fp32 ~48 GFLOP/s (4 x 1.5 GHz x 8); public MobileNetV2 (300M MACs)
    # timings on a Pi 4 with TFLite/ORT are roughly 60-100 ms fp32 and half that int8 -> ~3 and ~6 GMAC/s. No fp16
    # arithmetic on A72: fp16 runs converted -> below fp32. Per-call overhead: Python + ORT on a slow core, assumed.
    "rpi4": dict(gmacs_per_s={"fp32": 3.0, "fp16": 2.0, "int8": 6.0}, overhead_ms=0.08, int8_overhead_ms=0.06,
                 p95_factor=1.8, source="assumed (public MobileNetV2 timings on Cortex-A72)"),
    # Cortex-A76 @ 2.4 GHz: about 2-3x a Pi 4 per public benchmarks (Raspberry Pi 5 launch material, community
    # TFLite runs); A76 has fp16 arithmetic and dot-product int8.
    "rpi5": dict(gmacs_per_s={"fp32": 8.0, "fp16": 8.0, "int8": 16.0}, overhead_ms=0.04, int8_overhead_ms=0.03,
                 p95_factor=1.8, source="assumed (about 2.5x rpi4)"),
    # Maxwell 128 CUDA cores, ~472 GFLOP/s fp16 peak (data sheet); small models cannot fill it and every call pays
    # a kernel-launch and copy cost of a few hundred microseconds (assumed 0.8 ms). No int8 tensor cores: int8 = fp16.
    "jetson-nano": dict(gmacs_per_s={"fp32": 25.0, "fp16": 50.0, "int8": 50.0}, overhead_ms=0.8,
                        int8_overhead_ms=0.2, p95_factor=1.5, source="assumed (data-sheet peak, small-model fill)"),
    # Ampere 1024 cores + tensor cores, ~20 dense int8 TOPS (40 sparse) per data sheet; effective small-model
    # throughput assumed at a few percent of peak; launch overhead assumed 0.4 ms.
    "jetson-orin-nano": dict(gmacs_per_s={"fp32": 100.0, "fp16": 250.0, "int8": 400.0}, overhead_ms=0.4,
                             int8_overhead_ms=0.1, p95_factor=1.5,
                             source="assumed (data-sheet peak, small-model fill)"),
}
# A user-defined class with no figures: a Cortex-A72-like core, scaled by core count (assumed, labelled so).
_GENERIC_PER_CORE = {"fp32": 0.75, "fp16": 0.5, "int8": 1.5}
# Runtimes: no measurement separates LiteRT (XNNPACK) from ORT CPU for these model sizes yet; assume equal.
RUNTIME_FACTOR = {"onnxruntime": 1.0, "litert": 1.0}


def default_calibration(cls: DeviceClassInfo) -> Calibration:
    figures = DEFAULTS.get(cls.name)
    if figures is None:
        return Calibration(cls.name, {p: g * cls.cores for p, g in _GENERIC_PER_CORE.items()}, 0.1,
                           cls.active_watts, cls.idle_watts,
                           f"assumed (no figures for class {cls.name!r}; generic per-core)", 0, 0.05)
    return Calibration(device_class=cls.name, active_watts=cls.active_watts, idle_watts=cls.idle_watts,
                       **{**figures, "gmacs_per_s": dict(figures["gmacs_per_s"])})


# The machine an emulating agent runs on is taken to be like the build machine: x86-cpu's measured figures.
EMULATION_REFERENCE = "x86-cpu"


def emulation_factor(onnx_bytes: bytes, input_shape: Sequence[int], cls: DeviceClassInfo, precision: str = "fp32",
                     runtime: str = "onnxruntime", cal: Calibration | None = None) -> float | None:
    """How many times longer the cost model predicts one sample of this model takes on `cls` (its calibration
    `cal`, default the class's figures) than on the build machine (`EMULATION_REFERENCE`'s measured figures): the
    slowdown an agent on such an x86 box applies to emulate the class (edge_agent/emulate.py). At least 1 (a
    faster class is not emulated), 2 decimals; None for a model the counter cannot read (several inputs, an
    operator neither counter knows) or a class with no figures of its own."""
    if cal is None and cls.name not in DEFAULTS:
        return None
    try:
        counts = count_ops(onnx_bytes, input_shape)
    except Exception:  # noqa: BLE001 - no count, no factor: the agent then runs at this machine's speed
        return None
    figures = DEFAULTS[EMULATION_REFERENCE]
    reference = Calibration(EMULATION_REFERENCE, active_watts=1.0, idle_watts=0.0,
                            **{**figures, "gmacs_per_s": dict(figures["gmacs_per_s"])})
    here = latency_ms(counts.macs, reference, precision)
    there = latency_ms(counts.macs, cal or default_calibration(cls), precision, runtime)
    return round(max(1.0, there / here), 2) if here > 0 else None


def latency_ms(macs: float, cal: Calibration, precision: str, runtime: str = "onnxruntime") -> float:
    extra = cal.int8_overhead_ms if precision == "int8" else 0.0
    work = macs / (cal.gmacs_per_s[precision] * 1e9) * 1e3
    return (cal.overhead_ms + extra + work) * RUNTIME_FACTOR.get(runtime, 1.0)


def predict(counts: OpCounts, cal: Calibration, precision: str, runtime: str = "onnxruntime",
            model_bytes: int | None = None) -> Prediction:
    """`model_bytes`: the variant's own size (an int8 or TFLite file), default the counted model's."""
    lat = latency_ms(counts.macs, cal, precision, runtime)
    size = counts.model_bytes if model_bytes is None else model_bytes
    return Prediction(p95_ms=lat * cal.p95_factor, mj_per_inference=cal.active_watts * lat,
                      size_mb=size / 1e6, latency_ms=lat)


def refit(cal: Calibration, observations: Sequence[Observation]) -> Calibration:
    """A new calibration from fleet telemetry, per row: per precision, least squares of a request's latency
    (row_ms x batch) on its work (macs x batch) when there are two or more distinct works, which gives the per-call
    overhead as the intercept and the throughput as the slope; else one scale on the predicted latency. Watts are
    mJ per row over ms per row (exact for the modelled meter, which charges active watts x busy time)."""
    if not observations:
        return cal
    gmacs = dict(cal.gmacs_per_s)
    intercepts: dict[str, float] = {}
    scales: list[float] = []
    for precision in sorted({o.precision for o in observations}):
        obs = [o for o in observations if o.precision == precision]
        macs = np.array([o.macs * max(o.batch, 1.0) for o in obs], dtype=np.float64)  # work per request
        lat = np.array([o.row_ms * max(o.batch, 1.0) for o in obs], dtype=np.float64)  # latency per request
        if len(set(macs.tolist())) >= 2:
            slope, intercept = np.polyfit(macs, lat, 1)
            if slope > 0 and intercept >= 0:
                gmacs[precision] = 1e3 / (slope * 1e9)
                intercepts[precision] = float(intercept)
                continue
        predicted = np.array([latency_ms(m, cal, precision) for m in macs])
        scales.append(float(np.median(lat / predicted)))
    scale = float(np.median(scales)) if scales else None
    overhead, int8_extra = cal.overhead_ms, cal.int8_overhead_ms
    base = next((p for p in ("fp32", "fp16") if p in intercepts), None)
    if base is not None:
        overhead = intercepts[base]
        if "int8" in intercepts:
            int8_extra = max(0.0, intercepts["int8"] - overhead)
    elif "int8" in intercepts:
        # Only int8 windows: keep the split between the two fixed costs, rescale their sum.
        total = cal.overhead_ms + cal.int8_overhead_ms
        ratio = intercepts["int8"] / total if total > 0 else 1.0
        overhead, int8_extra = cal.overhead_ms * ratio, cal.int8_overhead_ms * ratio
    if scale is not None:
        fitted = set(intercepts)
        gmacs = {p: (g if p in fitted else g / scale) for p, g in gmacs.items()}
        if not intercepts:
            overhead, int8_extra = overhead * scale, int8_extra * scale
    watts = [o.row_mj / o.row_ms for o in observations if o.row_mj is not None and o.row_ms > 0]
    active = float(np.median(watts)) if watts else cal.active_watts
    n = sum(o.windows for o in observations)
    return replace(cal, gmacs_per_s=gmacs, overhead_ms=float(overhead), int8_overhead_ms=float(int8_extra),
                   active_watts=active, source=f"fleet ({n} windows)", samples=n)


# 3x: the assumed per-class figures (DEFAULTS) come from public timings that agree within about 2x; a fit that moves
# a class further is likelier broken telemetry than a different device (one batched request counted as one
# inference once made rpi4 60x slower), so a person confirms it before any build predicts with it.
MAX_REFIT_FACTOR = 3.0


def refit_moves(current: Calibration, proposed: Calibration, max_factor: float = MAX_REFIT_FACTOR) -> list[str]:
    """Why `proposed` is too far from `current` to apply unconfirmed: one line per figure (the throughput of each
    precision, the active power) that moves by more than `max_factor` either way; empty when none does."""
    figures = [(f"{p} throughput", current.gmacs_per_s.get(p), proposed.gmacs_per_s.get(p), "GMAC/s",
                ("faster", "slower")) for p in sorted(set(current.gmacs_per_s) | set(proposed.gmacs_per_s))]
    figures.append(("active power", current.active_watts, proposed.active_watts, "W", ("higher", "lower")))
    out = []
    for what, old, new, unit, (up, down) in figures:
        if old is None or new is None or old <= 0 or new <= 0:
            continue
        factor = max(new / old, old / new)
        if factor > max_factor:
            out.append(f"{what} {old:.4g} -> {new:.4g} {unit}: {factor:.1f}x {up if new > old else down}, more than "
                       f"{max_factor:g}x")
    return out


def measure_here(onnx_bytes: bytes, x: np.ndarray, runs: int = 200, threads: int = 1, warmup: int = 20) -> Measured:
    """Single-sample latency on this machine with ONNX Runtime's CPU provider; `x` holds one or more samples with
    the batch axis first, fed one at a time in turn."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # In the model's input dtype: a student keeps its teacher's (float64, float16), the transfer set is float32.
    dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(session.get_inputs()[0].type, np.float32)
    samples = [np.ascontiguousarray(x[i:i + 1], dtype=dtype) for i in range(max(1, len(x)))]
    for i in range(warmup):
        session.run(None, {name: samples[i % len(samples)]})
    times = np.empty(runs)
    for i in range(runs):
        feed = {name: samples[i % len(samples)]}
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - start) * 1e3
    return Measured(float(np.median(times)), float(np.percentile(times, 95)), threads, runs)


def count_ops(onnx_bytes: bytes, input_shape: Sequence[int]) -> OpCounts:
    """Per-sample counts. `input_shape` is one sample's shape (batch axis left out) or the full shape."""
    import onnx

    model = _toposorted(onnx.load_from_string(onnx_bytes))
    graph_inputs = _graph_inputs(model)
    if len(graph_inputs) != 1:
        raise ValueError(f"count_ops expects one graph input, the model has {len(graph_inputs)}")
    rank = len(graph_inputs[0].type.tensor_type.shape.dim)
    shape = tuple(int(d) for d in input_shape)
    shape = shape if len(shape) == rank else (1,) + shape
    try:
        return _count_onnx_tool(model, graph_inputs[0].name, shape, len(onnx_bytes))
    except Exception:  # noqa: BLE001 - onnx-tool raises bare exceptions on operators it lacks; use our counter
        return _count_own(model, graph_inputs[0].name, shape, len(onnx_bytes))


__all__ = ["Calibration", "DEFAULTS", "EMULATION_REFERENCE", "MAX_REFIT_FACTOR", "Measured", "Observation",
           "OpCounts", "Prediction", "count_ops", "default_calibration", "emulation_factor", "latency_ms",
           "measure_here", "predict", "refit", "refit_moves"]


# ---------------------------------------------------------------------------------------------------------------
# Counting. Convention (onnx-tool's, which our counter follows for the ops it knows): one MAC per multiply-add of a
# Gemm/MatMul/Conv/ConvTranspose, plus one per output element for a bias. onnx-tool also counts elementwise ops
# (Relu, pooling: one per element); our counter ignores them, so its totals run a few percent lower. Quantize/
# DequantizeLinear and Cast are left out of both: ORT folds weight DQs into the QLinear kernels at load, and the
# per-call cost of the rest is in `int8_overhead_ms`, not in the MACs.
_SKIP = {"QuantizeLinear", "DequantizeLinear", "Cast"}


def _graph_inputs(model) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _toposorted(model):
    """The graph with nodes in dependency order; float16 conversion appends its input Casts at the end, which
    stops shape inference (and onnx-tool) at the first Gemm."""
    ready = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            break  # a cycle or a dangling input: leave the rest in place, the counters will say what fails
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in runnable]
    ordered += pending
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def _shapes(model, input_name: str, shape: tuple[int, ...]) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Tensor name -> static shape and -> element size in bytes, with the input fixed to `shape`."""
    import onnx
    from onnx import helper, shape_inference

    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]  # converters (float16) leave shapeless entries that inference would keep
    for graph_input in model.graph.input:
        if graph_input.name == input_name:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, shape):
                dim.ClearField("dim_param")
                dim.dim_value = size
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        dims = tuple(d.dim_value for d in tensor_type.shape.dim)
        if tensor_type.HasField("shape") and all(d > 0 for d in dims):
            shapes[info.name] = dims
            sizes[info.name] = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        sizes[init.name] = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return shapes, sizes


def _bytes_and_params(model, shapes, sizes) -> tuple[int, int]:
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    weights = sum(int(np.prod(t.dims)) * sizes[t.name] for t in model.graph.initializer)
    activations = sum(int(np.prod(shapes[o])) * sizes[o] for n in model.graph.node for o in n.output if o in shapes)
    first = _graph_inputs(model)[0].name
    return weights + int(np.prod(shapes.get(first, (0,)))) * sizes.get(first, 4) + 2 * activations, params


def _node_macs(node, shapes) -> int:
    """MACs of one Gemm/MatMul/Conv/ConvTranspose from static shapes; 0 for other ops."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = [shapes.get(name) for name in node.input]
    out = shapes.get(node.output[0])
    if out is None or any(s is None for s in ins[:2]):
        raise ValueError(f"no static shape around {node.op_type} {node.name!r}")
    bias = int(np.prod(out)) if len(node.input) > 2 and node.input[2] else 0
    if node.op_type == "Gemm":
        k = ins[0][0] if attrs.get("transA", 0) else ins[0][1]
        return int(np.prod(out)) * k + bias
    if node.op_type == "MatMul":
        return int(np.prod(out)) * ins[0][-1]
    if node.op_type == "Conv":
        weight = ins[1]  # (C_out, C_in / group, *kernel)
        return int(np.prod(out)) * int(np.prod(weight[1:])) + bias
    if node.op_type == "ConvTranspose":
        weight = ins[1]  # (C_in, C_out / group, *kernel): every input element is spread over C_out/g x kernel
        return int(np.prod(ins[0])) * int(np.prod(weight[1:])) + bias
    return 0


def _count_own(model, input_name: str, shape: tuple[int, ...], model_bytes: int) -> OpCounts:
    shapes, sizes = _shapes(model, input_name, shape)
    macs = sum(_node_macs(n, shapes) for n in model.graph.node if n.op_type not in _SKIP)
    moved, params = _bytes_and_params(model, shapes, sizes)
    return OpCounts(int(macs // shape[0]), params, moved // shape[0], model_bytes, "edgefleet")


def _count_onnx_tool(model, input_name: str, shape: tuple[int, ...], model_bytes: int) -> OpCounts:
    import contextlib
    import io

    import onnx_tool

    shapes, sizes = _shapes(model, input_name, shape)
    with contextlib.redirect_stdout(io.StringIO()):  # onnx-tool prints progress to stdout
        tool = onnx_tool.Model(model)
        tool.graph.shape_infer({input_name: np.zeros(shape, dtype=np.float32)})
        tool.graph.profile()
    if not tool.graph.valid_profile:
        raise ValueError("onnx-tool could not profile the graph")
    macs = sum(float(node.macs[0]) for node in tool.graph.nodemap.values() if node.op_type not in _SKIP)
    moved, params = _bytes_and_params(model, shapes, sizes)
    return OpCounts(int(round(macs / shape[0])), params, moved // shape[0], model_bytes, "onnx-tool")
