"""The x86-cpu cost model against ONNX Runtime on this machine: predicted vs measured latency, fp32 and int8.

    .venv/bin/python bench/costmodel.py [--runs 400] [--threads 1] [--json]

Builds four models by hand (the same ones the cost-model tests count MACs for: an MLP 64-128-10, a wide MLP
64-1024-1024-10, depthwise-separable CNNs with 16 and 64 channels on 28x28), quantizes each to int8 (static QDQ,
per channel), measures single-sample latency with `costmodel.measure_here` (lowest median of 3 interleaved rounds:
this is a shared 2-vCPU machine), and prints prediction / measurement ratios. The calibration's aim, stated in
`cloud/distill/costmodel.py`: medians within 3x at one thread. Timings are figures to read, not test assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cloud" / "distill"))  # the hand-built models with hand-counted MACs

import artifact_models as am  # noqa: E402

from edgefleet.cloud.catalog import load_catalog  # noqa: E402
from edgefleet.cloud.distill import costmodel as cm  # noqa: E402
from edgefleet.cloud.distill.artifacts import make_int8  # noqa: E402


def quietest(models, x, runs, threads, attempts=3):
    best = [None] * len(models)
    for _ in range(attempts):
        for i, model in enumerate(models):
            m = cm.measure_here(model, x, runs=runs, threads=threads)
            best[i] = m if best[i] is None or m.p50_ms < best[i].p50_ms else best[i]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cal = cm.default_calibration(load_catalog()["x86-cpu"])
    cases = [("mlp 64-128-10", am.mlp(64, (128,)), (64,)), ("mlp 64-1024-1024-10", am.mlp(64, (1024, 1024)), (64,)),
             ("dscnn c16 28x28", am.dscnn(16), (1, 28, 28)), ("dscnn c64 28x28", am.dscnn(64), (1, 28, 28))]
    rows = []
    for name, data, shape in cases:
        x = am.samples(shape, 64)
        counts = cm.count_ops(data, shape)
        measured = quietest([data, make_int8(data, x)], x, args.runs, args.threads)
        for precision, m in zip(("fp32", "int8"), measured):
            p = cm.predict(counts, cal, precision)
            rows.append({"model": name, "macs": counts.macs, "precision": precision,
                         "predicted_ms": p.latency_ms, "measured_p50_ms": m.p50_ms,
                         "ratio_p50": p.latency_ms / m.p50_ms,
                         "predicted_p95_ms": p.p95_ms, "measured_p95_ms": m.p95_ms,
                         "ratio_p95": p.p95_ms / m.p95_ms})
    within = all(1 / 3 < r["ratio_p50"] < 3 for r in rows)
    if args.json:
        print(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows, "medians_within_3x": within},
                         indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"x86-cpu cost model vs ORT here ({args.threads or 'default'} thread(s), {args.runs} runs)")
    for col in ("model", "MACs", "prec", "pred ms", "meas p50 ms", "ratio", "pred p95", "meas p95", "ratio p95"):
        t.add_column(col, justify="left" if col in ("model", "prec") else "right")
    for r in rows:
        t.add_row(r["model"], f"{r['macs']:,}", r["precision"], f"{r['predicted_ms']:.4f}",
                  f"{r['measured_p50_ms']:.4f}", f"{r['ratio_p50']:.2f}", f"{r['predicted_p95_ms']:.4f}",
                  f"{r['measured_p95_ms']:.4f}", f"{r['ratio_p95']:.2f}")
    Console().print(t)
    print("medians within 3x of the prediction:", "yes" if within else "NO")


if __name__ == "__main__":
    main()
