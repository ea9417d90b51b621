"""The offload policy at work: deadlines met and device energy on an overloaded slow device, and the cascade's
accuracy and speed on the digits held-out set.

    .venv/bin/python bench/offload_policy.py [--seconds 12] [--json]

Both parts run the real agent pieces: InferenceService on ONNX Runtime, slowed by edge_agent/emulate.py to an rpi4
(factor 8, labelled `emulated_slowdown`), modelled energy at the rpi4 catalog's 6.4 W; the Router and its policy;
the OffloadClient to a real OIP server (the agent's own local API, unslowed, standing in for the cloud) behind a
TCP proxy that holds each direction 10 ms: a 20 ms emulated round trip.

`measure_policy()`: the local model is the narrowest ReLU MLP (64 -> width x 3 -> 10) whose real run takes 1 ms
here (one thread), so 8-14 ms emulated and 100-190 requests/s offered: what this 2-core box can also serve as the
"cloud". The device runs one inference at a time (ONNX Runtime already uses every core for one), and the app
offers 1.5x what the emulated device can serve, open loop (requests arrive on schedule whether or not the last one
finished), each with a 50 ms deadline. Local only: every request on the device (offload off). Policy: the Router
with its defaults (the deadline rule weighs the device's queue: it keeps what it can finish in time).
`deadline_met_*` is the share of requests answered within the deadline as the app measured it; `mj_per_request_*`
the device's modelled inference energy per request (a cloud answer costs the device no inference energy here; the
radio is not modelled).

`measure_cascade()`: the digits teacher CNN (examples/digits/teacher_cnn.py, 2.5M MACs, ~99 % held-out) serves in
the "cloud"; on the device, the student the distillation pipeline ships for rpi4 (trained on the transfer set with
the teacher's outputs, as `fleet distill` does). The 450 held-out digits are split in two, stratified and seeded:
225 calibration rows (half), on which the pipeline ranks its candidates and the cascade's threshold is chosen (the
largest max-probability threshold that escalates at most `CASCADE_TARGET_SHARE` of them, as one would pick it
before shipping), and 225 test rows no choice saw, on which every figure is reported. Each test row is one request:
cloud only, student only, and the cascade. `speedup_vs_cloud_only` is cloud-only wall time over the cascade's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT))

from train import INPUT_NAME  # noqa: E402

from edgefleet.cloud.bundles import build_bundle  # noqa: E402
from edgefleet.cloud.catalog import load_catalog  # noqa: E402
from edgefleet.cloud.registry import validate_model  # noqa: E402
from edgefleet.common.runtimes import make_runtime  # noqa: E402
from edgefleet.edge_agent.config import OffloadConfig  # noqa: E402
from edgefleet.edge_agent.emulate import slowed_factory  # noqa: E402
from edgefleet.edge_agent.inference import InferenceService  # noqa: E402
from edgefleet.edge_agent.installer import Installer  # noqa: E402
from edgefleet.edge_agent.local_api import LocalApi  # noqa: E402
from edgefleet.edge_agent.meters import ModelledMeter  # noqa: E402
from edgefleet.edge_agent.offload import Router  # noqa: E402
from edgefleet.edge_agent.offload_client import OffloadClient  # noqa: E402
from edgefleet.edge_agent.unpack import unpack_bundle  # noqa: E402
from tests.netproxy import DelayProxy  # noqa: E402

RPI4_FACTOR = 8.0  # the digits MLP: ~13 us here, ~100 us on a Pi 4's A72 cores (docs/offload.md)
ONE_WAY_S = 0.010  # 10 ms each way: a 20 ms round trip
DEADLINE_MS = 50.0
OVERLOAD = 1.5
CASCADE_TARGET_SHARE = 0.10  # the cascade's threshold: the largest that escalates at most this share of calibration
CALIBRATION_ROWS = 225
# The demo's short distillation (examples/digits/demo.py DEMO_SPEC), for rpi4 only.
CASCADE_SPEC = {"max_candidates": 4, "max_epochs": 25, "patience": 6, "learning_rate": 1e-2, "augment": "on"}


class OneAtATime(InferenceService):
    """A device that runs one inference at a time: the others wait (not counted as busy, so not as energy)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._device = threading.Lock()

    def infer_arrays(self, *args: Any, **kwargs: Any):
        with self._device:
            return super().infer_arrays(*args, **kwargs)


