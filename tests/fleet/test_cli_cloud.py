"""The `fleet` CLI through typer's CliRunner against a real cloud (tests/cloud_server.py: uvicorn on a free port,
migrated SQLite, the same wiring as `edgefleet-cloud serve`): the happy paths and the refusals the cloud makes.
tests/fleet/test_cli.py has the error mapping no healthy cloud produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleet.cli_runner import IsolatedCli as Cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def tiny_onnx(scale: float = 2.0) -> bytes:
    """y = x * scale + 1 over float32 [N, 4]: a real ONNX model, made with onnx.helper, that ORT runs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "one"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
         numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    from tests.cloud_server import start_cloud_server

    server = start_cloud_server(tmp_path_factory.mktemp("cloud"), max_model_mb=1)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(cli, cloud) -> Cli:
    """The CLI logged in to the real cloud through `fleet login` (which verifies the token)."""
    cli.ok("login", "--url", cloud.base_url, "--token", cloud.admin_token)
    return cli


def enroll(cli: Cli, cloud, device_id: str, device_class: str = "rpi4", **labels: str) -> str:
    """Enroll a device the way an agent does, with a token from `fleet tokens create`; returns its device token."""
    from edgefleet.protos.messages import EnrollRequest, EnrollResponse

    token = json.loads(cli.ok("tokens", "create", "--note", "test", "--ttl", "1h", "--json").stdout)["token"]
    with cloud.client(token=token) as http:
        resp = http.post("/api/v1/enroll", content=EnrollRequest(
            device_id=device_id, device_class=device_class, labels=labels).to_wire(),
            headers={"Content-Type": "application/json"})
        assert resp.status_code in (200, 201), resp.text
    return EnrollResponse.model_validate_json(resp.content).device_token


def push(cli: Cli, tmp_path: Path, name: str, scale: float = 2.0) -> dict:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(tiny_onnx(scale))
    return json.loads(cli.ok("models", "push", str(path), "--name", name, "--json").stdout)


def test_push_and_list_models(admin, tmp_path):
    first = push(admin, tmp_path, "tiny")
    second = push(admin, tmp_path, "tiny", scale=3.0)
    assert (first["name"], second["version"]) == ("tiny", first["version"] + 1)
    assert first["inputs"][0]["name"] == "x" and first["outputs"][0]["name"] == "y"
    listed = json.loads(admin.ok("models", "list", "--json").stdout)
    assert {(m["name"], m["version"]) for m in listed} >= {("tiny", first["version"]), ("tiny", second["version"])}
    table = admin.ok("models", "list").stdout
    assert "tiny" in table and "x:float32" in table


