"""examples/sdk: each app run as a user runs it, a real subprocess, its --json output checked.

app_sync.py and app_async.py talk to a real agent local API (LocalApi on a unix socket, over a real installed bundle
of a model that is not the digits one: `x` float32 [batch, 3]), alone, behind a real offload router to a real OIP
server (an energy budget no local run keeps, so the decisions do not hang on which side is faster on a loaded box),
and behind a router that refuses tight deadlines. standalone.py runs tiny ONNX models made here, alone and
offloading to a real OIP server. Garbage in (a missing or broken model file, a bad --deadline-ms, no agent on the
socket, an unknown model, inputs the model refuses) is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.edge_agent.config import OffloadConfig
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.offload import Router
from edgefleet.edge_agent.offload_client import OffloadClient
from tests.cloud_server import tiny_onnx
from tests.edge_agent.test_offload_client import OipServer, serve_models, softmax_model
from tests.sdk import kit as sdk_kit
from tests.sdk.test_client import BudgetRouter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sdk"
SIGNATURE = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]


def run_example(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}  # no agent found by accident
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=90, env=env)


def run_json(script: str, *args: object) -> dict:
    out = run_example(script, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def refused(out: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def agent(root: Path, router_factory=None) -> LocalApi:
    """A real agent local API serving `scores` v2 (softmax(x)) on `root`/agent.sock."""
    service = serve_models(root / "device", {"scores": (2, 1.0)})
    router = router_factory(service) if router_factory else None
    return LocalApi(service, unix_socket=root / "agent.sock", api_json=root / "api.json", router=router).start()


@pytest.fixture
def plain_agent(tmp_path):
    api = agent(tmp_path)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def cloud(tmp_path):
    """A real OIP REST server serving `scores` v9 (softmax(5x): every answer shows where it ran)."""
    server = OipServer(serve_models(tmp_path / "cloud", {"scores": (9, 5.0)}))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("script", ["app_sync.py", "app_async.py", "standalone.py"])
def test_every_example_explains_itself(script):
    out = run_example(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--deadline-ms" in out.stdout and "--json" in out.stdout
    assert "Exit status" in out.stdout or "exit status" in out.stdout


def test_sync_app_reads_the_signature_from_the_agent(plain_agent, tmp_path):
    doc = run_json("app_sync.py", "scores", "--data-dir", tmp_path, "-n", 5, "--deadline-ms", 5000, "--batch", 2)
    assert (doc["model"], doc["version"], doc["socket"], doc["inputs"]) == (
        "scores", "2", str(tmp_path / "agent.sock"), SIGNATURE)
    assert (doc["requests"], doc["answered"], doc["failed"]) == (5, 5, 0)
    assert doc["where"] == {"local": 5, "cloud": 0} and doc["offloaded_share"] == 0.0
    assert doc["reasons"] == {"local": 5} and doc["errors"] == {}  # no router: the agent's plain local answer
    assert doc["deadline_met"] == 5 and doc["latency_ms"]["p50"] <= doc["latency_ms"]["p95"]
    assert [r["i"] for r in doc["per_request"]] == list(range(5))
    assert {(r["where"], r["energy_source"]) for r in doc["per_request"]} == {("local", "estimated")}
    served = sum(w.count for b in plain_agent.service.telemetry.flush(sdk_kit.kit.T0, force=True) for w in b.windows)
    assert served == 5  # each request one inference on the agent


def offloading_agent(root: Path, cloud_url: str) -> LocalApi:
    """The agent behind a router whose energy budget no local run keeps (the modelled 4 W): after the first local
    run has measured its mJ, everything goes to the cloud, whatever the two sides' speeds; no local probes."""
    config = OffloadConfig(enabled=True, mj_per_inference=1e-6, local_probe_s=600.0)
    return agent(root, lambda service: Router(service, OffloadClient(cloud_url, timeout_s=5.0), config,
                                              telemetry=service.telemetry))


def test_sync_app_counts_what_the_router_offloads(tmp_path, cloud):
    api = offloading_agent(tmp_path, cloud.url)
    try:
        doc = run_json("app_sync.py", "scores", "--socket", tmp_path / "agent.sock", "-n", 8)
    finally:
        api.stop()
    assert doc["where"] == {"local": 1, "cloud": 7} and doc["offloaded_share"] == 0.875
    assert doc["reasons"] == {"local_energy_over_budget": 7, "local_within_budget": 1}
    rows = doc["per_request"]
    assert [(r["where"], r["reason"]) for r in rows[:2]] == [("local", "local_within_budget"),
                                                            ("cloud", "local_energy_over_budget")]
    assert {str(r["model_version"]) for r in rows if r["where"] == "cloud"} == {"9"}
    assert {r["energy_source"] for r in rows[1:]} == {"none"}  # a cloud answer costs the device no inference


def test_refused_deadlines_are_counted_not_fatal(tmp_path):
    with sdk_kit.serving(tmp_path, router_factory=BudgetRouter) as (api, *_):
        doc = run_json("app_sync.py", "digits", "--socket", api.unix_socket, "-n", 3, "--deadline-ms", 0.5)
    assert (doc["answered"], doc["failed"], doc["errors"]) == (0, 3, {"deadline_unmeetable": 3})
    assert doc["offloaded_share"] is None and doc["inputs"] == [{"name": "input", "datatype": "FP32",
                                                                 "shape": [-1, 64]}]
    assert "raise deadline_ms" in doc["per_request"][0]["error"]


