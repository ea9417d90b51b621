"""Inference on the agent: what the local API adds on top of ONNX Runtime, and what telemetry and metering cost.

    .venv/bin/python bench/inference.py [--runs 2000] [--json]

Trains the digits teacher (examples/digits/train.py), builds a real bundle with the cloud's bundle builder,
installs it with the agent's installer, then times single-sample inferences, median and p95 over `--runs` calls
after a warm-up, along four paths:

  ort        onnxruntime.InferenceSession.run, the floor
  service    InferenceService.run: + metering + telemetry window bookkeeping
  http       POST /v2/models/digits/infer over a keep-alive localhost connection (httpx), OIP JSON
  unix       the same over the agent's unix socket

Also prints the process's peak RSS. Figures depend on the machine: run it on the device class you care about.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

from train import train  # noqa: E402

from edgefleet.cloud.bundles import build_bundle  # noqa: E402
from edgefleet.cloud.catalog import load_catalog  # noqa: E402
from edgefleet.cloud.registry import validate_model  # noqa: E402
from edgefleet.edge_agent.inference import InferenceService  # noqa: E402
from edgefleet.edge_agent.installer import Installer  # noqa: E402
from edgefleet.edge_agent.local_api import LocalApi  # noqa: E402
from edgefleet.edge_agent.meters import ModelledMeter  # noqa: E402
from edgefleet.edge_agent.outbox import Outbox  # noqa: E402
from edgefleet.edge_agent.telemetry import Telemetry  # noqa: E402
from edgefleet.edge_agent.unpack import unpack_bundle  # noqa: E402


def timed(fn, runs: int, warmup: int = 100) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {"p50_us": statistics.median(samples), "p95_us": samples[int(0.95 * (len(samples) - 1))],
            "mean_us": statistics.fmean(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    trained = train(work / "teacher")
    model_bytes = Path(trained["model"]).read_bytes()
    info = validate_model(model_bytes, max_bytes=64 * 1024 * 1024)
    cls = load_catalog()["x86-cpu"]
    bundle, _ = build_bundle(model_bytes, name="digits", version=1, device_class=cls, inputs=info.inputs,
                             outputs=info.outputs, created_at=datetime.now(timezone.utc))
    (work / "bundle.tar.gz").write_bytes(bundle)
    installer = Installer(work / "models")
    staging = installer.new_staging("digits", 1)
    unpack_bundle(work / "bundle.tar.gz", staging)
    installer.promote("digits", 1, staging)
    installer.activate("digits", 1, previous=None)

    x = np.load(trained["heldout"])["X"][:1].astype(np.float32)
    telemetry = Telemetry("bench", 60.0, Outbox(work / "outbox", 16 * 1024 * 1024))
    service = InferenceService(installer, meter=ModelledMeter(cls.active_watts, cls.idle_watts), telemetry=telemetry)
    service.load_active()
    sess = ort.InferenceSession(str(installer.version_dir("digits", 1) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}]}
    results: dict[str, dict[str, float]] = {}
    results["ort"] = timed(lambda: sess.run(None, {"input": x}), args.runs)
    results["service"] = timed(lambda: service.run("digits", {"input": x}), args.runs)
    sock = work / "api.sock"
    with LocalApi(service, http_port=0, unix_socket=sock) as api:
        with httpx.Client(base_url=api.url) as http:
            results["http"] = timed(lambda: http.post("/v2/models/digits/infer", json=body).raise_for_status(),
                                    args.runs)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent") as unix:
            results["unix"] = timed(lambda: unix.post("/v2/models/digits/infer", json=body).raise_for_status(),
                                    args.runs)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"model": "digits MLP (sklearn, 64-128-64-10)", "runs": args.runs, "paths": results,
           "peak_rss_mb": round(peak_rss_mb, 1), "onnxruntime": ort.__version__}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"single-sample inference, {args.runs} runs each (client and server in one process)")
    for col in ("path", "p50 us", "p95 us", "mean us"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['p50_us']:.1f}", f"{r['p95_us']:.1f}", f"{r['mean_us']:.1f}")
    Console().print(table)
    print(f"peak RSS {peak_rss_mb:.0f} MB; onnxruntime {ort.__version__}")


if __name__ == "__main__":
    main()
