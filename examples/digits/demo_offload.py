"""The demo's offload step: two more Raspberry Pi 4 agents join with the offload router on, and apps on them call
the SDK (`edgefleet.sdk.Client`, over the agent's unix socket) as any app on a device would.

Both agents emulate a Pi 4's speed on this x86 machine: `offload.emulate_class = true` stretches every local run of
a model by the factor the cloud's cost model wrote into its rpi4 bundle (the class's predicted time over the build
machine's: about 7x for these models; edge_agent/emulate.py), and every answer and figure taken under it says
`emulated_slowdown`. The cloud they offload to is the
demo's own (`/v2` on its port), which for a distilled version serves the teacher under the student's name.

- pi-porch, the big model on a battery budget: the operator wants the teacher CNN's accuracy on a Pi
  (`fleet models push teacher.onnx --name digits-cnn`, then `fleet deploy digits-cnn --device pi-porch --p95-ms
  5`: its latency budget), and the device may spend 2 J a minute on inference (`offload.energy_j_per_min`: a
  battery's share). At 4-10 mJ a run (estimated: the class's active watts x the emulated busy time, which
  follows this machine's speed), the device serves until this minute's joules are spent and the cloud takes the
  rest (`energy_window_exhausted`). The app goes round the held-out digits until the budget is spent and then
  another `AFTER_BUDGET` requests (at most `MAX_REQUESTS` in all), so the split shows on a fast machine as on a
  slow one.
- pi-gate, a cascade: each local answer less sure than 0.9 (max probability) goes to the cloud's teacher and the
  reply says `escalated`; the held-out digits show what that buys in accuracy and what it costs in traffic.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from demo_support import Processes, agent_config, wait_until

from edgefleet.fleet.client import FleetClient
from edgefleet.protos.api import DeployRequest
from edgefleet.sdk import Client

BIG_MODEL = "digits-cnn"  # the teacher, pushed as a model of its own
P95_BUDGET_MS = 5.0
ENERGY_J_PER_MIN = 2.0
CASCADE_THRESHOLD = 0.9
AFTER_BUDGET = 300  # pi-porch's requests after its first offloaded one
MAX_REQUESTS = 4000  # pi-porch's at most (at ~1 ms a request), should a machine be so fast the joules never run out
# One intra-op thread: the cost model's build-machine figures were measured so, and on this shared 2-core box a
# second spinning ONNX Runtime thread per agent makes run times (and the emulated ones, 7x) swing with the others.
ONE_THREAD = "\n[runtime]\nintra_op_threads = 1\n"
OFFLOAD_AGENTS = {  # device id -> its [runtime] and [offload] sections
    "pi-porch": (f"{ONE_THREAD}\n[offload]\nenabled = true\nemulate_class = true\n"
                 f"energy_j_per_min = {ENERGY_J_PER_MIN}\n"),
    "pi-gate": (f"{ONE_THREAD}\n[offload]\nenabled = true\nemulate_class = true\n"
                f'cascade_metric = "max_prob"\ncascade_threshold = {CASCADE_THRESHOLD}\n'),
}


def start_agents(work: Path, procs: Processes, bin_dir: Path, cloud_url: str, token: str) -> None:
    for device_id, extra in OFFLOAD_AGENTS.items():
        cfg = agent_config(work, device_id, "rpi4", {"site": device_id.split("-")[1], "offload": "on"}, cloud_url,
                           token, extra)
        procs.start(device_id, [str(bin_dir / "edgefleet-agent"), "run", "--config", str(cfg)])


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _app(socket_path: str, model: str, rows: np.ndarray, shape: list[int], *,
         until_offloaded: int | None = None) -> list[dict[str, Any]]:
    """Send the rows through the SDK, as an app on the device would; one record per request (`row`: its index).
    Once each by default; with `until_offloaded`, round and round until that many requests after the first one the
    cloud answered (or MAX_REQUESTS)."""
    records: list[dict[str, Any]] = []
    first_cloud: int | None = None
    with Client(socket=socket_path) as agent:
        while True:
            i = len(records)
            if until_offloaded is None and i == len(rows):
                break
            if until_offloaded is not None and (i >= MAX_REQUESTS or
                                                (first_cloud is not None and i - first_cloud >= until_offloaded)):
                break
            t0 = time.perf_counter()
            result = agent.infer(model, rows[i % len(rows)].reshape(shape).astype(np.float32))
            p = result.provenance
            if p.where == "cloud" and first_cloud is None:
                first_cloud = i
            records.append({"row": i % len(rows), "where": p.where, "reason": p.reason,
                            "waited_ms": (time.perf_counter() - t0) * 1000.0, "escalated": p.escalated,
                            "energy_mj": p.energy_mj, "pred": int(np.argmax(next(iter(result.outputs.values())))),
                            "emulated": p.parameters.get("emulated_slowdown") if p.parameters else None})
    return records


def run(work: Path, procs: Processes, client: FleetClient, console: Any, *, teacher_onnx: Path, version: int,
        shape: list[int], x: np.ndarray, y: np.ndarray, student_acc: float, teacher_acc: float) -> dict[str, Any]:
    """Put the big model on pi-porch under its budget, drive both apps, print what happened; the figures."""
    def enrolled():
        procs.check_alive()
        return {d.device_id for d in client.list_devices()} >= set(OFFLOAD_AGENTS)

    wait_until(enrolled, 60, "pi-porch and pi-gate to enroll")
    big = client.push_model(BIG_MODEL, teacher_onnx)
    client.deploy(DeployRequest(model=BIG_MODEL, version=big.version, device_id="pi-porch", p95_ms=P95_BUDGET_MS))
    console.print(f"    fleet models push teacher.onnx --name {BIG_MODEL}; fleet deploy {BIG_MODEL} --device pi-porch "
                  f"--p95-ms {P95_BUDGET_MS:g}", highlight=False)

    def installed():
        procs.check_alive()
        active = {(d.device_id, m.name): m.active_version for d in client.list_devices()
                  if d.device_id in OFFLOAD_AGENTS for m in d.models}
        return active.get(("pi-porch", BIG_MODEL)) == big.version and active.get(("pi-gate", "digits")) == version

    wait_until(installed, 90, f"pi-porch to install {BIG_MODEL} and pi-gate digits v{version}")
    sockets = {d: json.loads((work / "agents" / d / "api.json").read_text())["unix_socket"] for d in OFFLOAD_AGENTS}

    porch = _app(sockets["pi-porch"], BIG_MODEL, x, shape, until_offloaded=AFTER_BUDGET)
    waited = [r["waited_ms"] for r in porch]
    local = [r for r in porch if r["where"] == "local"]
    offloaded = 1 - len(local) / len(porch)
    local_mj = sum(r["energy_mj"] or 0.0 for r in local)
    porch_acc = float(np.mean([r["pred"] == y[r["row"]] for r in porch]))
    reasons = Counter(r["reason"] for r in porch)
    local_p95 = _percentile([r["waited_ms"] for r in local], 95)
    each = local_mj / max(1, len(local))
    spent = (f"then the {ENERGY_J_PER_MIN:g} J/min budget was spent: {offloaded:.0%} offloaded"
             if len(local) < len(porch) else f"the {ENERGY_J_PER_MIN:g} J/min budget was never spent: this machine "
             "runs the model too fast for it")
    console.print(f"    pi-porch: {BIG_MODEL}, {len(porch)} requests (the held-out digits, round until "
                  f"{AFTER_BUDGET} after the first offload): {len(local)} on the device ({local_mj / 1000:.2f} J "
                  f"estimated, {each:.1f} mJ each, p95 {local_p95:.2f} ms against the {P95_BUDGET_MS:g} ms budget), "
                  f"{spent}; p50 {_percentile(waited, 50):.2f} ms over all, accuracy {porch_acc:.3f}",
                  highlight=False)
    console.print("      reasons: " + ", ".join(f"{k} {n}" for k, n in reasons.most_common()), highlight=False)

    gate = _app(sockets["pi-gate"], "digits", x, shape)
    escalated = sum(r["escalated"] for r in gate) / len(gate)
    cascade_acc = float(np.mean([r["pred"] == y[r["row"]] for r in gate]))
    gate_waited = [r["waited_ms"] for r in gate]
    console.print(f"    pi-gate: the cascade (max prob < {CASCADE_THRESHOLD:g} -> the cloud's teacher) escalated "
                  f"{escalated:.1%} of {len(gate)} held-out digits; accuracy {cascade_acc:.3f} against the "
                  f"student's {student_acc:.3f} alone and the teacher's {teacher_acc:.3f}; p50 "
                  f"{_percentile(gate_waited, 50):.2f} ms, p95 {_percentile(gate_waited, 95):.2f} ms",
                  highlight=False)
    if not all(r["emulated"] for r in porch + gate):
        raise SystemExit("demo: an answer from an emulating agent did not carry emulated_slowdown")
    console.print(f"    emulated slowdowns, from each bundle's cost model: {BIG_MODEL} "
                  f"{porch[0]['emulated']:g}x on pi-porch, digits {gate[0]['emulated']:g}x on pi-gate",
                  highlight=False)
    return {"porch_requests": len(porch), "porch_offloaded": offloaded, "porch_local_j": local_mj / 1000,
            "porch_reasons": dict(reasons), "gate_escalated": escalated, "gate_accuracy": cascade_acc,
            "gate_requests": len(gate)}


def wait_telemetry(procs: Processes, client: FleetClient, figures: dict[str, Any]) -> None:
    """Until the cloud holds every decision of both apps (the windows carry their reasons)."""
    want = {"pi-porch": figures["porch_requests"], "pi-gate": figures["gate_requests"]}

    def arrived():
        procs.check_alive()
        rows = {r.device_id: r for r in client.status()}
        return all(d in rows and sum(rows[d].offload_reasons.values()) >= n for d, n in want.items())

    wait_until(arrived, 60, "the offload reasons from pi-porch and pi-gate in the cloud")
