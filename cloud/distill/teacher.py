"""The teacher's outputs on the transfer set: computed once with ONNX Runtime, cached, and put in logit form.

Theory: knowledge distillation matches the student's softened distribution softmax(s/T) to the teacher's
softmax(t/T), which needs the teacher's logits t. Many exported classifiers (skl2onnx's `probabilities`, a Keras
softmax head) give probabilities p instead. Taking t = log(p + eps) loses nothing: softmax(log p) = p, so at
temperature T the targets are (p + eps)^(1/T) renormalised, the softening logits would give. The floor is needed
(a probability that underflowed to 0 would give -inf and an undefined KL) and kept tiny because temperature lifts
it: eps^(1/T) is the soft weight a "never" class gets, 0.018 for eps = 1e-7 at T = 4 but 0.001 for eps = 1e-12.
Detection in "auto" mode: the output's name says prob/softmax, or every value lies in [0, 1] and every row sums to
1 within 1e-3. The explanation travels to the report (`HOW_PROBABILITIES`).

The teacher runs in batches of 1024 rows (a teacher exported with a fixed batch size runs in chunks of that size,
the last one padded). The raw output is cached as .npy under `cache_dir`, keyed by sha256 over the teacher bytes,
the output name and the inputs, so a rebuild (another seed, other classes, another grid) skips the teacher.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edgefleet.cloud.distill.data import TeacherInfo, open_session
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.common.fsutil import staged_file

EPS = 1e-12  # float32 keeps p + 1e-12 exact enough for p >= 1e-6; log 1e-12 = -27.6
_ROW_SUM_TOL = 1e-3
_BATCH = 1024
HOW_PROBABILITIES = (
    "The teacher's output holds probabilities, not logits. They were turned into logits by log(p + 1e-12): "
    "softmax(log p) = p, so at temperature T the soft targets are p^(1/T) renormalised, the same softening that "
    "logits would give; the 1e-12 floor keeps a zero probability finite (log 1e-12 = -27.6) so the KL loss is "
    "defined, and stays below 1e-12^(1/T) (0.001 at T = 4) after softening."
)


@dataclass(frozen=True)
class TeacherOutputs:
    logits: np.ndarray  # (N, K) float32 logits for classification; (N, D) values for regression
    kind: Literal["logits", "probabilities", "values"]  # what the teacher emitted ("probabilities": converted)
    detected_by: str = "given"  # "given" (spec), "name", "values": how the kind was decided
    cache_hit: bool = False

    @property
    def n_out(self) -> int:
        return int(self.logits.shape[1])

    def how_probabilities_were_handled(self) -> str | None:
        if self.kind != "probabilities":
            return None
        why = {"name": "the output's name says so", "values": "its rows lie in [0, 1] and sum to 1",
               "given": "the spec says output_kind='probabilities'"}[self.detected_by]
        return f"{HOW_PROBABILITIES} Detected because {why}."


def _cache_key(teacher_bytes: bytes, x: np.ndarray, info: TeacherInfo) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(teacher_bytes).digest())
    h.update(f"{info.chosen_output}|{info.input_dtype}|{x.dtype}|{list(x.shape)}".encode())
    h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


def _run(teacher_bytes: bytes, x: np.ndarray, info: TeacherInfo) -> np.ndarray:
    out = run_outputs(teacher_bytes, x, info, [info.chosen_output])[info.chosen_output]
    return out.reshape(len(x), -1).astype(np.float32)


def run_outputs(teacher_bytes: bytes, x: np.ndarray, info: TeacherInfo,
                names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The teacher's raw outputs `names` (default: all) on `x`, as it gives them (dtype and shape), uncached."""
    names = [o.name for o in info.outputs] if names is None else list(names)
    session = open_session(teacher_bytes)
    batch = info.input_shape[0] if isinstance(info.input_shape[0], int) else _BATCH
    x = x.astype(info.input_dtype, copy=False)
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        rows = len(chunk)
        if rows < batch and isinstance(info.input_shape[0], int):
            # A fixed-batch teacher: pad the last chunk with copies of its first row, keep only the real rows.
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - rows, axis=0)])
        try:
            outs = session.run(names, {info.input_name: chunk})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types; usually a shape the graph refuses
            text = " ".join(str(exc).split())[:300]
            raise DistillInputError(f"the teacher failed on the transfer set ({text}); check that x matches what "
                                    "the teacher was trained on") from None
        parts.append([np.asarray(out)[:rows] for out in outs])
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def named_probabilities(name: str) -> bool:
    return "prob" in name.lower() or "softmax" in name.lower()


def looks_like_probabilities(values: np.ndarray) -> bool:
    if values.shape[1] < 2 or values.min() < 0 or values.max() > 1:
        return False
    return bool(np.all(np.abs(values.sum(axis=1) - 1.0) <= _ROW_SUM_TOL))


def teacher_outputs(teacher_bytes: bytes, x: np.ndarray, info: TeacherInfo, spec: DistillSpec,
                    cache_dir: Path | None) -> TeacherOutputs:
    raw, hit = None, False
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(teacher_bytes, x, info)}.npy"
        if path.is_file():
            try:
                raw = np.load(path, allow_pickle=False)
                hit = raw.shape[0] == len(x)
            except (OSError, ValueError):
                raw = None  # a torn cache file: recompute and overwrite it
            raw = raw if hit else None
    if raw is None:
        raw = _run(teacher_bytes, x, info)
        if path is not None:
            # Whole or absent, also when two workers compute the same key at once.
            with staged_file(path.parent, hint=path.name) as staged:
                np.save(staged.file, raw)
                staged.commit(path)

    bad = ~np.isfinite(raw)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise DistillInputError(f"the teacher produced NaN or infinite outputs on {len(rows)} rows (first rows: "
                                f"{rows[:5].tolist()}); check the inputs' scale or the teacher")
    if spec.task == "regression":
        return TeacherOutputs(raw, "values", "given", hit)
    if raw.shape[1] < 2:
        raise DistillInputError(f"teacher output {info.chosen_output!r} has one value per row; classification "
                                "needs K >= 2 logits or probabilities (use task='regression' for a single score)")
    kind, detected_by = "logits", "given"
    if spec.output_kind == "probabilities":
        kind = "probabilities"
    elif spec.output_kind == "auto":
        if named_probabilities(info.chosen_output) and raw.min() >= 0:
            kind, detected_by = "probabilities", "name"
        elif looks_like_probabilities(raw):
            kind, detected_by = "probabilities", "values"
        else:
            detected_by = "values"
    if kind == "probabilities":
        if raw.min() < 0:
            raise DistillInputError(f"output {info.chosen_output!r} was declared probabilities but holds negative "
                                    "values; set output_kind='logits'")
        logits = np.log(raw + EPS).astype(np.float32)
        return TeacherOutputs(logits, "probabilities", detected_by, hit)
    return TeacherOutputs(raw, "logits", detected_by, hit)


__all__ = ["EPS", "HOW_PROBABILITIES", "TeacherOutputs", "looks_like_probabilities", "named_probabilities",
           "run_outputs", "teacher_outputs"]