def _install(root: Path, name: str, model_bytes: bytes, cls_name: str = "rpi4") -> Installer:
    info = validate_model(model_bytes, max_bytes=64 * 1024 * 1024)
    cls = load_catalog()[cls_name]
    bundle, _ = build_bundle(model_bytes, name=name, version=1, device_class=cls, inputs=info.inputs,
                             outputs=info.outputs, created_at=datetime.now(timezone.utc))
    archive = root / f"{name}.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(bundle)
    installer = Installer(root / "models")
    staging = installer.new_staging(name, 1)
    unpack_bundle(archive, staging)
    installer.promote(name, 1, staging)
    installer.activate(name, 1, previous=None)
    return installer


def _one_thread(name: str, **options: Any):
    # One intra-op thread: steadier run times on a shared 2-core box, and the device and the "cloud" do not
    # fight over both cores inside every run.
    return make_runtime(name, intra_op_threads=1)


def _service(root: Path, name: str | None, model_bytes: bytes | None, *, factor: float = 1.0,
             cls=InferenceService) -> InferenceService:
    installer = _install(root, name, model_bytes) if name and model_bytes else Installer(root / "models")
    rpi4 = load_catalog()["rpi4"]
    service = cls(installer, meter=ModelledMeter(rpi4.active_watts, rpi4.idle_watts),
                  runtime_factory=slowed_factory(_one_thread, factor))
    service.load_active()
    return service


