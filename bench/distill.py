"""Distillation on digits: what each class's student costs and keeps of the teacher, and what distillation adds.

    .venv/bin/python bench/distill.py [--json] [--quick] [--seeds 3]

Trains the teacher CNN (examples/digits/teacher_cnn.py), runs the product's pipeline (cloud/distill/pipeline.py;
the spec's defaults but learning rate 1e-2 and patience 20, see `run`) for rpi4, jetson-orin-nano and x86-cpu, and
scores on the 450 held-out digits that neither the teacher nor any student saw. Two comparisons, as Hinton et al.
(2015) made theirs:

  all labels      the chosen student's architecture trained on the hard labels alone (`train_labels_only`), on
                  the same training/validation rows as the distilled one;
  limited labels  labels on a seeded 10 % of the transfer set only. Labels-only trains on that 10 %; distillation
                  uses the teacher's soft targets on all of it plus those labels (labels-only gets as many optimizer
                  steps: ten times the epochs and patience over a tenth of the rows).
                  gap_recovered = (distilled - labels_only) / (teacher - labels_only), averaged over `--seeds` draws
                  of the labelled 10 % (and training seeds).

Families (`families`, one entry per input kind, each with a teacher of our own making from
tests/cloud/distill/distill_teachers.py): tabular [N, 20] (an MLP teacher on scikit-learn's make_classification,
2500 transfer rows, 1500 test rows), signal [N, 2, 128] (a three-layer 1-D CNN on a synthetic event task, 2000
transfer, 1000 test) and image [N, 1, 8, 8] (the digits teacher CNN above, 450 held-out digits). Each is distilled
for x86-cpu with the same training spec; every candidate is scored on the test rows, and `best_within_1pt` is the
fewest-MACs candidate within 1.0 point of the teacher's accuracy there (None if none), `by_family` the same per
family. `augmentation`: a 150-row table (digits as pixel features, a gradient-boosting teacher fitted on 1200 rows)
distilled with and without the synthetic rows of cloud/distill/augment.py, scored on the 597 other rows.

Latency: the median of many single-sample ONNX Runtime runs on this CPU after a warm-up, one intra-op thread
(`costmodel.measure_here`), for the fp32 graph and its int8 QDQ variant (`artifacts.make_int8`). MACs and
parameters come from `costmodel.count_ops`. Progress goes to stderr; `--json` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT))  # the teachers of our own making live with the tests that use them too

import teacher_cnn  # noqa: E402

from edgefleet.cloud.catalog import load_catalog  # noqa: E402
from edgefleet.cloud.distill import artifacts, augment, costmodel  # noqa: E402
from edgefleet.cloud.distill.data import Split, TransferSet  # noqa: E402
from edgefleet.cloud.distill.data import split as split_rows  # noqa: E402
from edgefleet.cloud.distill.export import run_onnx, to_onnx  # noqa: E402
from edgefleet.cloud.distill.families import candidates_for  # noqa: E402
from edgefleet.cloud.distill.pipeline import run_distillation  # noqa: E402
from edgefleet.cloud.distill.spec import DistillSpec  # noqa: E402
from edgefleet.cloud.distill.teacher import TeacherOutputs  # noqa: E402
from edgefleet.cloud.distill.train import train_labels_only, train_student  # noqa: E402
from tests.cloud.distill import distill_teachers as made  # noqa: E402

CLASSES = ("rpi4", "jetson-orin-nano", "x86-cpu")
LABELLED_SHARE = 0.10
SHAPE = [1, 8, 8]  # one sample, batch excluded
WITHIN = 0.01  # "within 1 point" of the teacher's accuracy


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Scorer:
    """Accuracy, agreement, counts and latency of ONNX models on the held-out digits."""

    def __init__(self, x_held: np.ndarray, y_held: np.ndarray, teacher_logits: np.ndarray, calib: np.ndarray,
                 runs: int, warmup: int):
        self.x, self.y, self.t_pred = x_held, y_held, teacher_logits.argmax(1)
        self.calib, self.runs, self.warmup = calib, runs, warmup

    def latency_us(self, onnx_bytes: bytes) -> float:
        m = costmodel.measure_here(onnx_bytes, self.x[:64], runs=self.runs, threads=1, warmup=self.warmup)
        return round(m.p50_ms * 1e3, 2)

    def figures(self, onnx32: bytes, shipped: bytes | None = None, precision: str = "fp32",
                shipped_output=None) -> dict:
        pred = run_onnx(onnx32, self.x).argmax(1)
        counts = costmodel.count_ops(onnx32, SHAPE)
        int8 = artifacts.make_int8(onnx32, self.calib)
        fig = {
            "accuracy": float((pred == self.y).mean()),
            "agreement": float((pred == self.t_pred).mean()),
            "params": int(counts.params),
            "macs": int(counts.macs),
            "bytes": len(shipped if shipped is not None else onnx32),
            "bytes_fp32": len(onnx32),
            "latency_fp32_us": self.latency_us(onnx32),
            "latency_int8_us": self.latency_us(int8),
            "precision_shipped": precision,
        }
        if shipped_output is not None:
            fig["accuracy_shipped"] = float((shipped_output.argmax(1) == self.y).mean())
        return fig


def limited_labels(x: np.ndarray, y: np.ndarray, targets: TeacherOutputs, cand, spec: DistillSpec,
                   scorer: Scorer, seed: int) -> dict:
    """One draw of the limited-label case: (labels-only on the labelled 10 %, distilled on all rows) accuracy."""
    rng = np.random.default_rng(1000 + seed)
    n = len(x)
    labelled = np.sort(rng.choice(n, size=int(round(n * LABELLED_SHARE)), replace=False))
    s = DistillSpec(**{**spec.to_dict(), "seed": seed, "classes": spec.classes})

    def train_val(idx: np.ndarray) -> Split:
        order = np.random.default_rng(seed).permutation(idx)
        n_val = max(2, int(round(len(idx) * spec.val_fraction)))
        return Split(np.sort(order[n_val:]), np.sort(order[:n_val]), np.empty(0, np.int64))

    # The same number of optimizer steps as the distilled student gets: ten times the epochs (and patience) over a
    # tenth of the rows. With the spec's 60 epochs a 135-image run would stop after ~120 steps, a strawman.
    scale = 1.0 / LABELLED_SHARE
    s_lo = DistillSpec(**{**s.to_dict(), "classes": s.classes, "max_epochs": int(s.max_epochs * scale),
                          "patience": int(s.patience * scale)})
    base = train_labels_only(cand, x, y, train_val(labelled), s_lo, n_out=targets.n_out)
    # The distilled student sees the teacher's soft targets on every row plus the same 10 % of labels (the other
    # rows are marked -1, unlabelled), as in Hinton et al.'s limited-data experiment.
    y_part = np.full(n, -1, dtype=np.int64)
    y_part[labelled] = y[labelled]
    distilled = train_student(cand, TransferSet(x, y_part), targets, train_val(np.arange(n)), s)
    out = {}
    for name, trained in (("labels_only", base), ("distilled", distilled)):
        onnx_bytes = to_onnx(trained.module, [None, *SHAPE])
        out[name] = float((run_onnx(onnx_bytes, scorer.x).argmax(1) == scorer.y).mean())
    out["n_labelled"] = int(len(labelled))
    return out


def run(quick: bool, seeds: int) -> dict:
    started = time.perf_counter()
    # The spec's defaults but for the learning rate and patience: at 3e-3 and patience 8 the small DS-CNNs stop while
    # still improving (dscnn2d-w0.5-d2: 95.1 % held-out; 98.0 % at 1e-2 and patience 20, measured here). Both the
    # distilled and the labels-only students train with this spec. augment "on": the 1347 digits are above the
    # "auto" threshold, but the teacher-labelled mixup, shifts and noise are what take the small MLPs within a point
    # of the teacher (cloud/distill/augment.py: 96.4 % -> 98.9-99.1 % for the 9k-MAC MLP, 3 seeds).
    spec = DistillSpec(classes=CLASSES, learning_rate=1e-2, patience=10 if quick else 20,
                       max_epochs=40 if quick else 120, max_candidates=4 if quick else 6, augment="on")
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-distill-") as tmp:
        work = Path(tmp)
        log("training the teacher CNN ...")
        teacher = teacher_cnn.train_teacher(work / "teacher", epochs=10 if quick else teacher_cnn.EPOCHS)
        log(f"  {teacher['accuracy']:.4f} held-out in {teacher['train_s']:.1f} s")
        teacher_bytes = Path(teacher["model"]).read_bytes()
        transfer, held = np.load(teacher["transfer"]), np.load(teacher["heldout"])
        x, y, x_held, y_held = transfer["x"], transfer["y"], held["x"], held["y"]

        log("running the distillation pipeline ...")
        last = [""]

        def progress(stage: str, fraction: float) -> None:
            if stage != last[0] and not stage.startswith("train"):
                log(f"  {time.perf_counter() - started:5.1f} s  {fraction:4.0%}  {stage}")
            last[0] = stage

        # The held-out digits are the test set (rows neither the teacher nor a student trained on): the pipeline ranks
        # candidates on them, as the scores below do.
        result = run_distillation(teacher_bytes, work / "teacher" / "transfer.npz", spec, load_catalog(None), {},
                                  work / "pipeline", progress=progress, model_name="digits",
                                  test_npz=work / "teacher" / "heldout.npz")
        report = result.report
        teacher_logits = run_onnx(teacher_bytes, x_held)
        scorer = Scorer(x_held, y_held, teacher_logits, x[:256], runs=300 if quick else 2000,
                        warmup=50 if quick else 200)

        log("scoring the teacher and each class's student on the held-out digits ...")
        out: dict = {"teacher": scorer.figures(teacher_bytes), "students": {}, "labels_only": {}}
        cand_by_id = {c.id: c for c in candidates_for([None, *SHAPE], 10, spec.max_candidates)}
        parts = split_rows(len(x), spec)  # the pipeline's own split: same rows for the labels-only baseline
        baselines: dict[str, dict] = {}
        for name in CLASSES:
            chosen = result.chosen.get(name)
            if chosen is None:
                log(f"  {name}: no student fits ({report.classes[name].reason})")
                continue
            v = chosen.variant
            shipped_out = artifacts.run_variant(v, x_held)
            fig = scorer.figures(chosen.fp32_onnx, v.data, v.precision, shipped_out)
            cr = report.classes[name]
            fig["candidate"] = chosen.candidate
            fig["why_precision"] = cr.chosen.precision_reason
            fig["objective"] = cr.objective
            fig["teacher_is_best"] = cr.teacher_is_best
            for rule, pick in (("chosen_by_efficiency", cr.chosen_by_efficiency),
                               ("chosen_by_accuracy", cr.chosen_by_accuracy)):
                fig[rule] = None if pick is None else {
                    "name": pick.candidate, "accuracy": pick.score, "macs": pick.macs,
                    "predicted_mj": pick.predicted_mj, "predicted_p95_ms": pick.predicted_p95_ms}
            out["students"][name] = fig
            if chosen.candidate == "teacher":
                continue  # the teacher's own variant shipped: no student to train on labels alone
            if chosen.candidate not in baselines:
                log(f"  labels-only {chosen.candidate} (all labels) ...")
                trained = train_labels_only(cand_by_id[chosen.candidate], x, y, parts, spec, n_out=10)
                baselines[chosen.candidate] = {**scorer.figures(to_onnx(trained.module, [None, *SHAPE])),
                                               "candidate": chosen.candidate}
            out["labels_only"][name] = baselines[chosen.candidate]

        out["candidates"] = {}
        for cid, onnx32 in result.students.items():
            pred = run_onnx(onnx32, x_held).argmax(1)
            counts = costmodel.count_ops(onnx32, SHAPE)
            out["candidates"][cid] = {"accuracy": float((pred == y_held).mean()),
                                      "agreement": float((pred == teacher_logits.argmax(1)).mean()),
                                      "macs": int(counts.macs), "params": int(counts.params)}

        # The rpi4 student (or, where the teacher shipped there, the best student for rpi4) for the limited-labels draw.
        rpi4 = max(report.classes["rpi4"].candidates, key=lambda c: c.score)
        shipped = report.classes["rpi4"].chosen
        cand = cand_by_id[shipped.candidate if shipped is not None and shipped.family != "teacher" else rpi4.candidate]
        targets = TeacherOutputs(run_onnx(teacher_bytes, x), "logits")
        draws = []
        for seed in range(seeds):
            log(f"  limited labels, seed {seed}: {cand.id} on 10 % labels vs distilled on all rows ...")
            draws.append(limited_labels(x, y, targets, cand, spec, scorer, seed))
        t_acc = out["teacher"]["accuracy"]
        lo = float(np.mean([d["labels_only"] for d in draws]))
        di = float(np.mean([d["distilled"] for d in draws]))
        out["limited_labels"] = {
            "teacher_accuracy": t_acc, "labels_only_accuracy": lo, "distilled_accuracy": di,
            "gap_recovered": (di - lo) / (t_acc - lo) if t_acc != lo else None,
            "student": cand.id, "labelled_share": LABELLED_SHARE, "n_labelled": draws[0]["n_labelled"],
            "n_transfer": int(len(x)), "seeds": seeds, "per_seed": draws,
            "distilled_uses": "teacher soft targets on every transfer row plus the same labelled 10 %",
        }
        out["setup"] = {
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "threads": 1, "latency": f"median of {scorer.runs} single-sample ORT runs after {scorer.warmup} warm-up",
            "n_transfer": int(len(x)), "n_heldout": int(len(x_held)), "teacher_train_s": teacher["train_s"],
            "n_synthetic": augment.synthetic_count(len(x), len(parts.train_idx), spec)[0],
            "pipeline_split": {"train": len(parts.train_idx), "val": len(parts.val_idx),
                               "heldout": len(parts.heldout_idx)},
            "spec": {k: v for k, v in spec.to_dict().items() if k != "budgets"}, "quick": quick,
        }
        family_spec = DistillSpec(**{**spec.to_dict(), "classes": ("x86-cpu",), "budgets": {}, "augment": "auto"})
        image = family_entry("image", "the digits teacher CNN (examples/digits/teacher_cnn.py), [N, 1, 8, 8]",
                             out["teacher"]["macs"], out["teacher"]["accuracy"], len(y_held),
                             [{"name": cid, **f} for cid, f in out["candidates"].items()],
                             out["setup"]["n_synthetic"])
        out["families"] = [*measure_made_kinds(family_spec, quick, work), image]
        out["augmentation"] = measure_augmentation(quick, work)
        out["setup"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        return out


def best_within(cands: list[dict], teacher_accuracy: float) -> dict | None:
    """The fewest-MACs candidate whose accuracy is within `WITHIN` of the teacher's (ties: the more accurate)."""
    near = [c for c in cands if c["accuracy"] >= teacher_accuracy - WITHIN - 1e-9]
    return min(near, key=lambda c: (c["macs"], -c["accuracy"])) if near else None


