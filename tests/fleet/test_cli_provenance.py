"""`fleet models provenance` (fleet/commands_provenance.py, fleet/provenance.py) through typer's CliRunner: against
the real cloud (tests/cloud_server.py) for a pushed model and for a tiny real distillation, with the key `fleet
login` pinned; and against a small real HTTP server that serves what the real cloud answered, altered, for the
refusals (a changed statement, another key, a bundle that is not the signed one, another payloadType, a served
copy that is not the bundle's). Every refusal is one line on stderr and exit 2."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.fleet.provenance import PINNED_FILE
from tests.cloud_server import cloud_server, tiny_onnx
from tests.fleet.cli_runner import Cli as CliRunnerBase
from tests.harness import http_server
from tests.job_kinds import tiny_teacher, tiny_transfer


class Cli(CliRunnerBase):
    """The shared runner with no URL or token in the environment (each test logs in, which pins the key); a failure
    also leaves stdout empty."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.pinned = home / "xdg" / "edgefleet" / PINNED_FILE

    def fails(self, *args: str, code: int = 2) -> str:
        line = super().fails(*args, code=code)
        assert self.last.stdout == ""
        return line


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with cloud_server(tmp_path_factory.mktemp("cloud")) as server:
        yield server


@pytest.fixture
def cli(tmp_path: Path, cloud) -> Cli:
    c = Cli(tmp_path)
    out = c.ok("login", "--url", cloud.base_url, "--token", cloud.admin_token).stdout
    assert "pinned provenance key" in out and c.pinned.is_file()
    return c


def _push(cli: Cli, tmp_path: Path, name: str, data: bytes) -> int:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    return json.loads(cli.ok("models", "push", str(path), "--name", name, "--json").stdout)["version"]


def test_a_pushed_models_chain_is_verified_against_the_pinned_key(cli, cloud, tmp_path):
    version = _push(cli, tmp_path, "plain", tiny_onnx())
    out = cli.ok("models", "provenance", "plain", "--version", str(version), "--class", "rpi4").stdout
    assert f"plain v{version} for rpi4: provenance verified" in out
    assert f"source model: plain v{version} (pushed)" in out
    assert f"bundle: bundles/plain/v{version}/rpi4.tar.gz" in out and "built by edgefleet" in out
    assert "student" not in out and "variant" not in out
    [got] = json.loads(cli.ok("models", "provenance", "plain", "--class", "rpi4", "--json").stdout)
    target = cloud.fleet.tuf.get_target(f"bundles/plain/v{version}/rpi4.tar.gz")
    assert got["bundle_sha256"] == target.sha256  # the bytes devices get, checked against the signed subject
    assert got["predicate"]["source"]["role"] == "pushed" and got["statement"]["_type"].startswith("https://in-toto")
    assert got["keyid"] == json.loads(cli.pinned.read_text())["keys"][0]["keyid"]
    assert "unknown device class 'nope'" in cli.fails("models", "provenance", "plain", "--class", "nope")
    assert "no model 'nope'" in cli.fails("models", "provenance", "nope")


def test_a_distilled_models_chain_names_teacher_student_and_variant(cli, cloud, tmp_path):
    from edgefleet.cloud.worker import Worker

    teacher_version = _push(cli, tmp_path, "big", tiny_teacher())  # the teacher is in the registry too
    teacher, data = tmp_path / "teacher.onnx", tmp_path / "transfer.npz"
    teacher.write_bytes(tiny_teacher())
    data.write_bytes(tiny_transfer())
    # --max-accuracy-drop 100: the cheapest student that fits ships, however far its 3 epochs leave it from the
    # teacher (the chain of a student is what this test reads).
    cli.ok("distill", str(teacher), "--data", str(data), "--classes", "rpi4", "--name", "small", "--max-epochs",
           "3", "--max-accuracy-drop", "100", "--no-wait")
    assert Worker.from_fleet(cloud.fleet, "test-worker").run_once()
    out = cli.ok("models", "provenance", "small").stdout  # the latest version, its class's bundle
    assert f"source model (teacher): big v{teacher_version}" in out
    assert "student: " in out and "fp32 sha256 " in out and "distilled by job" in out and "240 rows" in out
    assert "variant: small v1" in out and "bundle: bundles/small/v1/rpi4.tar.gz" in out
    [got] = json.loads(cli.ok("models", "provenance", "small", "--version", "1", "--json").stdout)
    facts = got["predicate"]
    assert facts["distillation"]["spec"]["max_epochs"] == 3 and facts["distillation"]["student"]["sha256"]
    assert facts["distillation"]["transfer_set"]["sha256"] == cloud.fleet.store.get_job(
        facts["distillation"]["job_id"]).inputs["data"]
    precision = facts["model"]["precision"]
    assert (facts["quantization"] or {}).get("precision") == (None if precision == "fp32" else precision)
    if precision == "int8":
        assert "quantised to int8" in out and "calibrated on" in out


