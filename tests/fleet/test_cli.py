"""The `fleet` CLI through typer's CliRunner: against a real cloud (tests/cloud_server.py) for the happy paths and
the refusals the cloud makes, and against a closed port and a tiny real HTTP server for the error mapping that
no healthy cloud produces (5xx, non-JSON answers, wrong shapes).

Every error must be ONE line on stderr with the documented exit code: 2 usage/config/refused, 3 unreachable,
4 not authorised, 5 the cloud failed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.fleet.main import app
from tests.harness import http_server


class Cli:
    """Runs `fleet` with its own config folder and no EDGEFLEET_* variables from the developer's shell."""

    def __init__(self, tmp_path: Path) -> None:
        self.runner = CliRunner()
        self.env = {
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "HOME": str(tmp_path / "home"),
            "EDGEFLEET_URL": None,
            "EDGEFLEET_TOKEN": None,
            "EDGEFLEET_TIMEOUT_S": None,
            "COLUMNS": "200",
        }
        self.config_file = tmp_path / "xdg" / "edgefleet" / "cli.toml"

    def __call__(self, *args: str, **env: str):
        result = self.runner.invoke(app, list(args), env={**self.env, **env}, catch_exceptions=False)
        return result

    def ok(self, *args: str, **env: str):
        result = self(*args, **env)
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return result

    def fails(self, code: int, *args: str, **env: str) -> str:
        """Run, expect exit `code`, and return the single stderr line."""
        result = self(*args, **env)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        if code != 2 or lines[:1] and lines[0].startswith("error:"):  # usage errors are click's boxed help
            assert len(lines) == 1, result.stderr
        return result.stderr.strip()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def closed_port() -> int:
    """A port nothing listens on: bound then closed, so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# A tiny real HTTP server that answers what a broken or foreign server would


class _Scripted(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], tuple[int, str, bytes]] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        key = (self.command, self.path.split("?")[0])
        auth = self.headers.get("Authorization", "")
        if auth != "Bearer good":
            status, ctype, body = 401, "application/json", json.dumps(
                {"error": "unauthorized", "message": "the token is unknown or expired"}).encode()
        else:
            status, ctype, body = self.routes.get(key, (404, "application/json", json.dumps(
                {"error": "not_found", "message": f"no route {key[1]}"}).encode()))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's method names

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    _Scripted.routes = {
        ("GET", "/api/v1/stats"): (200, "application/json", b'{"counters": {"malformed_messages": 3}}'),
        ("GET", "/api/v1/models"): (500, "text/plain", b"Internal Server Error\ntraceback..."),
        ("GET", "/api/v1/devices"): (200, "text/html", b"<html>not an edgefleet cloud</html>"),
        ("GET", "/api/v1/status"): (200, "application/json", b'[{"device_id": "d1"}]'),
        ("GET", "/api/v1/classes"): (200, "application/json", json.dumps({"classes": [{
            "name": "tiny", "cores": 1, "memory_mb": 64, "runtimes": ["onnxruntime"], "idle_watts": 0.1,
            "active_watts": 0.5}]}).encode()),
        ("POST", "/api/v1/models"): (413, "application/json", json.dumps(
            {"error": "too_large", "message": "the model is larger than the 1 MB limit\n(Content-Length 2)"}).encode()),
    }
    with http_server(_Scripted) as url:
        yield url


def test_unreachable_cloud_is_one_line_exit_3(cli):
    url = f"http://127.0.0.1:{closed_port()}"
    err = cli.fails(3, "--url", url, "--token", "t", "devices", "list")
    assert err.startswith(f"error: cannot reach the cloud at {url}: is `edgefleet-cloud serve` running?")
    assert "Connect" in err


def test_env_configures_and_option_overrides_env(cli, scripted):
    dead = f"http://127.0.0.1:{closed_port()}"
    out = cli.ok("stats", "--json", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")
    assert json.loads(out.stdout)["counters"] == {"malformed_messages": 3}
    cli.fails(3, "--url", dead, "stats", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")
    cli.fails(4, "--token", "bad", "stats", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")


def test_wrong_token_is_exit_4_with_the_servers_message_and_a_hint(cli, scripted):
    err = cli.fails(4, "--url", scripted, "--token", "bad", "stats")
    assert "the token is unknown or expired" in err and "fleet login" in err


def test_server_failure_and_foreign_answers_are_exit_5(cli, scripted):
    err = cli.fails(5, "--url", scripted, "--token", "good", "models", "list")
    assert "Internal Server Error" in err and "traceback" not in err
    err = cli.fails(5, "--url", scripted, "--token", "good", "devices", "list")
    assert "is the URL an edgefleet cloud" in err
    cli.fails(5, "--url", scripted, "--token", "good", "status")


@pytest.fixture
def plain_http(tmp_path) -> Iterator[str]:
    """`python -m http.server`: a real web server that is not the cloud (HTML 404s, a directory listing at /)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html>hello</html>")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    with http_server(partial(Quiet, directory=str(tmp_path / "site"))) as url:
        yield url