def loading_model(target_ms: float = 1.0) -> bytes:
    """The narrowest `wide_mlp` whose real run (one thread, here) takes at least `target_ms`: the offered rate
    follows the device's speed, so it must stay in what this box can serve as the "cloud" too."""
    import onnxruntime as ort

    x = np.zeros((1, 64), np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for width in (512, 768, 1024, 1280, 1536, 2048):
        model = wide_mlp(width)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(20):
            session.run(None, {INPUT_NAME: x})
        started = time.perf_counter()
        for _ in range(50):
            session.run(None, {INPUT_NAME: x})
        if (time.perf_counter() - started) / 50 * 1000.0 >= target_ms:
            return model
    return model


def wide_mlp(width: int = 1024, depth: int = 3) -> bytes:
    """input [N, 64] -> `depth` ReLU layers of `width` -> 10 probabilities: a model that loads the device."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, n_in = [], [], INPUT_NAME, 64
    for i in range(depth + 1):
        n_out = 10 if i == depth else width
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel()))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < depth:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
        n_in = n_out
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=-1))
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                                            [None, 64])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _open_loop(router: Router, x: np.ndarray, rate_hz: float, seconds: float) -> tuple[list[float], list[float],
                                                                                           dict[str, int]]:
    """Requests at `rate_hz` on schedule for `seconds`; (app latencies ms, device mJ, reasons)."""
    latencies: list[float] = []
    energy: list[float] = []
    reasons: dict[str, int] = {}
    lock = threading.Lock()

    def one(due: float) -> None:
        _, params = router.infer_arrays("wide", {INPUT_NAME: x}, deadline_ms=DEADLINE_MS)
        waited = (time.perf_counter() - due) * 1000.0
        with lock:
            latencies.append(waited)
            energy.append(params["energy_mj"] or 0.0)
            reasons[params["reason"]] = reasons.get(params["reason"], 0) + 1

    n = int(rate_hz * seconds)
    start = time.perf_counter() + 0.05
    with ThreadPoolExecutor(max_workers=64) as pool:
        for i in range(n):
            due = start + i / rate_hz
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # the arrival schedule, not a synchronisation
            pool.submit(one, due)
    return latencies, energy, reasons


def measure_policy(seconds: float = 12.0, work: Path | None = None) -> dict[str, Any]:
    work = work or Path(tempfile.mkdtemp(prefix="edgefleet-bench-policy-"))
    model = loading_model()
    device = _service(work / "device", "wide", model, factor=RPI4_FACTOR, cls=OneAtATime)
    cloud = _service(work / "cloud", "wide", model)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    for _ in range(50):
        device.infer_arrays("wide", {INPUT_NAME: x})
    service_ms = float(np.median([device.infer_arrays("wide", {INPUT_NAME: x})[1].latency_ms for _ in range(50)]))
    rate_hz = OVERLOAD * 1000.0 / service_ms
    with LocalApi(cloud) as api:
        proxy = DelayProxy(api.address, ONE_WAY_S, return_delay_s=ONE_WAY_S)
        try:
            local_only = Router(device, None, OffloadConfig(slowdown_factor=RPI4_FACTOR))
            lat_l, mj_l, _ = _open_loop(local_only, x, rate_hz, seconds)
            client = OffloadClient(proxy.url, binary=False, timeout_s=2.0)
            policy = Router(device, client, OffloadConfig(enabled=True, slowdown_factor=RPI4_FACTOR))
            lat_p, mj_p, reasons = _open_loop(policy, x, rate_hz, seconds)
            client.close()
        finally:
            proxy.stop()

    def met(lat: list[float]) -> float:
        return round(sum(v <= DEADLINE_MS for v in lat) / len(lat), 4)

    width = onnx.load_from_string(model).graph.initializer[0].dims[1]
    return {"deadline_met_policy": met(lat_p), "deadline_met_local_only": met(lat_l),
            "mj_per_request_policy": round(sum(mj_p) / len(mj_p), 3),
            "mj_per_request_local_only": round(sum(mj_l) / len(mj_l), 3),
            "setup": {"model": f"MLP 64-{width}x3-10", "emulated_slowdown": RPI4_FACTOR,
                      "device_service_ms": round(service_ms, 3),
                      "offered_hz": round(rate_hz, 1), "overload": OVERLOAD, "deadline_ms": DEADLINE_MS,
                      "emulated_rtt_ms": 2 * ONE_WAY_S * 1000, "seconds": seconds, "requests": len(lat_p),
                      "p50_ms_policy": round(float(np.median(lat_p)), 2),
                      "p50_ms_local_only": round(float(np.median(lat_l)), 2), "policy_reasons": reasons,
                      "energy": "modelled, rpi4 6.4 W x emulated busy time; cloud answers cost 0 (radio not "
                                "modelled)"}}


def _cascade_models(work: Path) -> dict[str, Any]:
    """Train the teacher CNN, split its held-out digits into calibration and test rows, distil the rpi4 student
    (ranked on the calibration rows); the ONNX bytes of both and the rows."""
    import teacher_cnn
    from sklearn.model_selection import train_test_split

    from edgefleet.cloud.distill.pipeline import run_distillation
    from edgefleet.cloud.distill.spec import DistillSpec

    teacher = teacher_cnn.train_teacher(work / "teacher", epochs=10)
    held = np.load(teacher["heldout"])
    x_cal, x_test, y_cal, y_test = train_test_split(held["x"], held["y"], train_size=CALIBRATION_ROWS,
                                                    random_state=0, stratify=held["y"])
    calibration = work / "calibration.npz"
    np.savez(calibration, x=x_cal, y=y_cal)
    teacher_bytes = Path(teacher["model"]).read_bytes()
    result = run_distillation(teacher_bytes, Path(teacher["transfer"]), DistillSpec(classes=["rpi4"], **CASCADE_SPEC),
                              load_catalog(None), {}, work / "pipeline", model_name="digits", test_npz=calibration)
    chosen = result.chosen["rpi4"]
    student = chosen.variant.data if chosen.variant.runtime == "onnxruntime" else chosen.fp32_onnx
    return {"teacher": teacher_bytes, "student": student, "candidate": chosen.candidate,
            "precision": chosen.variant.precision if chosen.variant.runtime == "onnxruntime" else "fp32",
            "x_cal": x_cal.astype(np.float32), "y_cal": y_cal, "x_test": x_test.astype(np.float32), "y_test": y_test}


def _max_prob(model: bytes, x: np.ndarray) -> np.ndarray:
    """The student's confidence per row as the agent computes it (edge_agent/confidence.py), on bare ORT."""
    import onnxruntime as ort

    from edgefleet.edge_agent.confidence import confidence

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.array([confidence(dict(zip([o.name for o in session.get_outputs()],
                                         session.run(None, {name: x[i:i + 1]}), strict=True)), "max_prob", "")
                     for i in range(len(x))])


def choose_threshold(confidences: np.ndarray, target_share: float) -> float:
    """The largest threshold in 0.50 .. 0.99 that escalates at most `target_share` of these rows."""
    grid = np.round(np.arange(0.50, 0.995, 0.01), 2)
    fits = [t for t in grid if float(np.mean(confidences < t)) <= target_share]
    return float(max(fits)) if fits else 0.5


def _predicted(outputs: dict[str, np.ndarray]) -> int:
    """The class a reply names: argmax of its first float [1, classes] output."""
    scores = next(v for v in outputs.values() if v.dtype.kind == "f" and v.ndim == 2)
    return int(np.argmax(scores[0]))


def _accuracy(router: Router, name: str, X: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, escalated share, wall seconds) over single-row requests."""
    correct = escalated = 0
    started = time.perf_counter()
    for i in range(len(y)):
        out, params = router.infer_arrays("digits", {name: X[i:i + 1]})
        correct += int(_predicted(out) == y[i])
        escalated += bool(params["escalated"])
    return correct / len(y), escalated / len(y), time.perf_counter() - started


def measure_cascade(work: Path | None = None) -> dict[str, Any]:
    work = work or Path(tempfile.mkdtemp(prefix="edgefleet-bench-cascade-"))
    m = _cascade_models(work)
    threshold = choose_threshold(_max_prob(m["student"], m["x_cal"]), CASCADE_TARGET_SHARE)
    X, y = m["x_test"], m["y_test"]
    device = _service(work / "device", "digits", m["student"], factor=RPI4_FACTOR)
    empty = _service(work / "empty", None, None)
    cloud = _service(work / "cloud", "digits", m["teacher"])
    name = device.get("digits").manifest.inputs[0].name
    with LocalApi(cloud) as api:
        proxy = DelayProxy(api.address, ONE_WAY_S, return_delay_s=ONE_WAY_S)
        try:
            clients = [OffloadClient(proxy.url, binary=False, timeout_s=2.0) for _ in range(2)]
            cloud_only = Router(empty, clients[0], OffloadConfig(enabled=True))
            student = Router(device, None, OffloadConfig(slowdown_factor=RPI4_FACTOR))
            cascade = Router(device, clients[1], OffloadConfig(
                enabled=True, cascade_metric="max_prob", cascade_threshold=threshold,
                slowdown_factor=RPI4_FACTOR))
            teacher_acc, _, cloud_s = _accuracy(cloud_only, name, X, y)
            student_acc, _, student_s = _accuracy(student, name, X, y)
            cascade_acc, share, cascade_s = _accuracy(cascade, name, X, y)
            for c in clients:
                c.close()
        finally:
            proxy.stop()
    return {"teacher_acc": round(teacher_acc, 4), "student_acc": round(student_acc, 4),
            "cascade_acc": round(cascade_acc, 4), "offloaded_share": round(share, 4),
            "speedup_vs_cloud_only": round(cloud_s / cascade_s, 2),
            "setup": {"test_rows": int(len(y)), "calibration_rows": CALIBRATION_ROWS, "metric": "max_prob",
                      "threshold": threshold, "threshold_rule": f"the largest escalating <= {CASCADE_TARGET_SHARE:.0%} "
                                                                "of the calibration rows",
                      "student": f"{m['candidate']} {m['precision']} (distilled for rpi4)",
                      "teacher": "CNN, 2.5M MACs (examples/digits/teacher_cnn.py)",
                      "emulated_slowdown": RPI4_FACTOR, "emulated_rtt_ms": 2 * ONE_WAY_S * 1000,
                      "ms_per_request": {"cloud_only": round(cloud_s / len(y) * 1000, 2),
                                         "student_only": round(student_s / len(y) * 1000, 2),
                                         "cascade": round(cascade_s / len(y) * 1000, 2)}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="each open-loop run of the policy part")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    out = {"policy": measure_policy(args.seconds), "cascade": measure_cascade()}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for part, figures in out.items():
        print(part)
        for key, value in figures.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