def family_entry(kind: str, teacher: str, teacher_macs: int, teacher_accuracy: float, n_test: int,
                 cands: list[dict], n_synthetic: int = 0) -> dict:
    def brief(c: dict | None) -> dict | None:
        if c is None:
            return None
        return {"name": c["name"], "macs": int(c["macs"]), "accuracy": c["accuracy"],
                "mac_ratio": round(teacher_macs / c["macs"], 1)}

    families = sorted({c["name"].split("-")[0] for c in cands})
    return {"kind": kind, "teacher": teacher, "teacher_macs": int(teacher_macs), "teacher_accuracy": teacher_accuracy,
            "n_test": n_test, "n_synthetic": n_synthetic,
            "best_within_1pt": brief(best_within(cands, teacher_accuracy)),
            "by_family": {f: brief(best_within([c for c in cands if c["name"].startswith(f + "-")],
                                               teacher_accuracy)) for f in families},
            "candidates": [brief(c) for c in sorted(cands, key=lambda c: c["macs"])]}


def distil_and_score(kind: str, teacher_bytes: bytes, x, y, x_test, y_test, spec: DistillSpec, work: Path) -> list:
    """Every candidate the pipeline builds for x86-cpu, scored on the test rows: [{name, macs, accuracy}]."""
    result = run_distillation(teacher_bytes, made.npz_bytes(x=x, y=y), spec, load_catalog(None), {}, work / kind,
                              model_name=kind, measure_classes=())
    shape = list(x.shape[1:])
    return [{"name": cid, "macs": int(costmodel.count_ops(onnx, shape).macs),
             "accuracy": float((run_onnx(onnx, x_test).argmax(1) == y_test).mean())}
            for cid, onnx in result.students.items()]


