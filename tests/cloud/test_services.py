"""cloud/services.py: the `Fleet` facade on SQLite and PostgreSQL, with the real TUF repository, the real
desired-state signer, and the agent's verifier checking what the cloud signed."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from edgefleet.cloud.catalog import load_catalog
from edgefleet.cloud.errors import Conflict, Invalid, ModelInvalid, NotFound, TooLarge, Unauthorized, UnknownClass
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.edge_agent.trust import DesiredStateVerifier
from edgefleet.protos.api import DeployRequest, EnrollmentTokenRequest
from edgefleet.protos.messages import (
    DeviceClassInfo,
    DeviceStatus,
    EnrollRequest,
    ModelStatus,
    ReportedState,
    TelemetryBatch,
    TelemetryWindow,
)


def mlp_bytes(seed: int = 0, width: int = 3) -> bytes:
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(width, np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_settings(tmp_path: Path, db_url: str, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, public_url="https://cloud.example:8443", **kw)


@pytest.fixture
def published():
    return []


@pytest.fixture
def fleet(tmp_path: Path, db_url: str, published) -> Fleet:
    f = Fleet.from_settings(make_settings(tmp_path, db_url))
    f.publish = lambda device_id, doc: published.append((device_id, doc))
    yield f
    f.store.close()


def enroll(fleet: Fleet, device_id: str, cls: str = "rpi4", **labels: str):
    return fleet.enroll(EnrollRequest(device_id=device_id, device_class=cls, labels=labels))


def verify(fleet: Fleet, device_id: str, cls: str = "rpi4"):
    """What the agent does with the document: verify it with the keys from enrollment."""
    doc = fleet.desired_state(device_id)
    return DesiredStateVerifier(fleet.signer.public_keys()).verify(
        doc.to_wire(), device_id=device_id, device_class=cls, highest_generation=None,
        now=datetime.now(timezone.utc))


def now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------------- auth


def test_admin_token_is_made_once_and_written_0600(fleet):
    token = fleet.ensure_admin_token()
    assert token and fleet.ensure_admin_token() is None
    path = fleet.settings.admin_token_file
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert fleet.authenticate(token).kind == "admin"
    assert fleet.authenticate(f"  {token}\n").kind == "admin"  # copied from the file with its newline


def test_authentication_failures_say_what_to_do(fleet):
    with pytest.raises(Unauthorized, match=r"Authorization: Bearer <token>.*admin\.token"):
        fleet.authenticate(None)
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        fleet.authenticate("efa_not-a-real-token")
    view = fleet.create_enrollment_token(EnrollmentTokenRequest(note="line 3", ttl_s=3600))
    assert fleet.authenticate(view.token).kind == "enroll"
    assert timedelta(minutes=59) < view.expires_at - now() <= timedelta(hours=1)
    from edgefleet.cloud.auth import hash_token

    fleet.store.add_token(hash_token("efe_old"), "enroll", device_id=None, expires_at=now() - timedelta(seconds=1),
                          note="", now=now())
    with pytest.raises(Unauthorized, match="expired"):
        fleet.authenticate("efe_old")


# ---------------------------------------------------------------------------------------------------- enrollment


def test_enroll_returns_everything_the_agent_needs(fleet):
    resp = enroll(fleet, "pi-kitchen-1", site="kitchen")
    assert resp.device_class.name == "rpi4" and resp.device_class.active_watts > 0
    assert resp.broker.host == fleet.settings.mqtt_host and resp.broker.topic_prefix == "edgefleet"
    assert resp.tuf_root["signed"]["_type"] == "root"
    assert resp.tuf_metadata_url == "https://cloud.example:8443/tuf/metadata/"
    assert resp.tuf_targets_url == "https://cloud.example:8443/tuf/targets/"
    assert resp.desired_state_url == "https://cloud.example:8443/api/v1/devices/pi-kitchen-1/desired"
    assert resp.desired_state_keys == fleet.signer.public_keys()
    who = fleet.authenticate(resp.device_token)
    assert (who.kind, who.device_id) == ("device", "pi-kitchen-1")
    view = fleet.get_device("pi-kitchen-1")
    assert view.labels == {"site": "kitchen"} and view.desired_generation == 1 and view.desired_models == {}
    assert verify(fleet, "pi-kitchen-1").models == []


@pytest.mark.parametrize("bad", ["a/b", "dev+1", "dev#", "has space", "ctl\x01", "", "-lead"])
def test_bad_device_ids_are_refused_by_the_contract(bad):
    with pytest.raises(ValidationError, match="invalid device id"):
        EnrollRequest(device_id=bad, device_class="rpi4")


def test_unknown_class_is_refused(fleet):
    with pytest.raises(UnknownClass, match="unknown device class 'toaster'.*rpi4"):
        enroll(fleet, "d1", "toaster")


def test_reenrollment_rotates_the_token(fleet, tmp_path):
    from edgefleet.edge_agent.identity import DeviceKey

    key = DeviceKey.load_or_create(tmp_path / "agent")

    def enroll_signed(cls: str = "rpi4", **labels: str):
        return fleet.enroll(EnrollRequest(device_id="d1", device_class=cls, labels=labels, public_key=key.public_key,
                                          proof=key.proof("d1", cls, now())))

    first = enroll_signed()
    second = enroll_signed(site="b")
    with pytest.raises(Unauthorized):
        fleet.authenticate(first.device_token)
    assert fleet.authenticate(second.device_token).device_id == "d1"
    assert fleet.get_device("d1").labels == {"site": "b"}
    with pytest.raises(Conflict, match="enrolled as class 'rpi4'"):
        enroll_signed("rpi5")
    assert fleet.stats().counters["devices_reenrolled"] == 1


# ---------------------------------------------------------------------------------------------------- models


def test_push_validates_and_versions(fleet):
    v1 = fleet.push_model("digits", mlp_bytes(0))
    v2 = fleet.push_model("digits", mlp_bytes(1))
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert fleet.blobs.exists(v1.sha256)
    assert [(m.name, m.version) for m in fleet.list_models()] == [("digits", 1), ("digits", 2)]
    with pytest.raises(ModelInvalid, match="not an ONNX model"):
        fleet.push_model("digits", b"garbage bytes, not a model")
    with pytest.raises(Invalid, match="invalid name"):
        fleet.push_model("Bad/Name", mlp_bytes())
    assert fleet.stats().counters["refused_models"] == 1
    assert len(fleet.list_models()) == 2


def test_push_over_the_size_limit(tmp_path, db_url):
    fleet = Fleet.from_settings(make_settings(tmp_path, db_url, max_model_mb=0.0001))
    try:
        with pytest.raises(TooLarge):
            fleet.push_model("big", mlp_bytes(width=64))
    finally:
        fleet.store.close()


# ---------------------------------------------------------------------------------------------------- deploy


def test_deploy_by_class_builds_signs_and_publishes(fleet, published):
    enroll(fleet, "pi-1")
    enroll(fleet, "pi-2")
    enroll(fleet, "nano-1", "jetson-nano")
    fleet.push_model("digits", mlp_bytes())
    published.clear()
    dep = fleet.deploy(DeployRequest(model="digits", device_class="rpi4"))
    assert dep.devices == ["pi-1", "pi-2"] and dep.version == 1 and dep.target_kind == "device_class"
    [bundle] = dep.bundles
    assert bundle.target_path == "bundles/digits/v1/rpi4.tar.gz"
    # The bundle is a signed TUF target whose bytes the blob store serves.
    info = fleet.tuf.get_target(bundle.target_path)
    assert info is not None and info.sha256 == bundle.sha256 and info.length == bundle.size_bytes
    with fleet.blobs.open(bundle.sha256) as f:
        names = tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:gz").getnames()
    assert names[0] == "manifest.json"
    assert sorted(d for d, _ in published) == ["pi-1", "pi-2"]
    for device_id, doc in published:
        assert doc.payload.generation == 2 and doc.payload.device_id == device_id
    state = verify(fleet, "pi-1")
    assert [(m.name, m.version, m.bundle_target) for m in state.models] == [("digits", 1, bundle.target_path)]
    assert timedelta(hours=23) < state.expires_at - now() <= timedelta(seconds=fleet.settings.desired_state_ttl_s)
    assert verify(fleet, "nano-1", "jetson-nano").models == []
    assert [d.id for d in fleet.list_deployments()] == [dep.id]


def test_redeploy_bumps_generation_and_later_rules_win(fleet, published):
    enroll(fleet, "d1", site="lab")
    fleet.push_model("m", mlp_bytes(0))
    fleet.push_model("m", mlp_bytes(1))
    fleet.deploy(DeployRequest(model="m", version=2, device_class="rpi4"))
    g1 = fleet.get_device("d1").desired_generation
    fleet.deploy(DeployRequest(model="m", version=1, label="site=lab"))
    assert fleet.get_device("d1").desired_generation == g1 + 1
    assert fleet.get_device("d1").desired_models == {"m": 1}  # the later deployment of the same name wins
    fleet.deploy(DeployRequest(model="m", device_id="d1"))  # version None: the latest
    assert fleet.get_device("d1").desired_models == {"m": 2}
    gens = [doc.payload.generation for d, doc in published if d == "d1"]
    assert gens == sorted(gens) and len(set(gens)) == len(gens)


def test_deploy_budgets_reach_the_signed_document_and_later_rules_replace_them(fleet):
    enroll(fleet, "d1", site="lab")
    enroll(fleet, "d2")
    fleet.push_model("m", mlp_bytes(0))
    dep = fleet.deploy(DeployRequest(model="m", device_class="rpi4", p95_ms=12.5, mj_per_inference=40.0))
    assert (dep.p95_ms, dep.mj_per_inference) == (12.5, 40.0)
    [model] = verify(fleet, "d1").models
    assert model.budgets is not None
    assert (model.budgets.p95_us, model.budgets.uj_per_inference) == (12_500, 40_000)
    assert (model.budgets.p95_ms, model.budgets.mj_per_inference) == (12.5, 40.0)
    # A later rule for the same model wins whole: without budgets, the class's hold again on its devices.
    fleet.deploy(DeployRequest(model="m", label="site=lab"))
    assert verify(fleet, "d1").models[0].budgets is None
    assert verify(fleet, "d2").models[0].budgets.p95_ms == 12.5
    fleet.deploy(DeployRequest(model="m", device_id="d2", mj_per_inference=5.0))
    got = verify(fleet, "d2").models[0].budgets
    assert (got.p95_ms, got.mj_per_inference) == (None, 5.0)
    assert [(d.p95_ms, d.mj_per_inference) for d in fleet.list_deployments()] == [(12.5, 40.0), (None, None),
                                                                                  (None, 5.0)]


@pytest.mark.parametrize("field,value", [("p95_ms", 0), ("p95_ms", -1), ("mj_per_inference", float("inf")),
                                         ("mj_per_inference", 1e30)])
def test_deploy_budgets_out_of_range_are_refused(field, value):
    with pytest.raises(ValidationError) as err:
        DeployRequest(model="m", device_class="rpi4", **{field: value})
    assert field in str(err.value)


def test_devices_enrolling_later_follow_class_and_label_rules(fleet):
    fleet.push_model("a", mlp_bytes(0))
    fleet.push_model("b", mlp_bytes(1))
    dep = fleet.deploy(DeployRequest(model="a", device_class="rpi5"))
    assert dep.devices == [] and [b.device_class for b in dep.bundles] == ["rpi5"]
    fleet.deploy(DeployRequest(model="b", label="site=dock"))  # no device has it yet: no bundle built yet
    enroll(fleet, "late-1", "rpi5", site="dock")
    enroll(fleet, "late-2", "x86-cpu", site="dock")  # a class the label rule never built for: built now
    enroll(fleet, "late-3", "rpi5", site="yard")
    assert fleet.get_device("late-1").desired_models == {"a": 1, "b": 1}
    assert fleet.get_device("late-2").desired_models == {"b": 1}
    assert fleet.get_device("late-3").desired_models == {"a": 1}
    assert [m.bundle_target for m in verify(fleet, "late-2", "x86-cpu").models] == ["bundles/b/v1/x86-cpu.tar.gz"]


def test_deploy_errors(fleet):
    enroll(fleet, "d1")
    fleet.push_model("m", mlp_bytes())
    with pytest.raises(NotFound, match="model 'nope'"):
        fleet.deploy(DeployRequest(model="nope", device_class="rpi4"))
    with pytest.raises(NotFound, match="version 7"):
        fleet.deploy(DeployRequest(model="m", version=7, device_class="rpi4"))
    with pytest.raises(UnknownClass):
        fleet.deploy(DeployRequest(model="m", device_class="toaster"))
    with pytest.raises(NotFound, match="no device 'ghost'"):
        fleet.deploy(DeployRequest(model="m", device_id="ghost"))
    assert fleet.list_deployments() == []
    assert fleet.get_device("d1").desired_generation == 1


def test_a_class_the_bundle_cannot_be_built_for(fleet):
    info = load_catalog()["rpi4"].model_copy(update={"name": "tflite-only", "runtimes": ["litert"]})
    fleet.add_class(info)
    enroll(fleet, "t1", "tflite-only")
    fleet.push_model("m", mlp_bytes())
    with pytest.raises(Invalid, match="cannot build a bundle of m v1 for class tflite-only"):
        fleet.deploy(DeployRequest(model="m", device_class="tflite-only"))
    assert fleet.list_deployments() == [] and fleet.get_device("t1").desired_models == {}


def test_concurrent_deploys_to_one_device_lose_nothing(fleet):
    enroll(fleet, "d1")
    names = [f"m{i}" for i in range(4)]
    for i, name in enumerate(names):
        fleet.push_model(name, mlp_bytes(i))
    errors = []

    def deploy(name):
        try:
            fleet.deploy(DeployRequest(model=name, device_id="d1"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    view = fleet.get_device("d1")
    assert view.desired_models == dict.fromkeys(names, 1)
    assert {m.name for m in verify(fleet, "d1").models} == set(names)


def test_publish_failure_does_not_fail_the_deploy(fleet):
    enroll(fleet, "d1")
    fleet.push_model("m", mlp_bytes())

    def broken(device_id, doc):
        raise ConnectionError("broker down")

    fleet.publish = broken
    fleet.deploy(DeployRequest(model="m", device_id="d1"))
    assert fleet.get_device("d1").desired_models == {"m": 1}
    assert fleet.stats().counters["publish_failed"] == 1


def test_documents_near_expiry_are_resigned(tmp_path, db_url, published):
    short = Fleet.from_settings(make_settings(tmp_path, db_url, desired_state_ttl_s=60))
    try:
        enroll(short, "d1")
        assert short.desired_state("d1").payload.generation == 1  # fresh: served as stored
        assert short.refresh_expiring() == 0
    finally:
        short.store.close()
    # The same database under a one-day TTL: a document with 60 s left is past half its life.
    long = Fleet.from_settings(make_settings(tmp_path, db_url))
    long.publish = lambda d, doc: published.append((d, doc))
    try:
        assert long.refresh_expiring() == 1
        assert [(d, doc.payload.generation) for d, doc in published] == [("d1", 2)]
        assert long.desired_state("d1").payload.generation == 2
        assert long.refresh_expiring() == 0
    finally:
        long.store.close()


# ---------------------------------------------------------------------------------------------------- classes


def test_classes_from_files_and_api_persist(tmp_path, db_url):
    classes = tmp_path / "data" / "classes"
    classes.mkdir(parents=True)
    (classes / "gateway.toml").write_text(
        'cores = 2\nmemory_mb = 2048\nruntimes = ["onnxruntime"]\nidle_watts = 1.0\nactive_watts = 4.0\n')
    fleet = Fleet.from_settings(make_settings(tmp_path, db_url))
    try:
        assert "gateway" in [c.name for c in fleet.list_classes()]
        added = fleet.add_class(DeviceClassInfo(name="coral", cores=4, memory_mb=1024, runtimes=["onnxruntime"],
                                                idle_watts=1.0, active_watts=3.0))
        assert added.name == "coral"
        with pytest.raises(Conflict, match="catalog file"):
            fleet.add_class(added.model_copy(update={"name": "rpi4"}))
    finally:
        fleet.store.close()
    again = Fleet.from_settings(make_settings(tmp_path, db_url))
    try:
        assert {"coral", "gateway", "rpi4"} <= {c.name for c in again.list_classes()}
        assert enroll(again, "c1", "coral").device_class.active_watts == 3.0
    finally:
        again.store.close()
    (classes / "broken.toml").write_text("cores = 'many'\n")
    with pytest.raises(Invalid, match=r"broken\.toml: key 'cores'"):
        Fleet.from_settings(make_settings(tmp_path, db_url))


# ---------------------------------------------------------------------------------------------------- ingest


def batch(device_id: str, seq: int, p95: float = 8.0, model: str = "m", version: int = 1) -> TelemetryBatch:
    t = now()
    return TelemetryBatch(device_id=device_id, seq=seq, sent_at=t, windows=[TelemetryWindow(
        model=model, version=version, start=t - timedelta(seconds=60), end=t, count=100, errors=1, p50_ms=4.0,
        p95_ms=p95, p99_ms=max(9.0, p95), mean_mj=12.5, energy_source="estimated", energy_meter="modelled")])


def report(device_id: str, generation: int, **model) -> ReportedState:
    return ReportedState(device_id=device_id, generation=generation, reported_at=now(),
                         models=[ModelStatus(name="m", **model)] if model else [])


def test_ingest_from_unknown_devices_is_counted_and_dropped(fleet):
    fleet.record_reported(report("ghost", 1))
    fleet.record_telemetry(batch("ghost", 1))
    fleet.record_status(DeviceStatus(device_id="ghost", online=True, at=now()))
    assert fleet.stats().counters["dropped_unknown_device"] == 3
    assert fleet.list_devices() == []


def test_telemetry_replay_is_idempotent(fleet):
    enroll(fleet, "d1")
    fleet.record_telemetry(batch("d1", 5, p95=8.0))
    fleet.record_telemetry(batch("d1", 5, p95=99.0))  # the outbox sent seq 5 again
    [summary] = fleet.get_device("d1").telemetry
    assert (summary.count, summary.p95_ms, summary.mean_mj) == (100, 8.0, 12.5)
    assert fleet.stats().counters["telemetry_replayed"] == 1


def test_status_rows_follow_desired_against_reported(fleet):
    enroll(fleet, "idle")
    enroll(fleet, "d1")
    fleet.push_model("m", mlp_bytes())
    fleet.deploy(DeployRequest(model="m", device_id="d1"))
    fleet.record_status(DeviceStatus(device_id="d1", online=True, at=now()))

    def row(device_id):
        [r] = [r for r in fleet.status() if r.device_id == device_id]
        return r

    assert row("idle").state == "no_model" and row("idle").model is None
    assert (row("d1").state, row("d1").online, row("d1").desired_version) == ("pending", True, 1)
    gen = fleet.get_device("d1").desired_generation
    fleet.record_reported(report("d1", gen, target_version=1, state="installing", phase="download"))
    assert row("d1").state == "installing"
    fleet.record_reported(report("d1", gen, target_version=1, state="failed", error="smoke test mismatch"))
    assert (row("d1").state, row("d1").error) == ("failed", "smoke test mismatch")
    fleet.record_reported(report("d1", gen, active_version=1, target_version=1, state="active"))
    fleet.record_telemetry(batch("d1", 1, p95=6.5))
    r = row("d1")
    assert (r.state, r.active_version, r.p95_ms, r.mean_mj, r.energy_source) == ("in_sync", 1, 6.5, 12.5,
                                                                                  "estimated")
    fleet.record_reported(report("d1", gen - 1))  # an older (retained) report does not go back in time
    assert row("d1").state == "in_sync"
    assert fleet.get_device("d1").reported_generation == gen
    fleet.record_status(DeviceStatus(device_id="d1", online=False))
    assert row("d1").online is False


def test_status_shows_the_offload_share_and_the_policys_reasons(fleet):
    from edgefleet.fleet.render import offload_cell

    enroll(fleet, "d1")
    fleet.push_model("m", mlp_bytes())
    fleet.deploy(DeployRequest(model="m", device_id="d1"))
    [r] = fleet.status()
    assert (r.offload_share, r.offload_reasons, offload_cell(r)) == (None, {}, "-")
    t = now()
    span = dict(start=t - timedelta(seconds=60), end=t, errors=0, energy_source="none", energy_meter="")
    fleet.record_telemetry(TelemetryBatch(device_id="d1", seq=1, sent_at=t, windows=[
        TelemetryWindow(model="m", version=1, count=60, rows=60, where="local",
                        reasons={"local_within_budget": 50, "low_confidence": 0}, **span),
        TelemetryWindow(model="m", version=1, count=20, rows=40, where="cloud",
                        reasons={"local_p95_over_budget": 12, "low_confidence": 8}, **span)]))
    [r] = fleet.status()
    assert r.offload_share == pytest.approx(40 / 100)
    assert r.offload_reasons == {"local_within_budget": 50, "local_p95_over_budget": 12, "low_confidence": 8}
    assert offload_cell(r) == "40% cloud: local_within_budget 50, local_p95_over_budget 12"
