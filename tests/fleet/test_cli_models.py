"""`fleet models show` and `fleet models pull` against the real cloud (tests/cloud_server.py), and the REST routes
behind them (`GET /api/v1/models/{name}/versions[/{version}[/file]]`).

A model with a symbolic batch dimension, `x: float32[n,1,40]`, is pushed with `fleet models push`; `show` must print
that shape whole (rich markup once ate `[n,1,40]` as a style tag), `pull` must give back the very bytes pushed, and
with `--class` the model file that class's bundle carries: the pushed ONNX for an ONNX Runtime class, the `.tflite`
of a LiteRT variant (registered here as a distillation job would, `Fleet.register_variant`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest

from tests.fleet.cli_runner import IsolatedCli as Cli
from tests.harness import http_server

LITERT_CLASS = {"name": "pi-litert", "cores": 4, "memory_mb": 4096, "runtimes": ["litert"],
                "execution_providers": [], "preferred_precision": "fp32", "idle_watts": 2.7, "active_watts": 6.4}


def signal_onnx() -> bytes:
    """x: float32[n,1,40] -> Flatten -> MatMul [40,3] -> y: float32[n,3]; the batch dimension is named "n"."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(120, dtype=np.float32).reshape(40, 3) / 100, "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "signal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def fake_tflite() -> bytes:
    """Bytes with the TFLite flatbuffer identifier (the registry's check); the cloud never runs a TFLite file."""
    return b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 8


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    from tests.cloud_server import start_cloud_server

    server = start_cloud_server(tmp_path_factory.mktemp("cloud"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pushed(cloud, tmp_path_factory) -> dict:
    """The signal model pushed twice through the CLI (v1, v2), and a TFLite variant for a LiteRT class (v3)."""
    cli = Cli(tmp_path_factory.mktemp("cli-setup"))
    cli.ok("login", "--url", cloud.base_url, "--token", cloud.admin_token)
    path = tmp_path_factory.mktemp("models") / "signal.onnx"
    path.write_bytes(signal_onnx())
    v1 = json.loads(cli.ok("models", "push", str(path), "--name", "signal", "--json").stdout)
    v2 = json.loads(cli.ok("models", "push", str(path), "--name", "signal", "--json").stdout)
    with cloud.client() as http:
        assert http.post("/api/v1/classes", json=LITERT_CLASS).status_code in (200, 201)
    variant = SimpleNamespace(data=fake_tflite(), fmt="tflite", precision="fp32", runtime="litert")
    row = cloud.fleet.register_variant("signal", variant, signal_onnx(), device_class="pi-litert", job_id=999,
                                       run=lambda _v, x: np.zeros((x.shape[0], 3), dtype=np.float32))
    return {"v1": v1["version"], "v2": v2["version"], "tflite": row.version, "onnx": path.read_bytes()}


@pytest.fixture
def admin(tmp_path, cloud) -> Cli:
    cli = Cli(tmp_path)
    cli.ok("login", "--url", cloud.base_url, "--token", cloud.admin_token)
    return cli


# -- show --------------------------------------------------------------------------------------------------------


def test_show_prints_the_full_shapes(admin, pushed):
    out = admin.ok("models", "show", "signal", "--version", str(pushed["v1"])).stdout
    assert "[n,1,40]" in out and "[n,3]" in out
    assert "float32" in out and f"signal v{pushed['v1']}" in out
    assert f"{pushed['v1']}, {pushed['v2']}, {pushed['tflite']}" in out  # every version of the model


def test_the_list_table_keeps_shapes_too(admin, pushed):
    assert "x:float32[n,1,40]" in admin.ok("models", "list").stdout


def test_show_defaults_to_the_latest_and_has_json(admin, pushed):
    view = json.loads(admin.ok("models", "show", "signal", "--json").stdout)
    assert view["version"] == pushed["tflite"] and view["format"] == "tflite"
    assert view["built_for_class"] == "pi-litert" and "pi-litert" in admin.ok("models", "show", "signal").stdout
    first = json.loads(admin.ok("models", "show", "signal", "--version", str(pushed["v1"]), "--json").stdout)
    assert first["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["n", 1, 40]}]


def test_show_of_an_unknown_model_or_version_is_one_line_exit_2(admin, pushed):
    err = admin.fails(2, "models", "show", "nope")
    assert "no model 'nope'" in err and "`fleet models`" in err
    err = admin.fails(2, "models", "show", "signal", "--version", "99")
    assert "model 'signal' has no version 99" in err and "`fleet models show signal`" in err


# -- pull --------------------------------------------------------------------------------------------------------


def test_pull_gives_back_the_pushed_bytes(admin, pushed, tmp_path):
    out_file = tmp_path / "back.onnx"
    out = admin.ok("models", "pull", "signal", "--version", str(pushed["v1"]), "-o", str(out_file)).stdout
    assert out_file.read_bytes() == pushed["onnx"]
    assert f"wrote {out_file}" in out and hashlib.sha256(pushed["onnx"]).hexdigest()[:12] in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_pull_without_output_uses_the_clouds_name_and_json_says_where(admin, pushed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    view = json.loads(admin.ok("models", "pull", "signal", "--version", str(pushed["v2"]), "--json").stdout)
    assert view["path"] == f"signal-v{pushed['v2']}.onnx"
    assert (tmp_path / view["path"]).read_bytes() == pushed["onnx"]
    assert view["sha256"] == hashlib.sha256(pushed["onnx"]).hexdigest()


def test_pull_for_an_onnx_class_is_the_model_file_in_its_bundle(admin, pushed, tmp_path, cloud):
    out_file = tmp_path / "rpi4.onnx"
    admin.ok("models", "pull", "signal", "--version", str(pushed["v1"]), "--class", "rpi4", "-o", str(out_file))
    bundle = cloud.fleet.store.get_bundle("signal", pushed["v1"], "rpi4")
    assert bundle is not None  # built by the pull, as a deployment would
    with cloud.fleet.blobs.open(bundle.sha256) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None and out_file.read_bytes() == member.read() == pushed["onnx"]


def test_pull_for_a_litert_class_is_its_tflite(admin, pushed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    view = json.loads(admin.ok("models", "pull", "signal", "--version", str(pushed["tflite"]), "--class",
                               "pi-litert", "--json").stdout)
    assert view["path"] == f"signal-v{pushed['tflite']}-pi-litert.tflite"
    assert (tmp_path / view["path"]).read_bytes() == fake_tflite()
    plain = json.loads(admin.ok("models", "pull", "signal", "--version", str(pushed["tflite"]), "--json").stdout)
    assert plain["path"] == f"signal-v{pushed['tflite']}.tflite"


def test_pull_refusals_are_one_line(admin, pushed, tmp_path):
    out_file = tmp_path / "x.onnx"
    assert "no model 'nope'" in admin.fails(2, "models", "pull", "nope", "--version", "1", "-o", str(out_file))
    err = admin.fails(2, "models", "pull", "signal", "--version", "99", "-o", str(out_file))
    assert "has no version 99" in err
    err = admin.fails(2, "models", "pull", "signal", "--version", "1", "--class", "no-such", "-o", str(out_file))
    assert "unknown device class 'no-such'" in err and "rpi4" in err
    # A variant built for one class is refused for another (its budgets were picked for that class).
    err = admin.fails(2, "models", "pull", "signal", "--version", str(pushed["tflite"]), "--class", "rpi4",
                      "-o", str(out_file))
    assert "built for class pi-litert" in err
    assert not out_file.exists()


def test_the_routes_answer_404_error_bodies(cloud, pushed):
    with cloud.client() as http:
        for path, where in (("/api/v1/models/nope/versions", "no model 'nope'"),
                            ("/api/v1/models/signal/versions/99", "has no version 99"),
                            ("/api/v1/models/nope/versions/1/file", "no model 'nope'"),
                            ("/api/v1/models/signal/versions/99/file", "has no version 99"),
                            ("/api/v1/models/signal/versions/1/file?device_class=zzz", "unknown device class")):
            r = http.get(path)
            assert r.status_code == 404 and where in r.json()["message"], (path, r.status_code, r.text)
        r = http.get(f"/api/v1/models/signal/versions/{pushed['v1']}/file")
        assert r.status_code == 200 and r.content == pushed["onnx"]
        assert r.headers["x-edgefleet-sha256"] == hashlib.sha256(pushed["onnx"]).hexdigest()
        assert r.headers["content-type"] == "application/octet-stream"
        assert http.get("/api/v1/models/signal/versions/1/file", headers={"Authorization": ""}).status_code == 401


def test_pull_shows_progress_for_a_large_file(cloud, tmp_path):
    """The client reports every chunk, in order, ending at the full size (the CLI draws its bar from these)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.fleet.client import FleetClient

    w = numpy_helper.from_array(np.ones((400_000,), dtype=np.float32), "w")  # 1.6 MB: several chunks
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [400_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [400_000])], [w])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    seen: list[tuple[int, int]] = []
    with FleetClient(cloud.base_url, cloud.admin_token) as client:
        view = client.push_model("wide", data)
        pulled = client.pull_model("wide", view.version, tmp_path / "wide.onnx",
                                   on_progress=lambda got, total: seen.append((got, total)))
    assert pulled.path.read_bytes() == data and pulled.size_bytes == len(data)
    assert len(seen) > 1 and seen[-1] == (len(data), len(data))
    assert [g for g, _ in seen] == sorted(g for g, _ in seen)


def test_a_download_that_does_not_match_its_sha256_is_not_written(tmp_path):
    """A server whose bytes differ from the digest it sent (a broken proxy, a damaged blob): exit 5, no file."""
    from http.server import BaseHTTPRequestHandler

    class Lying(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"not the model"
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("X-Edgefleet-Sha256", "0" * 64)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Lying) as url:
        out_file = tmp_path / "m.onnx"
        err = Cli(tmp_path).fails(5, "--url", url, "--token", "t", "models", "pull", "m", "--version", "1", "-o",
                                  str(out_file))
        assert "nothing written" in err and not out_file.exists()
        assert list(tmp_path.glob(".m.onnx*")) == []


@pytest.mark.parametrize("args", [("models", "show"), ("models", "pull")])
def test_help_has_examples(tmp_path, args):
    out = Cli(tmp_path).ok(*args, "--help").stdout
    assert "Examples:" in out and "$ fleet models" in out
