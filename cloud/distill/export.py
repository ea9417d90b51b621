"""A trained student as one self-contained ONNX file that the fleet (and the artifacts module) can use.

Theory: the TorchScript exporter (`dynamo=False`) at opset 17, the ceiling of ONNX Runtime 1.14 (what older devices
run), with the batch dimension dynamic so one file serves batch 1 on a device and batch 4096 in a drift check. In
eval mode the exporter folds BatchNorm into the preceding convolution and constant-folds the input scaling, so the
graph holds only Conv/Gemm/Relu/pooling. The export is checked, not trusted: `onnx.checker` and an ONNX Runtime run
that must match the torch module within 1e-4 on a probe batch (a silent exporter bug would otherwise ship). The
weights are the only source of variation, so the same weights give the same bytes. This exports the student's trunk
(float32 in, raw logits or values out); `interface.export_student` wraps it in the teacher's interface (input name
and dtype, every output by name, dynamic dimensions), and that is what the pipeline ships.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import numpy as np

from edgefleet.cloud.errors import CloudError

OPSET = 17
# 1e-4 absolute on logits: float32 reassociation between torch and ORT kernels stays orders below this.
_MATCH_ATOL = 1e-4


def to_onnx(module, input_shape, input_name: str = "input", output_name: str = "logits",
            doc_string: str = "", dynamic_dims: Mapping[int, str] | None = None) -> bytes:
    """`input_shape` is batch first (its batch value is ignored); every other dimension must be fixed: it is the
    size the export traces and checks at. `dynamic_dims` (axis -> name, axes >= 1) stay dynamic in the graph: the
    conv families end in global pooling, so they take any size there (`interface` checks them at other sizes)."""
    import onnx
    import torch

    dims = list(input_shape)[1:]
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        raise CloudError(f"cannot export a student for input shape {list(input_shape)}: every non-batch dimension "
                         "must be fixed (take it from the transfer set)")
    module = module.eval()
    probe = torch.from_numpy(np.random.default_rng(0).standard_normal((2, *dims)).astype(np.float32))
    axes = {0: "batch", **{int(a): str(n) for a, n in (dynamic_dims or {}).items() if int(a) >= 1}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy-exporter notice is expected: dynamo=False is the choice (single file, no onnxscript needed).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (probe,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: axes, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = "edgefleet-distill"
    if doc_string:
        model.doc_string = doc_string
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CloudError(f"the exported student failed the ONNX checker: {exc}") from None
    data = model.SerializeToString()
    with torch.no_grad():
        expected = module(probe).numpy()
    got = run_onnx(data, probe.numpy())
    if got.shape != expected.shape or not np.allclose(got, expected, atol=_MATCH_ATOL, rtol=1e-4):
        worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        raise CloudError(f"the exported student disagrees with torch (max |diff| {worst:.2e}); not shipping it")
    return data


def run_onnx(data: bytes, x: np.ndarray, batch: int = 4096, output: str | None = None) -> np.ndarray:
    """One output of an ONNX model on `x` with ONNX Runtime on the CPU, in batches, one row per sample ([N]
    becomes [N, 1]): `output`, by default the one that carries the scores (`interface.scores_output`: the distilled
    logits, probabilities or values, never an integer label). `x` is cast to the model's input dtype (the student
    of a float64 teacher takes float64)."""
    import onnxruntime as ort

    from edgefleet.cloud.distill.interface import ORT_DTYPES, scores_output

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # checks, not benchmarks: one thread keeps them cheap and repeatable
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    arg = session.get_inputs()[0]
    output = output or scores_output(session)
    x = np.ascontiguousarray(x, dtype=ORT_DTYPES.get(arg.type, "float32"))
    out = np.concatenate([session.run([output], {arg.name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return out.reshape(len(out), -1)


__all__ = ["OPSET", "run_onnx", "to_onnx"]
