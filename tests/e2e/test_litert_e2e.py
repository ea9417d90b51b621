"""End to end for a LiteRT class: a user-defined class whose runtime is TFLite gets a distilled student converted
to .tflite by the worker (through the converter's own virtual environment), shipped in a bundle with model.tflite,
smoke-tested and served by the agent's LiteRT runtime, answering an Open Inference Protocol request.

On the default transport (MQTT) only: what is under test is the worker's conversion and the agent's runtime; the
link only carries the deployment, which test_agents_e2e.py runs on both transports, and a second run would cost
another distillation and conversion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

from tests.e2e.agent_process import AgentProcess
from tests.harness import wait_for
from tests.job_kinds import tiny_teacher, tiny_transfer


def start_worker(server, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_DATABASE_URL": server.settings.database_url, "EDGEFLEET_WORKER_POLL_S": "0.1"}
    log = open(server.data_dir.parent / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cloud.main", "worker", "--data-dir",
                             str(server.data_dir), "--id", name], stdout=log, stderr=log, env=env)


def test_a_litert_class_gets_a_tflite_student_that_its_agent_serves(tmp_path, cloud):
    admin = cloud.client()
    cls = {"name": "pi-litert", "description": "a Pi running LiteRT with XNNPACK", "cores": 4, "memory_mb": 4096,
           "runtimes": ["litert"], "execution_providers": [], "preferred_precision": "fp32", "idle_watts": 2.7,
           "active_watts": 6.4, "budgets": {"p95_latency_ms": 50, "mj_per_inference": 500, "model_mb": 5}}
    r = admin.post("/api/v1/classes", json=cls)
    assert r.status_code in (200, 201), r.text
    token = admin.post("/api/v1/enrollment-tokens", json={}).json()["token"]
    agent = AgentProcess(tmp_path / "agents", "pi-lite-1", "pi-litert", cloud.base_url, token).start()
    worker = start_worker(cloud, "w-litert")
    try:
        wait_for(lambda: admin.get("/api/v1/devices/pi-lite-1").status_code == 200, 20, what="agent enrolled")
        files = {"teacher": ("teacher.onnx", tiny_teacher()), "data": ("transfer.npz", tiny_transfer())}
        spec = {"name": "tiny", "classes": ["pi-litert"], "max_epochs": 3, "max_candidates": 1}
        r = admin.post("/api/v1/distill", files=files, data={"spec": json.dumps(spec)})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def finished():
            job = admin.get(f"/api/v1/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None
        # The converter venv is built on first use on a fresh machine (about 2 minutes, measured).
        job = wait_for(finished, 600, interval_s=0.5, what="the distillation with a TFLite conversion")
        assert job["state"] == "succeeded", job.get("error")
        (built,) = job["versions"]
        report = admin.get(f"/api/v1/jobs/{job_id}/report").json()
        chosen = report["classes"]["pi-litert"]["chosen"]
        assert (chosen["runtime"], chosen["format"]) == ("litert", "tflite")

        r = admin.post("/api/v1/deployments", json={"model": "tiny", "version": built["version"],
                                                     "device_class": "pi-litert"})
        assert r.status_code == 201, r.text
        bundle = cloud.fleet.store.get_bundle("tiny", built["version"], "pi-litert")
        assert bundle.manifest["runtime"] == "litert" and bundle.manifest["model_file"].endswith(".tflite")

        def in_sync():
            rows = [x for x in admin.get("/api/v1/status").json() if x["device_id"] == "pi-lite-1"]
            return rows and rows[0]["state"] == "in_sync"
        wait_for(in_sync, 60, what="the agent to verify, smoke-test (LiteRT) and activate the TFLite bundle")
        x = np.random.default_rng(5).standard_normal(8).astype(np.float32)
        out = agent.infer("tiny", x.tolist(), [1, 8], input_name="input")
        assert out["model_version"] == str(built["version"]) and out["outputs"][0]["shape"] == [1, 3]
        assert out["parameters"]["where"] == "local"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        agent.stop()