def measure_made_kinds(spec: DistillSpec, quick: bool, work: Path) -> list[dict]:
    """The tabular and signal teachers of our own making, distilled with `spec` and scored on their test rows."""
    entries = []
    x, y = made.tabular_task(4000)
    cases = [("tabular", "an MLP 20-256-256-4 on make_classification, [N, 20]", x[:2500], y[:2500], x[2500:],
              y[2500:], lambda xt, yt: made.mlp_teacher(xt, yt, epochs=20 if quick else 40))]
    x, y = made.signal_task(3000)
    cases.append(("signal", "a 3-layer 1-D CNN (16-32-32 channels) on a synthetic 6-class event task, "
                            "[N, 2, 128]", x[:2000], y[:2000], x[2000:], y[2000:],
                  lambda xt, yt: made.signal_teacher(xt, yt, epochs=10 if quick else 20)))
    for kind, words, x_tr, y_tr, x_te, y_te, build in cases:
        log(f"families: training the {kind} teacher and distilling it ...")
        teacher_bytes = build(x_tr, y_tr)
        teacher_acc = float((run_onnx(teacher_bytes, x_te).argmax(1) == y_te).mean())
        teacher_macs = int(costmodel.count_ops(teacher_bytes, list(x_tr.shape[1:])).macs)
        cands = distil_and_score(kind, teacher_bytes, x_tr, y_tr, x_te, y_te, spec, work)
        entries.append(family_entry(kind, words, teacher_macs, teacher_acc, len(y_te), cands))
    return entries


