"""Train the digits TEACHER and export it to ONNX: the model that the demo pushes, distils and deploys.

Theory: scikit-learn's bundled 8x8 digits (1797 images, 64 features in 0..16, 10 classes; no network) split once
with a fixed seed into train and held-out parts. A small MLP (hidden 128, 64) learns on the scaled features; the
scaler and the MLP form one pipeline, so the ONNX graph takes raw pixel values. skl2onnx exports it with zipmap
off, so the outputs are plain tensors (`label` int64 [N], `probabilities` float32 [N, 10]) that any ONNX Runtime
and the OIP API can carry, at opset <= 17 so ONNX Runtime builds on older devices (1.14+) load it. The held-out
set is saved next to the model (`heldout.npz`: X float32 [N, 64], y int64 [N]) for accuracy checks on devices.

    python examples/digits/train.py --out DIR        # or: from train import train; train(DIR)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SEED = 0
HELDOUT_FRACTION = 0.25
HIDDEN = (128, 64)
# Opset 17 is ONNX Runtime 1.14's ceiling (2023); ai.onnx.ml 3 is what skl2onnx pairs with it.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
INPUT_NAME = "input"


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_heldout, y_train, y_heldout): float32 features, int64 labels, stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(
        X.astype(np.float32), y.astype(np.int64), test_size=HELDOUT_FRACTION, random_state=seed, stratify=y
    )


def train(out_dir: str | Path, *, seed: int = SEED, max_iter: int = 300) -> dict:
    """Fit, export and check. Returns {"model": path, "heldout": path, "accuracy": float, "onnx_accuracy": float,
    "n_train": int, "n_heldout": int, "opset": int}."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    X_train, X_held, y_train, y_held = load_split(seed)

    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=max_iter, random_state=seed, early_stopping=False)
    pipe = make_pipeline(StandardScaler(), clf)
    pipe.fit(X_train, y_train)
    accuracy = float((pipe.predict(X_held) == y_held).mean())

    onx = to_onnx(
        pipe,
        initial_types=[(INPUT_NAME, FloatTensorType([None, X_train.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    onx.doc_string = f"edgefleet digits teacher: MLP {HIDDEN}, seed {seed}, held-out accuracy {accuracy:.4f}"
    model_path = out / "model.onnx"
    model_path.write_bytes(onx.SerializeToString())
    heldout_path = out / "heldout.npz"
    np.savez(heldout_path, X=X_held, y=y_held)

    onnx_accuracy = _onnx_accuracy(model_path, X_held, y_held)
    opset = max(o.version for o in onx.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "model": str(model_path),
        "heldout": str(heldout_path),
        "accuracy": accuracy,
        "onnx_accuracy": onnx_accuracy,
        "n_train": int(len(y_train)),
        "n_heldout": int(len(y_held)),
        "opset": int(opset),
    }


def _onnx_accuracy(model_path: Path, X: np.ndarray, y: np.ndarray) -> float:
    """The exported graph, run by ONNX Runtime: proves the export matches the sklearn model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    label, probabilities = sess.run(["label", "probabilities"], {INPUT_NAME: X})
    assert label.dtype == np.int64 and probabilities.dtype == np.float32, (label.dtype, probabilities.dtype)
    return float((label == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits teacher and export model.onnx + heldout.npz.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"split and init seed (default {SEED})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = train(args.out, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"held-out accuracy {result['accuracy']:.4f} (ONNX Runtime {result['onnx_accuracy']:.4f}, "
              f"{result['n_heldout']} samples, opset {result['opset']})")
        print(f"wrote {result['model']} and {result['heldout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