def test_a_quantised_variant_shows_how_it_was_quantised():
    # The tiny distillation above picks fp32 (int8 does not pay on a model this small), so the int8 step of the
    # chain is drawn from the predicate the cloud would sign for one.
    from datetime import datetime, timezone

    from rich.console import Console

    from edgefleet.cloud.catalog import builtin_catalog
    from edgefleet.cloud.provenance import predicate
    from edgefleet.fleet.commands_provenance import chain_tree
    from edgefleet.fleet.provenance import VerifiedBundle

    report = {"n_train": 168, "n_samples": 240, "classes": {"rpi4": {"chosen": {
        "candidate": "mlp-w0.5-d1", "family": "mlp", "width_mult": 0.5, "depth": 1}}}}
    facts = predicate(name="small", version=2, sha256_hex="d" * 64, size_bytes=10,
                      created_at=datetime(2025, 3, 1, tzinfo=timezone.utc), precision="int8", runtime="onnxruntime",
                      fmt="onnx", model_file="model.onnx", device_class=builtin_catalog()["rpi4"],
                      target_path="bundles/small/v2/rpi4.tar.gz", job_id=9,
                      job={"inputs": {"teacher": "a" * 64, "data": "b" * 64}, "result": {"report": report}})
    console = Console(record=True, width=250)
    console.print(chain_tree(VerifiedBundle(model="small", version=2, device_class="rpi4",
                                            target_path="bundles/small/v2/rpi4.tar.gz", bundle_sha256="e" * 64,
                                            keyid="f" * 64, statement={}, predicate=facts)))
    out = console.export_text()
    assert "source model (teacher): uploaded with the job, sha256 aaaaaaaaaaaaaaaa" in out
    assert "student: mlp-w0.5-d1 (mlp, width x0.5, depth 1)" in out and "fp32 sha256 not recorded" in out
    assert "variant: small v2, int8 for onnxruntime (onnx)" in out
    assert ("quantised to int8 with onnxruntime.quantization.quantize_static: QDQ, per-channel, activations QInt8, "
            "weights QInt8, MinMax calibration, calibrated on 168 rows") in out
    assert "bundle: bundles/small/v2/rpi4.tar.gz, sha256 eeeeeeeeeeeeeeee, class rpi4" in out


# ---------------------------------------------------------------------------------------------------------------
# Refusals: the real cloud's answers, served altered by a small real HTTP server


