"""cloud/provenance.py and cloud/services_provenance.py: every bundle the Fleet builds carries a signed in-toto
statement listed in its manifest; the served view signs the archive too; the key is the cloud's own; the predicate
of a distilled variant records teacher, transfer set, spec, student and quantisation; and the agent's unpacker
accepts such a bundle and checks the statement's hash like any member's."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.errors import NotFound, Unavailable
from edgefleet.cloud.provenance import KEY_FILE, PUBLIC_KEY_FILE, predicate
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.common import dsse
from edgefleet.edge_agent.errors import BundleError
from edgefleet.edge_agent.unpack import unpack_bundle
from edgefleet.protos.api import DeployRequest
from edgefleet.protos.messages import Manifest
from edgefleet.protos.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    PROVENANCE_FILE,
    STATEMENT_TYPE,
    DsseEnvelope,
    ProvenancePredicate,
)
from tests.cloud_server import tiny_onnx

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def fleet(tmp_path: Path):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                     public_url="https://cloud.example:8443"))
    yield f
    f.close()


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def archive_of(fleet: Fleet, sha: str) -> bytes:
    with fleet.blobs.open(sha) as f:
        return f.read()


def payload(envelope: DsseEnvelope) -> dict:
    return json.loads(base64.b64decode(envelope.payload))


def test_a_built_bundle_carries_a_signed_statement_listed_in_its_manifest(fleet):
    model = tiny_onnx()
    fleet.push_model("tiny", model)
    [bundle] = fleet.deploy(DeployRequest(model="tiny", device_class="rpi4")).bundles
    got = members(archive_of(fleet, bundle.sha256))
    assert list(got) == ["manifest.json", "model.onnx", PROVENANCE_FILE, "smoke/expected.npz", "smoke/input.npz"]
    manifest = Manifest.model_validate_json(got["manifest.json"])
    listed = {f.path: f.sha256 for f in manifest.files}
    assert listed[PROVENANCE_FILE] == hashlib.sha256(got[PROVENANCE_FILE]).hexdigest()

    envelope = DsseEnvelope.model_validate_json(got[PROVENANCE_FILE])
    body, key = dsse.verify(envelope, fleet.provenance_keys().keys, PAYLOAD_TYPE)
    statement = json.loads(body)
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "model.onnx", "digest": {"sha256": hashlib.sha256(model).hexdigest()}}]
    facts = ProvenancePredicate.model_validate(statement["predicate"])
    assert (facts.source.role, facts.source.name, facts.source.version) == ("pushed", "tiny", 1)
    assert facts.source.sha256 == hashlib.sha256(model).hexdigest() == facts.model.sha256
    assert facts.distillation is None and facts.quantization is None
    assert (facts.target.device_class, facts.target.target_path) == ("rpi4", bundle.target_path)
    assert facts.builder.version and facts.built_at == facts.model.created_at


def test_the_provenance_key_is_its_own_private_file_and_survives_a_restart(fleet, tmp_path):
    keys = fleet.settings.keys_dir
    assert stat.S_IMODE((keys / KEY_FILE).stat().st_mode) == 0o600  # made at start, before any bundle
    [key] = fleet.provenance_keys().keys
    assert key.keyid != fleet.signer.keyid  # not the desired-state key
    assert dsse.key_from_pem((keys / PUBLIC_KEY_FILE).read_bytes()) == key
    again = Fleet.from_settings(fleet.settings)
    try:
        assert again.provenance_keys().keys == [key]
    finally:
        again.close()


def test_the_statement_is_deterministic_so_rebuilt_bundles_are_the_same(fleet):
    fleet.push_model("tiny", tiny_onnx())
    row = fleet.store.get_model_version("tiny", 1)
    cls = builtin_catalog()["rpi4"]
    first = fleet._bundle_provenance(row, cls, tiny_onnx(), "model.onnx", "bundles/tiny/v1/rpi4.tar.gz")
    assert fleet._bundle_provenance(row, cls, tiny_onnx(), "model.onnx", "bundles/tiny/v1/rpi4.tar.gz") == first


def test_the_served_view_signs_the_archive_with_the_same_predicate(fleet):
    fleet.push_model("tiny", tiny_onnx())
    with pytest.raises(NotFound, match="no bundle yet"):
        fleet.bundle_provenance("tiny", 1)
    with pytest.raises(NotFound, match="no version 7"):
        fleet.bundle_provenance("tiny", 7, "rpi4")
    [view] = fleet.bundle_provenance("tiny", 1, "rpi4")  # builds the bundle, as a deployment would
    archive = archive_of(fleet, view.bundle_sha256)
    assert fleet.tuf.get_target(view.target_path).sha256 == hashlib.sha256(archive).hexdigest()
    keys = fleet.provenance_keys().keys
    outer = json.loads(dsse.verify(view.envelope, keys, PAYLOAD_TYPE)[0])
    inner = json.loads(dsse.verify(view.embedded, keys, PAYLOAD_TYPE)[0])
    assert {s["name"]: s["digest"]["sha256"] for s in outer["subject"]} == {
        view.target_path: hashlib.sha256(archive).hexdigest(),
        "model.onnx": hashlib.sha256(tiny_onnx()).hexdigest()}
    assert outer["predicate"] == inner["predicate"]
    assert view.embedded == DsseEnvelope.model_validate_json(members(archive)[PROVENANCE_FILE])
    # Without a class: the bundles built so far; asking again gives the same bytes (ed25519 is deterministic).
    assert fleet.bundle_provenance("tiny", 1) == [view]


def _job(n_train: int) -> dict:
    chosen = {"candidate": "mlp-w0.5-d1", "family": "mlp", "width_mult": 0.5, "depth": 1, "precision": "int8",
              "runtime": "onnxruntime", "accuracy": 0.9, "agreement": 0.95}
    report = {"teacher": {"size_bytes": 999}, "teacher_output_kind": "logits", "n_samples": n_train + 72,
              "n_train": n_train, "n_val": 36, "n_heldout": 36, "has_labels": True,
              "students": [{"candidate": "mlp-w0.5-d1", "hidden": [16], "epochs": 12, "best_epoch": 9}],
              "classes": {"x86-cpu": {"chosen": chosen}}}
    return {"spec": {"name": "digits", "distill": {"seed": 3, "temperature": 4.0, "max_epochs": 60}},
            "inputs": {"teacher": "a" * 64, "data": "b" * 64},
            "result": {"report": report, "provenance": {"5": {"student_sha256": "c" * 64}}}}


def _predicate(job, precision="int8", runtime="onnxruntime", **kw) -> ProvenancePredicate:
    return predicate(name="digits", version=5, sha256_hex="d" * 64, size_bytes=10, created_at=CREATED,
                     precision=precision, runtime=runtime, fmt="onnx", model_file="model.onnx",
                     device_class=builtin_catalog()["x86-cpu"], target_path="bundles/digits/v5/x86-cpu.tar.gz",
                     job=job, job_id=4, **kw)


@pytest.mark.parametrize("precision, runtime, n_train, tool, rows", [
    ("int8", "onnxruntime", 168, "onnxruntime.quantization.quantize_static", 168),
    ("int8", "onnxruntime", 5000, "onnxruntime.quantization.quantize_static", 512),  # artifacts' sample cap
    ("fp16", "onnxruntime", 168, "onnxruntime.transformers.float16.convert_float_to_float16", None),
    ("int8", "litert", 168, "onnx2tf", 168),
    ("fp32", "onnxruntime", 168, None, None),
])
def test_a_distilled_variants_predicate_records_the_chain(precision, runtime, n_train, tool, rows):
    facts = _predicate(_job(n_train), precision, runtime, teacher_ref=("big", 2), transfer_size=4096)
    assert (facts.source.role, facts.source.name, facts.source.version, facts.source.sha256) == (
        "teacher", "big", 2, "a" * 64)
    d = facts.distillation
    assert d.job_id == 4 and d.spec["temperature"] == 4.0 and d.teacher_output_kind == "logits"
    assert (d.transfer_set.sha256, d.transfer_set.size_bytes, d.transfer_set.train_rows) == ("b" * 64, 4096, n_train)
    assert (d.student.candidate, d.student.sha256, d.student.epochs, d.student.hidden) == (
        "mlp-w0.5-d1", "c" * 64, 12, [16])
    if tool is None:
        assert facts.quantization is None
    else:
        q = facts.quantization
        assert (q.precision, q.tool, q.calibration_rows) == (precision, tool, rows)
    if (precision, runtime) == ("int8", "onnxruntime"):
        settings = facts.quantization.settings
        assert (settings["format"], settings["per_channel"], settings["weight_type"]) == ("QDQ", True, "QInt8")


def test_a_variant_whose_job_recorded_nothing_keeps_what_is_known():
    facts = _predicate({"spec": {}, "inputs": {"teacher": "a" * 64}, "result": None})
    assert facts.source.name is None and facts.distillation.student is None and facts.distillation.transfer_set is None
    assert facts.quantization.calibration_rows is None


def test_a_variant_of_an_unfinished_job_waits_for_its_facts(fleet):
    job = fleet.store.enqueue_job("distill", spec={"name": "tiny", "distill": {"seed": 1}},
                                  inputs={"teacher": "e" * 64, "data": "f" * 64}, max_attempts=1, now=CREATED)
    variant = SimpleNamespace(precision="fp32", runtime="onnxruntime", fmt="onnx", data=tiny_onnx())
    fleet.register_variant("tiny", variant, tiny_onnx(), device_class="x86-cpu", job_id=job.id)
    with pytest.raises(Unavailable, match=f"job {job.id}, which is still queued"):
        fleet.bundle_provenance("tiny", 1)
    fleet.store.request_cancel(job.id, CREATED)
    [view] = fleet.bundle_provenance("tiny", 1)  # its class's bundle, built_for_class
    facts = ProvenancePredicate.model_validate(payload(view.envelope)["predicate"])
    assert view.device_class == "x86-cpu" and facts.distillation.job_id == job.id
    assert facts.source.role == "teacher" and facts.distillation.spec == {"seed": 1}


def _repack(archive: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            body = data if m.name == name else src.extractfile(m).read()
            m.size = len(body)
            dst.addfile(m, io.BytesIO(body))
    return out.getvalue()


def test_the_agents_unpack_accepts_the_bundle_and_checks_the_statements_hash(fleet, tmp_path):
    fleet.push_model("tiny", tiny_onnx())
    [view] = fleet.bundle_provenance("tiny", 1, "rpi4")
    archive = archive_of(fleet, view.bundle_sha256)
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(archive)
    manifest = unpack_bundle(path, tmp_path / "stage")
    assert manifest.model_file == "model.onnx"
    assert (tmp_path / "stage" / PROVENANCE_FILE).read_bytes() == members(archive)[PROVENANCE_FILE]
    # The manifest covers it: a changed statement is refused like any changed member.
    forged = payload(view.embedded) | {"predicate": {}}
    changed = view.embedded.model_copy(update={"payload": base64.b64encode(json.dumps(forged).encode()).decode()})
    path.write_bytes(_repack(archive, PROVENANCE_FILE, changed.to_wire()))
    with pytest.raises(BundleError, match=PROVENANCE_FILE):
        unpack_bundle(path, tmp_path / "stage2")


def test_the_routes_are_for_the_admin_only(tmp_path):
    from tests.cloud_server import cloud_server, enroll_device

    with cloud_server(tmp_path / "cloud") as server, server.client() as admin:
        assert admin.post("/api/v1/models", params={"name": "tiny"}, content=tiny_onnx(),
                          headers={"Content-Type": "application/octet-stream"}).status_code == 201
        device = enroll_device(admin, "pi-1")
        paths = ["/api/v1/provenance/keys", "/api/v1/models/tiny/versions/1/provenance?device_class=rpi4"]
        with server.client(token="") as anon, server.client(token=device.device_token) as dev:
            for path in paths:
                assert anon.get(path).status_code == 401
                assert dev.get(path).status_code == 403
        keys = admin.get(paths[0]).json()["keys"]
        assert [k["keyid"] for k in keys] == [server.fleet.provenance_keys().keys[0].keyid]
        [view] = admin.get(paths[1]).json()
        assert view["envelope"]["payloadType"] == PAYLOAD_TYPE and view["device_class"] == "rpi4"
        assert admin.get("/api/v1/models/tiny/versions/0/provenance").status_code == 422
