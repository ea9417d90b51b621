"""Train the digits TEACHER CNN with PyTorch and export it to ONNX, with the transfer set the students learn from.

Theory: scikit-learn's bundled digits (1797 grey 8x8 images, pixel values 0..16, 10 classes; no network) are split
once, stratified and seeded, into a transfer part (75 %) and a held-out part (25 %) that no model ever trains on.
They stay images, [N, 1, 8, 8], with the raw pixel values: the teacher scales them to [0, 1] in its first layer, so
its ONNX graph (and every student's, which standardise their input the same way) takes what an app would send. The
teacher is deliberately large for the task, a
three-block CNN (32-64-128 channels, about 2.5 M multiply-accumulates per image), because the point of the example
is what distillation can take out of a big model: the students the pipeline builds for small devices run at a
hundredth of that or less. Random one-pixel shifts augment training (digits are not centred exactly), AdamW with a
one-cycle schedule gets to 98-99 % held-out in a few seconds on two cores.

Outputs (all in --out DIR):
  teacher.onnx   opset 17, input `input` float32 [batch, 1, 8, 8], output `logits` float32 [batch, 10]; the batch
                 dimension is dynamic (exported with torch.onnx.export(..., dynamo=False), the TorchScript exporter)
  transfer.npz   x float32 [N, 1, 8, 8] in 0..16, y int64 [N]: the images the teacher trained on, with labels;
                 what `fleet distill --data` takes
  heldout.npz    x, y of the same kinds: the held-out images, for accuracy on devices and in the bench

    python examples/digits/teacher_cnn.py --out DIR        # or: from teacher_cnn import train_teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
HELDOUT_FRACTION = 0.25
EPOCHS = 20
BATCH = 64
LR = 3e-3
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17  # ONNX Runtime 1.14's ceiling: older device builds still load the graph
PIXEL_MAX = 16.0  # load_digits' pixel range is 0..16


def load_images(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_transfer, y_transfer, x_heldout, y_heldout): float32 [N, 1, 8, 8] in 0..16, int64 labels; stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=HELDOUT_FRACTION, random_state=seed, stratify=y)
    return x_tr, y_tr, x_ho, y_ho


def build_teacher(n_classes: int = 10):
    """x / 16, conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, pool -> 4x4, conv3x3(128)-BN-ReLU, pool -> 2x2, FC 256,
    FC 10."""
    from torch import nn

    class Scale(nn.Module):
        def forward(self, x):
            return x * (1.0 / PIXEL_MAX)

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        Scale(), *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 2 * 2, 256), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(256, n_classes),
    )


def _shift(xb, generator):
    """Shift each image by up to one pixel in each direction (zero fill): pad by one and crop at a random offset."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = xb.shape
    padded = F.pad(xb, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return torch.gather(out, 3, cols)


def fit(x: np.ndarray, y: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS, batch: int = BATCH,
        lr: float = LR):
    """Train a fresh teacher on (x, y) and return it in eval mode. Deterministic for a given seed on one machine."""
    import torch

    # One thread: two gain little on batches this small, and two collapse when another process holds a core
    # (OpenMP's spinning barriers: 2-12 s an epoch against 0.5 s, measured on the 2-core build machine).
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(x, y, seed, epochs, batch, lr)
    finally:
        torch.set_num_threads(saved_threads)


def _fit(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int, lr: float):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_teacher(int(y.max()) + 1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(xt) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(_shift(xt[idx], gen)), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def predict_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def export_onnx(model, path: Path, *, doc: str = "") -> bytes:
    """Opset 17, dynamic batch, one file. Returns the bytes written."""
    import io
    import warnings

    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter notice: dynamo=False is the choice (one file, opset 17)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = doc
    data = proto.SerializeToString()
    path.write_bytes(data)
    return data


def onnx_logits(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def train_teacher(out_dir: str | Path, *, seed: int = SEED, epochs: int = EPOCHS, limit: int | None = None) -> dict:
    """Fit, export and check the teacher; write teacher.onnx, transfer.npz and heldout.npz to out_dir.

    `limit` trains on the first `limit` transfer images only (tests). Returns {"model", "transfer", "heldout": paths,
    "accuracy": torch held-out accuracy, "onnx_accuracy", "max_abs_diff": ONNX vs torch logits, "n_transfer",
    "n_heldout", "params", "train_s", "opset"}.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_ho, y_ho = load_images(seed)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]

    t0 = time.monotonic()
    model = fit(x_tr, y_tr, seed=seed, epochs=epochs)
    train_s = time.monotonic() - t0
    logits = predict_logits(model, x_ho)
    accuracy = float((logits.argmax(1) == y_ho).mean())

    params = sum(p.numel() for p in model.parameters())
    doc = f"edgefleet digits teacher CNN: {params} parameters, seed {seed}, held-out accuracy {accuracy:.4f}"
    with torch.no_grad():
        onnx_bytes = export_onnx(model, out / "teacher.onnx", doc=doc)
    ort_logits = onnx_logits(onnx_bytes, x_ho)
    np.savez(out / "transfer.npz", x=x_tr, y=y_tr)
    np.savez(out / "heldout.npz", x=x_ho, y=y_ho)
    return {
        "model": str(out / "teacher.onnx"),
        "transfer": str(out / "transfer.npz"),
        "heldout": str(out / "heldout.npz"),
        "accuracy": accuracy,
        "onnx_accuracy": float((ort_logits.argmax(1) == y_ho).mean()),
        "max_abs_diff": float(np.abs(ort_logits - logits).max()),
        "n_transfer": int(len(y_tr)),
        "n_heldout": int(len(y_ho)),
        "params": int(params),
        "train_s": round(train_s, 2),
        "opset": OPSET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits teacher CNN; write teacher.onnx, transfer.npz, "
                                                 "heldout.npz.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"split and init seed (default {SEED})")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = train_teacher(args.out, seed=args.seed, epochs=args.epochs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"teacher CNN: held-out accuracy {result['accuracy']:.4f} (ONNX Runtime {result['onnx_accuracy']:.4f}, "
              f"max |diff| {result['max_abs_diff']:.1e}), {result['params']} parameters, trained in "
              f"{result['train_s']:.1f} s on {result['n_transfer']} images")
        print(f"wrote {result['model']}, {result['transfer']} and {result['heldout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