class _Scripted(BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {}

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?")[0])
        if route is None or self.headers.get("Authorization") != "Bearer good":
            status, ctype, body = 404, "application/json", json.dumps(
                {"error": "not_found", "message": f"no route {self.path}"}).encode()
        else:
            status, (ctype, body) = 200, route
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def answers(cloud, tmp_path_factory) -> dict:
    """What the real cloud says about a pushed model's rpi4 bundle, and its key as a file."""
    folder = tmp_path_factory.mktemp("answers")
    with cloud.client() as http:
        r = http.post("/api/v1/models", params={"name": "served"}, content=tiny_onnx(),
                      headers={"Content-Type": "application/octet-stream"})
        version = r.json()["version"]
        views = http.get(f"/api/v1/models/served/versions/{version}/provenance",
                         params={"device_class": "rpi4"}).json()
        archive = http.get(f"/tuf/targets/{views[0]['target_path']}").content
        (folder / "key.json").write_text(http.get("/api/v1/provenance/keys").text)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (folder / "other.pem").write_bytes(other)
    return {"version": version, "views": views, "archive": archive, "key": folder / "key.json",
            "other": folder / "other.pem"}


@pytest.fixture
def scripted(answers) -> Iterator[str]:
    with http_server(_Scripted) as url:
        yield url


def _serve(answers: dict, views: list, archive: bytes) -> None:
    _Scripted.routes = {
        f"/api/v1/models/served/versions/{answers['version']}/provenance": ("application/json",
                                                                           json.dumps(views).encode()),
        f"/tuf/targets/{answers['views'][0]['target_path']}": ("application/gzip", archive),
    }


def _changed_payload(envelope: dict, change) -> dict:
    statement = json.loads(base64.b64decode(envelope["payload"]))
    change(statement)
    return envelope | {"payload": base64.b64encode(json.dumps(statement).encode()).decode()}


def _view(answers: dict, **fields) -> list:
    return [answers["views"][0] | fields]


def _set_precision(s: dict) -> None:
    s["predicate"]["model"]["precision"] = "int8"


CASES = {
    "changed statement": (lambda a: (_view(a, envelope=_changed_payload(a["views"][0]["envelope"], _set_precision)),
                                     a["archive"], "key"), "no signature verifies"),
    "another key": (lambda a: (a["views"], a["archive"], "other"), "no signature verifies under the trusted key"),
    "not the signed bundle": (lambda a: (a["views"], a["archive"] + b"\0" * 512, "key"),
                              "is not the one that was signed"),
    "another payloadType": (lambda a: (_view(a, envelope=a["views"][0]["envelope"] | {"payloadType": "text/plain"}),
                                       a["archive"], "key"), "payloadType is 'text/plain'"),
    "served copy differs": (lambda a: (_view(a, embedded=_changed_payload(a["views"][0]["embedded"], _set_precision)),
                                       a["archive"], "key"), "the envelope the cloud served is not the one inside"),
    "no provenance": (lambda a: (_view(a, envelope=None, embedded=None), a["archive"], "key"),
                      "carries no provenance"),
}


def test_the_unaltered_answers_verify_through_the_scripted_server(tmp_path, answers, scripted):
    _serve(answers, answers["views"], answers["archive"])
    out = Cli(tmp_path).ok("--url", scripted, "--token", "good", "models", "provenance", "served", "--version",
                           str(answers["version"]), "--key", str(answers["key"])).stdout
    assert "provenance verified" in out


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_answer_is_one_line_and_exit_2(tmp_path, answers, scripted, case):
    make, expected = CASES[case]
    views, archive, key = make(answers)
    _serve(answers, views, archive)
    err = Cli(tmp_path).fails("--url", scripted, "--token", "good", "models", "provenance", "served", "--version",
                              str(answers["version"]), "--key", str(answers[key]))
    assert expected in err, err


def test_without_a_pinned_key_or_key_file_nothing_is_trusted(tmp_path, answers, scripted):
    _serve(answers, answers["views"], answers["archive"])
    err = Cli(tmp_path).fails("--url", scripted, "--token", "good", "models", "provenance", "served", "--version",
                              str(answers["version"]))
    assert "no provenance key is pinned" in err and "fleet login" in err and "--key" in err


def test_a_good_statement_about_another_version_is_refused(tmp_path, answers, scripted):
    # A replay: asked for the next version, the server answers with the (validly signed) answer for this one.
    asked = answers["version"] + 1
    _serve(answers, answers["views"], answers["archive"])
    _Scripted.routes[f"/api/v1/models/served/versions/{asked}/provenance"] = (
        "application/json", json.dumps(answers["views"]).encode())
    err = Cli(tmp_path).fails("--url", scripted, "--token", "good", "models", "provenance", "served", "--version",
                              str(asked), "--key", str(answers["key"]))
    assert f"not served v{asked} as asked" in err, err


def test_the_teacher_ships_as_its_own_variant_when_no_student_matches_it(cli, cloud, tmp_path):
    """Students that cannot stand in (one epoch at a learning rate that barely moves them) and no allowance below the
    teacher: the teacher's own variant is the best choice; it becomes the version, the report says why, and its
    chain says that no student shipped."""
    import hashlib

    from edgefleet.cloud.worker import Worker

    teacher = tiny_teacher()
    spec = {"name": "same", "classes": ["x86-cpu"], "max_epochs": 1, "learning_rate": 1e-7, "max_candidates": 2,
            "max_accuracy_drop": 0.0}
    with cloud.client() as c:
        r = c.post("/api/v1/distill", files={"teacher": ("t.onnx", teacher), "data": ("d.npz", tiny_transfer())},
                   data={"spec": json.dumps(spec)})
        assert r.status_code == 201, r.text
    assert Worker.from_fleet(cloud.fleet, "test-worker").run_once()
    job = json.loads(cli.ok("jobs", "list", "--json").stdout)[0]  # newest first
    assert job["state"] == "succeeded", job
    report = json.loads(cli.ok("jobs", "report", str(job["id"]), "--json").stdout)
    cr = report["classes"]["x86-cpu"]
    assert cr["teacher_is_best"] and cr["chosen"]["family"] == "teacher", cr["reason"]
    assert "the teacher itself is the best choice" in cr["reason"]
    assert "the teacher itself is the best choice" in cli.ok("jobs", "report", str(job["id"])).stdout
    [version] = job["versions"]
    pulled = tmp_path / "pulled.onnx"
    cli.ok("models", "pull", "same", "--version", str(version["version"]), "--class", "x86-cpu", "-o", str(pulled))
    if version["precision"] == "fp32":  # int8 where it pays: then the teacher's quantized copy
        assert hashlib.sha256(pulled.read_bytes()).digest() == hashlib.sha256(teacher).digest()
    out = cli.ok("models", "provenance", "same").stdout
    assert "no student: the teacher's own variant shipped" in out