def measure_augmentation(quick: bool, work: Path) -> dict:
    """A 150-row table distilled with augment off and auto (the default), every candidate on the 597 test rows."""
    log("augmentation: 150 rows of a table, with and without synthetic rows ...")
    x_fit, y_fit, x, y, x_test, y_test = made.digits_small_table(150)
    teacher_bytes = made.gbm_teacher(x_fit, y_fit, trees=50)
    out: dict = {"teacher": "gradient boosting (50 trees per class, skl2onnx) fitted on 1200 rows",
                 "teacher_accuracy": float((run_onnx(teacher_bytes, x_test).argmax(1) == y_test).mean()),
                 "n_transfer": int(len(x)), "n_test": int(len(x_test))}
    for mode in ("off", "auto"):
        spec = DistillSpec(classes=("x86-cpu",), augment=mode, max_candidates=4 if quick else 6)
        n_train = len(split_rows(len(x), spec).train_idx)
        accs = {c["name"]: c["accuracy"] for c in distil_and_score(f"augment-{mode}", teacher_bytes, x, y, x_test,
                                                                   y_test, spec, work)}
        out[mode] = {"n_synthetic": augment.synthetic_count(len(x), n_train, spec)[0], "candidates": accs,
                     "mean": float(np.mean(list(accs.values()))), "min": min(accs.values()),
                     "max": max(accs.values())}
    return out


