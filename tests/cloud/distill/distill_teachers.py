"""Small teachers and transfer sets for the distillation tests: seconds to build, no network.

Digits (sklearn's bundled 8x8 set) stands for the real case. Teachers are exported with the exporters users have:
skl2onnx (label int64 + probabilities float32) and torch.onnx (logits); a hand-built graph covers the shapes no
framework makes on purpose (only an int64 output).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@lru_cache(maxsize=1)
def sklearn_teacher() -> bytes:
    """Logistic regression on digits through skl2onnx: outputs `label` (int64) and `probabilities` (float32)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = digits()
    clf = LogisticRegression(max_iter=300)
    pipe = make_pipeline(StandardScaler(), clf).fit(x, y)
    onx = to_onnx(pipe, initial_types=[("input", FloatTensorType([None, 64]))], options={id(clf): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def torch_onnx(module, example_shape, input_name="input", output_name="logits", dynamic=True) -> bytes:
    import torch

    buf = io.BytesIO()
    module.eval()
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(*example_shape),), buf, dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=[output_name], dynamic_axes=axes)
    return buf.getvalue()


@lru_cache(maxsize=16)
def torch_teacher(kind: str = "mlp", seed: int = 0, softmax: bool = False, dynamic: bool = True) -> bytes:
    """A briefly trained torch teacher on digits: "mlp" takes [N, 64], "cnn" [N, 1, 8, 8], "nhwc" [N, 8, 8, 1]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = digits()
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        shape, xs = (1, 64), x / 16
    elif kind == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
        shape, xs = (1, 1, 8, 8), x.reshape(-1, 1, 8, 8) / 16
    elif kind == "nhwc":
        class Nhwc(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(16 * 64, 10))

            def forward(self, v):
                return self.body(v.permute(0, 3, 1, 2))

        net, shape, xs = Nhwc(), (1, 8, 8, 1), x.reshape(-1, 8, 8, 1) / 16
    else:
        raise ValueError(kind)
    xt, yt = torch.from_numpy(xs), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):  # full-batch steps: ~95% train accuracy in well under a second
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()

    class Scaled(nn.Module):  # the teacher takes raw 0..16 pixels, as the real one does
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, v):
            out = self.net(v / 16)
            return torch.softmax(out, dim=1) if softmax else out

    return torch_onnx(Scaled(), shape, output_name="probs" if softmax else "logits", dynamic=dynamic)


def linear_teacher(in_shape, out_dim: int, seed: int = 0, output_name: str = "values") -> bytes:
    """A fixed random linear map from any input shape [N, ...] to [N, out_dim] (rank and regression tests)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    features = int(np.prod(in_shape[1:]))
    net = nn.Sequential(nn.Flatten(), nn.Linear(features, out_dim))
    return torch_onnx(net, in_shape, output_name=output_name)


def label_only_teacher() -> bytes:
    """[N, 64] float -> ArgMax -> `label` int64 [N]: no float output to distill."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["input"], ["label"], axis=1, keepdims=0)], "labels",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