def test_push_not_onnx_is_the_servers_reason_exit_2(admin, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is not a model\n")
    err = admin.fails(2, "models", "push", str(bogus), "--name", "bogus")
    assert err.startswith("error: ") and "onnx" in err.lower()


def test_push_too_large_is_exit_2(admin, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # over max_model_mb=1; also draws the progress bar path
    err = admin.fails(2, "models", "push", str(big), "--name", "big")
    assert "limit" in err


def test_classes_list(admin):
    classes = json.loads(admin.ok("classes", "list", "--json").stdout)
    names = {c["name"] for c in classes}
    assert "rpi4" in names and "x86-cpu" in names
    assert "rpi4" in admin.ok("classes", "list").stdout


def test_devices_list_and_show(admin, cloud):
    enroll(admin, cloud, "cli-dev-1", "rpi4", site="lab")
    devices = json.loads(admin.ok("devices", "list", "--json").stdout)
    mine = next(d for d in devices if d["device_id"] == "cli-dev-1")
    assert mine["device_class"] == "rpi4" and mine["labels"] == {"site": "lab"}
    assert "cli-dev-1" in admin.ok("devices", "list").stdout
    shown = json.loads(admin.ok("devices", "show", "cli-dev-1", "--json").stdout)
    assert shown["device_id"] == "cli-dev-1"
    assert "cli-dev-1" in admin.ok("devices", "show", "cli-dev-1").stdout
    assert "error:" in admin.fails(2, "devices", "show", "no-such-device")


def test_deploy_by_device_class_and_label(admin, cloud, tmp_path):
    enroll(admin, cloud, "cli-dep-1", "rpi4", site="shop")
    enroll(admin, cloud, "cli-dep-2", "x86-cpu", site="shop")
    v = push(admin, tmp_path, "tinydep")["version"]

    by_device = json.loads(admin.ok("deploy", "tinydep", "--device", "cli-dep-1", "--json").stdout)
    assert (by_device["target_kind"], by_device["devices"], by_device["version"]) == ("device", ["cli-dep-1"], v)
    assert [b["device_class"] for b in by_device["bundles"]] == ["rpi4"]

    by_class = json.loads(admin.ok("deploy", "tinydep", "--version", str(v), "--class", "x86-cpu", "--json").stdout)
    assert by_class["target_kind"] == "device_class" and "cli-dep-2" in by_class["devices"]

    by_label = json.loads(admin.ok("deploy", "tinydep", "--label", "site=shop", "--json").stdout)
    assert by_label["target_kind"] == "label" and {"cli-dep-1", "cli-dep-2"} <= set(by_label["devices"])
    assert {b["device_class"] for b in by_label["bundles"]} >= {"rpi4", "x86-cpu"}

    human = admin.ok("deploy", "tinydep", "--device", "cli-dep-1").stdout
    assert "deployed" in human and "tinydep" in human
    listed = json.loads(admin.ok("deployments", "list", "--json").stdout)
    assert {d["target_kind"] for d in listed if d["model"] == "tinydep"} == {"device", "device_class", "label"}

    err = admin.fails(2, "deploy", "no-such-model", "--class", "rpi4")
    assert "no model 'no-such-model'" in err and "`fleet models push`" in err
    err = admin.fails(2, "deploy", "tinydep", "--version", "999", "--device", "cli-dep-1")
    assert "model 'tinydep' has no version 999" in err and "no any" not in err


def test_deploy_with_budgets(admin, cloud, tmp_path):
    enroll(admin, cloud, "cli-bud-1", "rpi4")
    push(admin, tmp_path, "tinybud")
    view = json.loads(admin.ok("deploy", "tinybud", "--device", "cli-bud-1", "--p95-ms", "8", "--mj-per-inference",
                               "2.5", "--json").stdout)
    assert (view["p95_ms"], view["mj_per_inference"]) == (8.0, 2.5)
    human = admin.ok("deploy", "tinybud", "--device", "cli-bud-1", "--p95-ms", "8").stdout
    assert "budgets: p95 8 ms (over the class's)" in human
    assert "p95 8 ms, 2.5 mJ/inf" in admin.ok("deployments", "list").stdout
    err = admin.fails(2, "deploy", "tinybud", "--device", "cli-bud-1", "--p95-ms", "-3")
    assert "--p95-ms" in err


def test_deploy_to_a_label_no_device_has_warns_and_keeps_the_rule(admin, cloud, tmp_path):
    push(admin, tmp_path, "tinylater")
    result = admin("deploy", "tinylater", "--label", "site=nowhere", "--json")
    assert result.exit_code == 0, result.stderr
    view = json.loads(result.stdout)  # stdout stays the JSON alone
    assert view["devices"] == [] and view["target_kind"] == "label"
    warning = result.stderr.strip()
    assert warning.startswith("warning: no enrolled device is labelled site=nowhere") and "enroll later" in warning
    assert len(warning.splitlines()) == 1
    # The rule applies to a device that enrolls with the label afterwards.
    enroll(admin, cloud, "cli-later-1", "rpi4", site="nowhere")
    shown = json.loads(admin.ok("devices", "show", "cli-later-1", "--json").stdout)
    assert shown["desired_models"] == {"tinylater": view["version"]}
    # A target that reaches devices says nothing on stderr.
    assert admin.ok("deploy", "tinylater", "--label", "site=nowhere").stderr == ""


def test_deploy_to_a_class_with_no_device_warns(admin, tmp_path):
    push(admin, tmp_path, "tinyempty")
    result = admin("deploy", "tinyempty", "--class", "jetson-nano")
    assert result.exit_code == 0, result.stderr
    assert "warning: no enrolled device is of class jetson-nano" in result.stderr and "deployed" in result.stdout


def test_status_shows_desired_against_reported_with_latency_and_energy(admin, cloud, tmp_path):
    from datetime import datetime, timedelta, timezone

    from edgefleet.protos.messages import ModelStatus, ReportedState, TelemetryBatch, TelemetryWindow

    device_token = enroll(admin, cloud, "cli-stat-1", "rpi4")
    v = push(admin, tmp_path, "tinystat")["version"]
    admin.ok("deploy", "tinystat", "--device", "cli-stat-1")
    rows = [r for r in json.loads(admin.ok("status", "--json").stdout) if r["device_id"] == "cli-stat-1"]
    assert rows and rows[0]["desired_version"] == v and rows[0]["state"] != "in_sync"

    # What an agent reports after installing (over the HTTP fallback of the MQTT channels).
    now = datetime.now(timezone.utc)
    desired = json.loads(admin.ok("devices", "show", "cli-stat-1", "--json").stdout)["desired_generation"]
    reported = ReportedState(device_id="cli-stat-1", generation=desired, reported_at=now, models=[
        ModelStatus(name="tinystat", active_version=v, target_version=v, state="active")])
    batch = TelemetryBatch(device_id="cli-stat-1", seq=1, sent_at=now, windows=[TelemetryWindow(
        model="tinystat", version=v, start=now - timedelta(seconds=60), end=now, count=100, errors=0,
        p50_ms=1.25, p95_ms=2.5, mean_mj=0.75, energy_source="estimated", energy_meter="modelled")])
    with cloud.client(token=device_token) as http:
        for channel, msg in (("reported", reported), ("telemetry", batch)):
            resp = http.post(f"/api/v1/devices/cli-stat-1/{channel}", content=msg.to_wire(),
                             headers={"Content-Type": "application/json"})
            assert resp.status_code < 300, resp.text

    row = next(r for r in json.loads(admin.ok("status", "--json").stdout)
               if r["device_id"] == "cli-stat-1" and r["model"] == "tinystat")
    assert (row["active_version"], row["state"]) == (v, "in_sync")
    assert (row["p50_ms"], row["p95_ms"], row["mean_mj"], row["energy_source"]) == (1.25, 2.5, 0.75, "estimated")
    table = admin.ok("status").stdout
    assert "cli-stat-1" in table and "in_sync" in table and "1.25" in table and "estimated" in table


def test_tokens_create_table_and_json(admin):
    view = json.loads(admin.ok("tokens", "create", "--note", "lab", "--json").stdout)
    assert view["token"] and view["note"] == "lab"
    assert "enrollment token" in admin.ok("tokens", "create").stdout


def test_tokens_list_revoke_and_expire(admin, cloud):
    made = json.loads(admin.ok("tokens", "create", "--note", "to-revoke", "--json").stdout)
    listed = json.loads(admin.ok("tokens", "list", "--kind", "enroll", "--json").stdout)
    assert made["id"] in [t["id"] for t in listed] and all("token" not in t for t in listed)
    assert "to-revoke" in admin.ok("tokens", "list").stdout
    expired = json.loads(admin.ok("tokens", "expire", str(made["id"]), "--in", "30m", "--json").stdout)
    assert expired["id"] == made["id"] and expired["expires_at"]
    assert f"revoked enroll token {made['id']}" in admin.ok("tokens", "revoke", str(made["id"])).stdout
    with cloud.client(token=made["token"]) as http:
        assert http.post("/api/v1/enroll", json={"device_id": "x", "device_class": "rpi4"}).status_code == 401
    assert "no token" in admin.fails(2, "tokens", "revoke", str(made["id"]))  # gone: 404 is a refusal, exit 2
    admin_id = json.loads(admin.ok("tokens", "list", "--kind", "admin", "--json").stdout)[0]["id"]
    assert "cannot be revoked" in admin.fails(2, "tokens", "revoke", str(admin_id))
    assert "--kind" in admin.fails(2, "tokens", "list", "--kind", "root")
    assert "--in" in admin.fails(2, "tokens", "expire", "1", "--in", "soon")


def test_devices_reset(admin, cloud):
    device_token = enroll(admin, cloud, "cli-reset-1")
    out = admin.ok("devices", "reset", "cli-reset-1").stdout
    assert "cli-reset-1: reset" in out
    with cloud.client(token=device_token) as http:
        assert http.get("/api/v1/devices/cli-reset-1/desired").status_code == 401
    shown = json.loads(admin.ok("devices", "show", "cli-reset-1", "--json").stdout)
    assert shown["reset_pending"] is True
    assert "reset" in admin.ok("devices", "show", "cli-reset-1").stdout
    assert "no device" in admin.fails(2, "devices", "reset", "no-such-device")


def test_the_first_start_banner_prints_a_login_that_works(cli, cloud, capsys):
    import shlex

    from edgefleet.cloud.main import announce_admin_token

    announce_admin_token(cloud.admin_token, cloud.data_dir / "admin.token", str(cloud.settings.public_url))
    banner = capsys.readouterr().err
    (line,) = [ln.strip() for ln in banner.splitlines() if ln.strip().startswith("fleet login")]
    assert f"--url {cloud.base_url}" in line
    prog, *args = shlex.split(line)
    assert prog == "fleet"
    assert "saved" in cli.ok(*args).stdout
    assert json.loads(cli.ok("stats", "--json").stdout)["counters"] is not None


def test_a_token_of_the_wrong_kind_is_named_with_its_article(cli, cloud):
    token = json.loads(cli.ok("--url", cloud.base_url, "--token", cloud.admin_token, "tokens", "create",
                              "--json").stdout)["token"]
    err = cli.fails(4, "--url", cloud.base_url, "--token", token, "models", "list")
    assert "an enrollment token may not use it" in err


def test_real_cloud_wrong_token_is_exit_4(cli, cloud):
    err = cli.fails(4, "--url", cloud.base_url, "--token", "not-a-token", "models", "list")
    assert "fleet login" in err
    assert cli("--url", cloud.base_url, "--token", "not-a-token", "login", "--url", cloud.base_url,
               "--token", "nope").exit_code == 4


def test_stats_counts(admin):
    assert "counters" in json.loads(admin.ok("stats", "--json").stdout)


def test_bare_group_lists_like_the_clouds_hints_say(admin, cloud):
    enroll(admin, cloud, "cli-bare-1", "rpi4")
    assert any(d["device_id"] == "cli-bare-1" for d in json.loads(admin.ok("devices", "--json").stdout))
    assert "rpi4" in admin.ok("classes").stdout


def test_client_streams_uploads_with_progress(cloud):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.fleet.client import UPLOAD_CHUNK_BYTES, FleetClient

    # y = x + w with a 600 KB weight: several upload chunks, under the module cloud's 1 MB limit.
    w = numpy_helper.from_array(np.zeros((150_000,), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [150_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [150_000])], [w])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    seen: list[tuple[int, int]] = []
    with FleetClient(cloud.base_url, cloud.admin_token) as client:
        view = client.push_model("wide", data, on_progress=lambda sent, total: seen.append((sent, total)))
    assert view.size_bytes == len(data)
    assert len(seen) == -(-len(data) // UPLOAD_CHUNK_BYTES) and seen[-1] == (len(data), len(data))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