@pytest.fixture
def foreign_api() -> Iterator[str]:
    """Another JSON API (FastAPI, not edgefleet): its 404s are `{"detail": "Not Found"}`."""
    from fastapi import FastAPI

    from tests.cloud_server import serve_app

    other = FastAPI()

    @other.get("/hello")
    def hello() -> dict:
        return {"hello": "world"}

    server = serve_app(other)
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.mark.parametrize("server", ["plain_http", "foreign_api"])
@pytest.mark.parametrize("args", [("devices", "list"), ("stats",), ("deploy", "m", "--class", "rpi4"),
                                  ("models", "pull", "m", "--version", "1", "-o", "m.onnx")])
def test_a_url_that_is_not_the_cloud_is_exit_5_in_one_line(cli, request, server, args):
    url = request.getfixturevalue(server)
    err = cli.fails(5, "--url", url, "--token", "t", *args)
    # http.server answers a POST 501 (no such method), everything else 404; neither is an edgefleet ErrorBody.
    assert "not an edgefleet" in err and "--url" in err and ("404" in err or "501" in err)
    assert "{" not in err and "<html" not in err.lower()  # none of the server's raw body


def test_login_to_something_that_is_not_the_cloud_is_exit_5(cli, plain_http):
    err = cli.fails(5, "login", "--url", plain_http, "--token", "t")
    assert "is it the cloud's URL?" in err
    assert not cli.config_file.exists()


def test_refusal_message_is_the_servers_on_one_line_exit_2(cli, scripted, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"xx")
    err = cli.fails(2, "--url", scripted, "--token", "good", "models", "push", str(model), "--name", "m")
    assert err == "error: the model is larger than the 1 MB limit (Content-Length 2)"
    err = cli.fails(2, "--url", scripted, "--token", "good", "devices", "show", "nope")
    assert "no route /api/v1/devices/nope" in err


def test_classes_accepts_the_wrapped_view_too(cli, scripted):
    out = cli.ok("--url", scripted, "--token", "good", "classes", "list", "--json")
    assert [c["name"] for c in json.loads(out.stdout)] == ["tiny"]


def test_login_verifies_then_writes_0600(cli, scripted):
    cli.fails(4, "login", "--url", scripted, "--token", "bad")
    assert not cli.config_file.exists()
    out = cli.ok("login", "--url", scripted, "--token", "good")
    assert str(cli.config_file) in out.stdout
    assert cli.config_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(cli.ok("stats", "--json").stdout)["counters"]["malformed_messages"] == 3


def test_login_to_a_dead_cloud_suggests_no_verify(cli):
    url = f"http://127.0.0.1:{closed_port()}"
    err = cli.fails(3, "login", "--url", url, "--token", "t")
    assert "--no-verify" in err
    cli.ok("login", "--url", url, "--token", "t", "--no-verify")
    assert cli.config_file.exists()


def test_no_config_at_all_is_exit_2(cli):
    err = cli.fails(2, "devices", "list")
    assert "no cloud URL configured" in err and "fleet login" in err
    err = cli.fails(2, "devices", "list", EDGEFLEET_URL="http://127.0.0.1:9")
    assert "no token configured" in err


def test_bad_config_file_is_exit_2_naming_the_file(cli):
    cli.config_file.parent.mkdir(parents=True)
    cli.config_file.write_text('url = "http://a:1"\ntoken = [1, 2]\n')
    err = cli.fails(2, "status")
    assert str(cli.config_file) in err and "'token'" in err
    cli.config_file.write_text("url = = =")
    assert "not valid TOML" in cli.fails(2, "status")


def test_bad_url_option_is_exit_2(cli):
    assert "must look like http" in cli.fails(2, "--url", "cloud:8080", "--token", "t", "status")


def test_deploy_needs_exactly_one_target(cli):
    base = ("--url", f"http://127.0.0.1:{closed_port()}", "--token", "t", "deploy", "digits")
    for extra in ((), ("--device", "d1", "--class", "rpi4"), ("--class", "rpi4", "--label", "a=b")):
        result = cli(*base, *extra)
        assert result.exit_code == 2, result.stderr
        assert "exactly one target" in result.stderr
    result = cli(*base, "--label", "nolabel")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_push_nonexistent_file_is_a_usage_error(cli, tmp_path):
    result = cli("--url", "http://127.0.0.1:9", "--token", "t", "models", "push", str(tmp_path / "nope.onnx"),
                 "--name", "x")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_tokens_ttl_is_checked(cli):
    result = cli("--url", "http://127.0.0.1:9", "--token", "t", "tokens", "create", "--ttl", "soon")
    assert result.exit_code == 2 and "--ttl" in result.stderr


@pytest.mark.parametrize("args", [
    (), ("login",), ("devices",), ("devices", "list"), ("devices", "show"), ("classes", "list"), ("models",),
    ("models", "push"), ("models", "list"), ("deploy",), ("deployments", "list"), ("status",), ("stats",),
    ("tokens", "create"), ("tokens", "list"), ("tokens", "revoke"), ("tokens", "expire"), ("devices", "reset"),
])
def test_every_command_has_help_with_examples(cli, args):
    out = cli.ok(*args, "--help").stdout
    assert "Usage:" in out
    if args and args[-1] not in ("devices", "models"):
        assert "Examples:" in out and "$ fleet" in out or "TOKEN=$(fleet" in out


# ---------------------------------------------------------------------------------------------------------------
# Against the real cloud: uvicorn on a free port, migrated SQLite, the same wiring as `edgefleet-cloud serve`


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