def render(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    t = res["teacher"]
    s = res["setup"]
    table = Table(title=f"Digits: teacher CNN against each class's distilled student ({s['n_heldout']} held-out "
                        f"digits; latency {s['latency']}, {s['threads']} thread, this CPU)")
    for col in ("model", "accuracy", "agreement", "params", "MACs", "teacher/MACs", "bytes", "fp32 us", "int8 us",
                "shipped"):
        table.add_column(col, justify="left" if col in ("model", "shipped") else "right")

    def row(label: str, f: dict) -> None:
        table.add_row(label, f"{f['accuracy']:.4f}", f"{f['agreement']:.4f}", f"{f['params']:,}", f"{f['macs']:,}",
                      f"{t['macs'] / f['macs']:.0f}x", f"{f['bytes']:,}", f"{f['latency_fp32_us']:.1f}",
                      f"{f['latency_int8_us']:.1f}", f["precision_shipped"])

    row("teacher CNN", t)
    for name, f in res["students"].items():
        row(f"{name}: {f['candidate']}" + (" (its own variant)" if f["teacher_is_best"] else ", distilled"), f)
        if name in res["labels_only"]:
            row(f"{name}: same, labels only", res["labels_only"][name])
    console.print(table)
    for name, f in res["students"].items():
        console.print(f"[dim]{name} ships {f['precision_shipped']}: {f['why_precision']}[/]")

    cands = Table(title="Every candidate the pipeline distilled (held-out accuracy against MACs)")
    for col in ("candidate", "accuracy", "agreement", "MACs", "teacher/MACs", "params"):
        cands.add_column(col, justify="left" if col == "candidate" else "right")
    for cid, f in res["candidates"].items():
        cands.add_row(cid, f"{f['accuracy']:.4f}", f"{f['agreement']:.4f}", f"{f['macs']:,}",
                      f"{t['macs'] / f['macs']:.0f}x", f"{f['params']:,}")
    console.print(cands)

    ll = res["limited_labels"]
    lim = Table(title=f"Limited labels: {ll['n_labelled']} of {ll['n_transfer']} transfer images labelled "
                      f"({ll['labelled_share']:.0%}), {ll['student']}, mean over {ll['seeds']} seeds")
    for col in ("model", "held-out accuracy"):
        lim.add_column(col, justify="left" if col == "model" else "right")
    lim.add_row("teacher (all labels)", f"{ll['teacher_accuracy']:.4f}")
    lim.add_row("student, labels only (the 10 %)", f"{ll['labels_only_accuracy']:.4f}")
    lim.add_row("student, distilled (soft targets on all rows + the 10 % labels)", f"{ll['distilled_accuracy']:.4f}")
    console.print(lim)
    gap = ll["gap_recovered"]
    console.print(f"gap recovered by distillation: {gap:.1%}" if gap is not None else "no gap to recover")
    fam = Table(title="Families: the fewest-MACs student within 1 point of each teacher of our own making "
                      "(accuracy on each kind's test rows)")
    for col in ("kind", "teacher acc", "teacher MACs", "best within 1 pt", "acc", "MACs", "teacher/MACs",
                "per family"):
        fam.add_column(col, justify="left" if col in ("kind", "best within 1 pt", "per family") else "right")
    for e in res["families"]:
        b = e["best_within_1pt"]
        per = ", ".join(f"{f}: {v['mac_ratio']:g}x" if v else f"{f}: none" for f, v in e["by_family"].items())
        fam.add_row(e["kind"], f"{e['teacher_accuracy']:.4f}", f"{e['teacher_macs']:,}", b["name"] if b else "none",
                    f"{b['accuracy']:.4f}" if b else "", f"{b['macs']:,}" if b else "",
                    f"{b['mac_ratio']:g}x" if b else "", per)
    console.print(fam)
    aug = res["augmentation"]
    console.print(f"augmentation, {aug['n_transfer']} rows of a table (teacher {aug['teacher_accuracy']:.4f} on "
                  f"{aug['n_test']} test rows): students {aug['off']['mean']:.4f} mean "
                  f"({aug['off']['min']:.4f}-{aug['off']['max']:.4f}) without synthetic rows, "
                  f"{aug['auto']['mean']:.4f} ({aug['auto']['min']:.4f}-{aug['auto']['max']:.4f}) with "
                  f"{aug['auto']['n_synthetic']}")
    console.print(f"[dim]finished in {s['elapsed_s']:.0f} s; spec {s['spec']}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, candidates, runs and seeds (smoke run)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the limited-label case (default 3; "
                                                                "1 with --quick)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    res = run(args.quick, max(1, seeds))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        render(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
