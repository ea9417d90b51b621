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


# ---- Teachers of our own making, one per input kind: bench/distill.py `families`, test_families, test_augment.
# Each builder is seeded and trains on one thread (tests and the bench run beside other jobs on two cores).


def fit_classifier(net, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 3e-3, batch: int = 64,
                   seed: int = 0, weight_decay: float = 1e-4):
    """Cross-entropy training with AdamW and a one-cycle schedule, one thread, seeded; returns `net` in eval mode."""
    import torch
    from torch import nn

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y.astype(np.int64))
        steps = epochs * ((len(xt) + batch - 1) // batch)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), batch):
                idx = order[i:i + batch]
                if len(idx) < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
                opt.step()
                sched.step()
        return net.eval()
    finally:
        torch.set_num_threads(saved)


SIGNAL_CLASSES = 6
SIGNAL_SHAPE = (2, 128)  # channels, samples


def signal_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 2-channel, 128-sample event classification task ([N, 2, 128] float32, 6 classes), hard enough that
    a small CNN tops out below 100 %: a 40-sample windowed event at a random place and amplitude, in drifting
    background noise of about the event's own strength. Classes: a slow burst (0.06 cycles/sample) on channel 0, a
    fast one (0.16) on channel 0, an up-chirp (0.04 to 0.2) on channel 0, the slow burst on both channels in
    antiphase, a square-wave burst on channel 1, no event."""
    rng = np.random.default_rng(seed)
    channels, length = SIGNAL_SHAPE
    y = rng.integers(0, SIGNAL_CLASSES, n)
    drift = np.cumsum(rng.normal(0.0, 0.05, (n, channels, length)), axis=2)
    drift -= drift.mean(axis=2, keepdims=True)
    x = drift + rng.normal(0.0, 0.3, (n, channels, length))
    span = 40
    tau = np.arange(span)
    window = np.hanning(span)
    starts = rng.integers(0, length - span, n)
    amps = rng.uniform(0.5, 1.3, n)
    phases = rng.uniform(0, 2 * np.pi, n)
    for i in range(n):
        s, a, ph = starts[i], amps[i], phases[i]
        slow = a * window * np.sin(2 * np.pi * 0.06 * tau + ph)
        part = slice(s, s + span)
        if y[i] == 0:
            x[i, 0, part] += slow
        elif y[i] == 1:
            x[i, 0, part] += a * window * np.sin(2 * np.pi * 0.16 * tau + ph)
        elif y[i] == 2:
            x[i, 0, part] += a * window * np.sin(2 * np.pi * (0.04 * tau + 0.5 * (0.16 / span) * tau ** 2) + ph)
        elif y[i] == 3:
            x[i, 0, part] += slow
            x[i, 1, part] -= slow
        elif y[i] == 4:
            x[i, 1, part] += a * window * np.sign(np.sin(2 * np.pi * 0.06 * tau + ph))
    return x.astype(np.float32), y.astype(np.int64)


def signal_teacher_net(width: int = 16):
    """Three 1-D convolutions (width, 2 width, 2 width channels; kernels 7, 5, 5; max-pool 2 after the first two),
    global average pooling, a linear head: about 360 k MACs on [2, 128] at width 16."""
    from torch import nn

    w2 = 2 * width
    return nn.Sequential(
        nn.Conv1d(SIGNAL_SHAPE[0], width, 7, padding=3), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(width, w2, 5, padding=2), nn.BatchNorm1d(w2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(w2, w2, 5, padding=2), nn.BatchNorm1d(w2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(w2, SIGNAL_CLASSES))


def signal_teacher(x: np.ndarray, y: np.ndarray, *, epochs: int = 20, seed: int = 0) -> bytes:
    """The 1-D CNN teacher trained on (x, y), as ONNX taking [N, 2, 128] and giving `logits`."""
    import torch

    torch.manual_seed(seed)
    net = fit_classifier(signal_teacher_net(), x, y, epochs=epochs, lr=5e-3, seed=seed)
    return torch_onnx(net, (1, *SIGNAL_SHAPE))


TABULAR_FEATURES, TABULAR_CLASSES = 20, 4


def tabular_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's make_classification: [N, 20] float32, 4 classes of 2 Gaussian clusters each, 10 informative
    and 4 redundant features, 1 % of labels flipped; no network, and as many rows as a test of accuracy needs."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=TABULAR_FEATURES, n_informative=10, n_redundant=4,
                               n_classes=TABULAR_CLASSES, n_clusters_per_class=2, class_sep=1.2, flip_y=0.01,
                               random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def mlp_teacher(x: np.ndarray, y: np.ndarray, *, hidden: tuple[int, ...] = (256, 256), epochs: int = 40,
                seed: int = 0) -> bytes:
    """A torch MLP (ReLU, dropout 0.1) on [N, F] raw features (standardised inside the graph), as ONNX `logits`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mean, std = torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0) + 1e-6)
    sizes = [x.shape[1], *hidden]
    layers: list = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.1)]
    body = nn.Sequential(*layers, nn.Linear(sizes[-1], int(y.max()) + 1))

    class Standardised(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
            self.body = body

        def forward(self, v):
            return self.body((v - self.mean) / self.std)

    net = fit_classifier(Standardised(), x, y, epochs=epochs, lr=3e-3, seed=seed)
    return torch_onnx(net, (1, x.shape[1]))


def digits_small_table(n_transfer: int = 150, n_teacher: int = 1200, seed: int = 0):
    """(x_teacher, y_teacher, x_transfer, y_transfer, x_test, y_test): digits as a table ([N, 64] pixel features),
    shuffled once (seeded); the teacher's `n_teacher` rows, of which the first `n_transfer` are all the user has to
    distil with, and the other 1797 - n_teacher rows as a test set that no model trains on."""
    x, y = digits()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:n_teacher], y[:n_teacher], x[:n_transfer], y[:n_transfer], x[n_teacher:], y[n_teacher:])


def gbm_teacher(x: np.ndarray, y: np.ndarray, seed: int = 0, trees: int = 100) -> bytes:
    """scikit-learn gradient boosting (`trees` of depth 3 per class) through skl2onnx: `label` int64 and
    `probabilities` float32."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import GradientBoostingClassifier

    clf = GradientBoostingClassifier(n_estimators=trees, random_state=seed).fit(x, y)
    onx = to_onnx(clf, initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
                  options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()