def test_async_app_keeps_requests_in_flight(plain_agent, tmp_path):
    doc = run_json("app_async.py", "scores", "--socket", tmp_path / "agent.sock", "-n", 12, "--concurrency", 4,
                   "--tier", "background")
    assert (doc["requests"], doc["answered"], doc["concurrency"], doc["tier"]) == (12, 12, 4, "background")
    assert doc["where"] == {"local": 12, "cloud": 0} and doc["reasons"] == {"local": 12}
    assert [r["i"] for r in doc["per_request"]] == list(range(12)) and doc["rps"] > 0


def test_async_app_against_a_router(tmp_path, cloud):
    api = offloading_agent(tmp_path, cloud.url)
    try:
        doc = run_json("app_async.py", "scores", "--data-dir", tmp_path, "-n", 12, "--concurrency", 3)
    finally:
        api.stop()
    # The first 3 are decided together, before any local run has measured its energy: local, at most those.
    local, cloud_n = doc["where"]["local"], doc["where"]["cloud"]
    assert doc["answered"] == 12 and local + cloud_n == 12 and 1 <= local <= 3
    assert doc["offloaded_share"] == round(cloud_n / 12, 4)
    assert doc["reasons"] == {"local_within_budget": local, "local_energy_over_budget": cloud_n}


def test_standalone_runs_any_model_here(tmp_path):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx())  # x float32 [1, 4] -> y [1, 2]: a fixed batch
    doc = run_json("standalone.py", model, "-n", 3, "--active-watts", 5)
    assert (doc["model"], doc["cloud_url"], doc["inputs"]) == (
        "tiny", None, [{"name": "x", "datatype": "FP32", "shape": [1, 4]}])
    assert doc["where"] == {"local": 3, "cloud": 0} and doc["reasons"] == {"offload_disabled": 3}
    assert {(r["variant"], r["energy_source"]) for r in doc["per_request"]} == {("embedded", "estimated")}
    assert all(r["energy_mj"] > 0 for r in doc["per_request"])


def test_standalone_takes_the_apps_own_rows(tmp_path):
    model = tmp_path / "scores.onnx"
    model.write_bytes(softmax_model(1.0))
    data = tmp_path / "held.npz"
    np.savez(data, x=np.arange(15, dtype=np.float64).reshape(5, 3), y=np.arange(5))  # as examples/digits writes sets
    doc = run_json("standalone.py", model, "--inputs", data, "--batch", 2, "-n", 4)
    assert (doc["answered"], doc["batch"], doc["inputs"]) == (4, 2, SIGNATURE)
    refused(run_example("standalone.py", model, "--inputs", tmp_path / "none.npz"), 1, "no such file")


def test_standalone_offloads_over_budget_to_the_cloud(tmp_path, cloud):
    model = tmp_path / "scores.onnx"
    model.write_bytes(softmax_model(1.0))
    doc = run_json("standalone.py", model, "--cloud-url", cloud.url, "--active-watts", 5,
                   "--mj-per-inference", 1e-6, "-n", 6, "--deadline-ms", 5000)
    rows = [(r["where"], r["reason"]) for r in doc["per_request"]]
    assert rows[0] == ("local", "local_within_budget")  # then its energy is known, and over budget
    # A local probe a second keeps the local figures fresh (the policy's default): on a slow box one may land here.
    assert set(rows[1:]) <= {("cloud", "local_energy_over_budget"), ("local", "local_probe")}
    assert doc["where"]["cloud"] >= 4 and doc["offloaded_share"] == round(doc["where"]["cloud"] / 6, 4)
    assert {str(r["model_version"]) for r in doc["per_request"] if r["where"] == "cloud"} == {"9"}
    assert doc["deadline_met"] == 6 and doc["cloud_url"] == cloud.url


def test_garbage_is_one_line_and_a_failing_exit(plain_agent, tmp_path):
    refused(run_example("standalone.py", tmp_path / "missing.onnx"), 1, "no model file at")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    refused(run_example("standalone.py", tmp_path / "junk.onnx"), 1, "give the path of a valid .onnx file")
    sock = tmp_path / "agent.sock"
    refused(run_example("app_sync.py", "scores", "--socket", sock, "--deadline-ms", "-5"), 2,
            "--deadline-ms: must be a positive number")
    refused(run_example("app_async.py", "scores", "--socket", sock, "--deadline-ms", "soon"), 2,
            "--deadline-ms: 'soon' is not a number")
    refused(run_example("app_sync.py", "scores", "--socket", tmp_path / "nobody.sock"), 1,
            "cannot reach the agent at")
    refused(run_example("app_async.py", "scores", "--data-dir", tmp_path / "empty"), 1, "no agent found")
    refused(run_example("app_sync.py", "ghost", "--socket", sock), 1, "'ghost' is not on this device")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 7), dtype=np.float32))
    refused(run_example("app_sync.py", "scores", "--socket", sock, "--inputs", wrong), 1,
            "does not fit; the model takes x FP32 [-1, 3]")
