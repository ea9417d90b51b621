"""`Fleet`: the facade every surface (REST routes, the MQTT bridge, the serve loop, tests) calls.

Theory: the database is the source of truth. A deployment is stored as a rule (a model version for one device, a
device class, or a label key=value); a device's desired models are computed from all rules in the order made, so a
later rule for the same model name overrides an earlier one, and a device that enrolls after a class or label
deployment gets it too. Whenever a device's desired models may have changed (deploy, enroll) or its document nears
expiry, `_resign` computes the models, bumps the device's generation, signs the document with expiry
now + `desired_state_ttl_s`, stores it (`Store.commit_desired`, which refuses when rules changed meanwhile, so a
slow writer cannot overwrite a newer document) and then publishes it. Publishing is best effort: an agent also
fetches its document over HTTP when it (re)connects.

Bundles are built lazily, once per (model, version, class): the archive goes into the blob store under its sha256
(the key the TUF target route serves), is added as a TUF target, then recorded. Builds are deterministic, so two
builders racing produce the same bytes and the same target.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from edgefleet.cloud.blobs import BlobStore, LocalBlobStore
from edgefleet.cloud.bundles import build_bundle, model_file_for, read_npz, target_path
from edgefleet.cloud.catalog import load_catalog, parse_class
from edgefleet.cloud.db.models import Bundle, Deployment, Device, ModelVersion
from edgefleet.cloud.errors import CloudError, Conflict, Invalid, NotFound, Refused, Unavailable, UnknownClass
from edgefleet.cloud.registry import validate_model
from edgefleet.cloud.services_broker import BrokerLoginFacade
from edgefleet.cloud.services_distill import DistillFacade
from edgefleet.cloud.services_identity import IdentityFacade
from edgefleet.cloud.services_provenance import ProvenanceFacade
from edgefleet.cloud.settings import Settings
from edgefleet.cloud.store import ADMIN_MARKER, Store
from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.common.fsutil import private_dir
from edgefleet.protos.api import (
    BundleView,
    DeploymentView,
    DeployRequest,
    DeviceStatusRow,
    DeviceView,
    ModelVersionView,
    StatsView,
    TelemetrySummary,
)
from edgefleet.protos.limits import MAX_SHORT_TEXT_CHARS, clip_text
from edgefleet.protos.messages import (
    DesiredModel,
    DesiredState,
    DeviceClassInfo,
    DeviceStatus,
    ModelStatus,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    TensorSpec,
    check_name,
)

log = logging.getLogger(__name__)

Publish = Callable[[str, SignedDesiredState], None]
# 5: a document is recomputed only when a deployment or re-enrollment lands between computing and committing it.
RESIGN_TRIES = 5


def _now() -> datetime:
    # Whole seconds: the signed payload then reads the same in every JSON round trip and log line.
    return datetime.now(timezone.utc).replace(microsecond=0)


class Fleet(DistillFacade, BrokerLoginFacade, IdentityFacade, ProvenanceFacade):
    """The facade; jobs, distillation and calibrations are in `services_distill.py`, devices' broker logins in
    `services_broker.py`, tokens, enrollment and resets in `services_identity.py`, bundle provenance in
    `services_provenance.py`, mixed in."""

    def __init__(self, settings: Settings, store: Store, blobs: BlobStore, tuf: TufRepository,
                 signer: DesiredStateSigner, catalog: dict[str, DeviceClassInfo],
                 publish: Publish | None = None) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.tuf = tuf
        self.signer = signer
        self.catalog = dict(catalog)  # from files; classes added through the API live in the database
        self.publish = publish
        # Serialises commit + publish in this process, so retained MQTT messages go out in generation order.
        self._publish_lock = threading.Lock()
        # The desired-state keys the stored documents were last checked against (refresh_expiring re-signs on change).
        self._signed_with: frozenset[str] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Fleet:
        if private_dir(settings.data_dir):  # keys, the admin token and the broker logins live here
            log.warning("data dir %s was open to other users; made it 0700", settings.data_dir)
        store = Store.open(settings.database_url)
        fleet = cls(
            settings=settings,
            store=store,
            blobs=LocalBlobStore(settings.blobs_dir),
            tuf=TufRepository(settings.tuf_dir, timestamp_expiry_s=settings.tuf_timestamp_expiry_s,
                              offline_root=settings.tuf_offline_root),
            signer=DesiredStateSigner(settings.keys_dir),
            catalog=load_catalog(settings.classes_dir),
        )
        fleet.provenance_signer  # noqa: B018 - its key is made at first start, like the desired-state key
        return fleet

    def close(self) -> None:
        """Release the database engine's connections (its pool); the Fleet is unusable afterwards."""
        self.store.close()

    # ------------------------------------------------------------------------------------------------ classes

    def _classes(self) -> dict[str, DeviceClassInfo]:
        merged = dict(self.catalog)
        for name, info in self.store.list_classes().items():
            merged.setdefault(name, DeviceClassInfo.model_validate(info))
        return merged

    def _class(self, name: str) -> DeviceClassInfo:
        info = self._classes().get(name)
        if info is None:
            raise UnknownClass(f"unknown device class {name!r}; known: {', '.join(sorted(self._classes()))}. Add "
                               f"one with `fleet classes add` or a TOML file in {self.settings.classes_dir}")
        return info

    def list_classes(self) -> list[DeviceClassInfo]:
        return [info for _, info in sorted(self._classes().items())]

    def add_class(self, info: DeviceClassInfo) -> DeviceClassInfo:
        """Add (or replace) a class kept in the database. Classes from catalog files are changed in their files."""
        info = parse_class(info.to_dict(), f"{info.name!r}")  # re-validate a model built without validation
        if info.name in self.catalog:
            raise Conflict(f"device class {info.name!r} comes from a catalog file; pick another name, or edit the "
                           f"file in {self.settings.classes_dir}")
        self.store.put_class(info.name, info.to_dict(), _now())
        return info

    # ------------------------------------------------------------------------------------------------ models

    def push_model(self, name: str, data: bytes) -> ModelVersionView:
        try:
            check_name(name)
        except ValueError as exc:
            raise Invalid(f"model {exc}") from None
        try:
            info = validate_model(data, max_bytes=self.settings.max_model_bytes)
        except CloudError:
            self.count("refused_models")
            raise
        key = self.blobs.put_bytes(data)
        row = self.store.add_model_version(
            name, sha256=key, size_bytes=info.size_bytes, opset=info.opset,
            inputs=[s.to_dict() for s in info.inputs], outputs=[s.to_dict() for s in info.outputs], now=_now(),
        )
        log.info("model %s v%d stored (%d bytes, sha256 %s)", name, row.version, row.size_bytes, key)
        return _model_view(row)

    def list_models(self) -> list[ModelVersionView]:
        return [_model_view(r) for r in self.store.list_model_versions()]

    # ------------------------------------------------------------------------------------------------ bundles

    def _ensure_bundle(self, model: ModelVersion, cls: DeviceClassInfo) -> Bundle:
        if model.built_for_class and model.built_for_class != cls.name:
            # A distilled variant was chosen against this class's budgets and calibration (and may be int8 or
            # TFLite for its runtime): on another class it would break the budgets it was picked for.
            raise Invalid(f"{model.name} v{model.version} was built for class {model.built_for_class}, not "
                          f"{cls.name}; deploy the version built for {cls.name} (`fleet models` shows each "
                          f"version's class), or distill for {cls.name}")
        existing = self.store.get_bundle(model.name, model.version, cls.name)
        if existing is not None:
            return existing
        with self.blobs.open(model.sha256) as f:
            model_bytes = f.read()
        expected = None
        if model.smoke_sha256:
            with self.blobs.open(model.smoke_sha256) as f:
                expected = read_npz(f.read())
        path = target_path(model.name, model.version, cls.name)
        # The signed statement of how the model was made goes into the bundle (services_provenance.py).
        provenance = self._bundle_provenance(model, cls, model_bytes, model_file_for(model.format or "onnx"), path)
        try:
            archive, manifest = build_bundle(
                model_bytes, name=model.name, version=model.version, device_class=cls,
                inputs=[TensorSpec.model_validate(s) for s in model.inputs],
                outputs=[TensorSpec.model_validate(s) for s in model.outputs],
                created_at=model.created_at,  # the model's time, not now: rebuilding gives the same bytes
                precision=model.precision or "fp32", runtime=model.runtime or "onnxruntime",
                model_format=model.format or "onnx", expected=expected, provenance=provenance,
            )
        except Invalid as exc:
            raise Invalid(f"cannot build a bundle of {model.name} v{model.version} for class {cls.name}: "
                          f"{exc.message}") from None
        key = self.blobs.put_bytes(archive)
        self.tuf.add_target(path, archive)
        return self.store.add_bundle(model=model.name, version=model.version, device_class=cls.name,
                                     target_path=path, sha256=key, size_bytes=len(archive),
                                     manifest=manifest.to_dict(), now=_now())

    # ------------------------------------------------------------------------------------------------ devices

    def _device(self, device_id: str) -> Device:
        row = self.store.get_device(device_id)
        if row is None:
            raise NotFound(f"no device {device_id!r}; `fleet devices` lists the enrolled ones")
        return row

    def list_devices(self) -> list[DeviceView]:
        telemetry = self.store.telemetry_summary(self._summary_since())
        return [_device_view(d, telemetry.get(d.device_id, [])) for d in self.store.list_devices()]

    def get_device(self, device_id: str) -> DeviceView:
        row = self._device(device_id)
        return _device_view(row, self.store.telemetry_summary(self._summary_since(), device_id).get(device_id, []))

    # ------------------------------------------------------------------------------------------------ deployments

    def deploy(self, req: DeployRequest) -> DeploymentView:
        model = self.store.get_model_version(req.model, req.version)
        if model is None:
            which = f"version {req.version}" if req.version is not None else "any version"
            raise NotFound(f"model {req.model!r} has no {which}; push it first (`fleet models push`) or check "
                           "`fleet models`")
        if req.device_id:
            kind, target = "device", req.device_id
            devices = [self._device(req.device_id)]
            classes = [self._class(devices[0].device_class)]
        elif req.device_class:
            kind, target = "device_class", req.device_class
            classes = [self._class(req.device_class)]
            devices = self.store.list_devices(req.device_class)
        else:
            kind, target = "label", str(req.label)
            key, _, value = target.partition("=")
            devices = [d for d in self.store.list_devices() if d.labels.get(key) == value]
            names = sorted({d.device_class for d in devices})
            classes = [self._class(n) for n in names]
        # Build every bundle before recording the rule: a class the model cannot run on fails the whole deploy.
        bundles = [self._ensure_bundle(model, c) for c in classes]
        row = self.store.add_deployment(model=model.name, version=model.version, target_kind=kind, target=target,
                                        device_ids=[d.device_id for d in devices],
                                        bundle_ids=[b.id for b in bundles], now=_now())
        self.count("deployments")
        for device in devices:
            self._resign(device.device_id)
        return _deployment_view(row, sorted(d.device_id for d in devices), bundles)

    def list_deployments(self) -> list[DeploymentView]:
        return [_deployment_view(r, devs, bundles) for r, devs, bundles in self.store.list_deployments()]

    def _desired_models(self, device: Device, rules: list[Deployment]) -> list[DesiredModel]:
        wanted: dict[str, int] = {}
        for rule in rules:  # in the order made: a later rule for the same model name wins
            if (
                (rule.target_kind == "device" and rule.target == device.device_id)
                or (rule.target_kind == "device_class" and rule.target == device.device_class)
                or (rule.target_kind == "label" and _label_matches(rule.target, device.labels))
            ):
                wanted[rule.model] = rule.version
        cls = self._classes().get(device.device_class)
        models: list[DesiredModel] = []
        for name, version in sorted(wanted.items()):
            row = self.store.get_model_version(name, version)
            if row is None or cls is None:
                continue
            try:
                bundle = self._ensure_bundle(row, cls)
            except CloudError as exc:
                # A label rule can reach a class it was never built for; the device keeps its other models.
                log.warning("device %s: %s", device.device_id, exc)
                self.count("bundle_build_failed")
                continue
            runtime = (bundle.manifest or {}).get("runtime", "onnxruntime")  # the agent checks it against the bundle
            models.append(DesiredModel(name=name, version=version, bundle_target=bundle.target_path, runtime=runtime))
        return models

    def _resign(self, device_id: str) -> SignedDesiredState:
        """Compute, sign, store and publish a new document for the device (a new generation)."""
        for _ in range(RESIGN_TRIES):
            device = self._device(device_id)
            rules, mark = self.store.deployment_rules()
            models = self._desired_models(device, rules)
            signed: list[SignedDesiredState] = []

            # Called by commit_desired before this iteration ends, so the loop variables it reads are this device's.
            def make_doc(generation: int) -> tuple[dict, datetime]:
                now = _now()
                state = DesiredState(device_id=device.device_id,  # noqa: B023
                                     device_class=device.device_class,  # noqa: B023
                                     generation=generation, issued_at=now,
                                     expires_at=now + timedelta(seconds=self.settings.desired_state_ttl_s),
                                     models=models)  # noqa: B023
                signed.append(self.signer.sign(state))  # noqa: B023
                return signed[-1].to_dict(), state.expires_at  # noqa: B023

            with self._publish_lock:
                generation = self.store.commit_desired(device_id, rules_mark=mark, device_class=device.device_class,
                                                       labels=device.labels, make_doc=make_doc)
                if generation is None:
                    continue
                self._publish(device_id, signed[-1])
            return signed[-1]
        raise Unavailable(f"desired state of {device_id} kept changing while it was being signed; retry")

    def _publish(self, device_id: str, doc: SignedDesiredState) -> None:
        if self.publish is None:
            return
        try:
            self.publish(device_id, doc)
        except Exception as exc:  # noqa: BLE001 - the DB holds the doc; the agent fetches it over HTTP on connect
            log.warning("publishing the desired state of %s failed: %s", device_id, exc)
            self.count("publish_failed")

    def desired_state(self, device_id: str) -> SignedDesiredState:
        device = self._device(device_id)
        if device.desired_doc is None or device.desired_expires_at is None or (
            device.desired_expires_at - _now() < timedelta(seconds=self.settings.desired_state_ttl_s / 2)
        ):
            return self._resign(device_id)
        return SignedDesiredState.model_validate(device.desired_doc)

    def refresh_expiring(self) -> int:
        """Re-sign (and publish) every document past half its life, and, after the desired-state keys changed (a
        rotation step, maybe by `edgefleet-cloud keys` in another process), every one not signed by exactly them;
        the number re-signed."""
        cutoff = _now() + timedelta(seconds=self.settings.desired_state_ttl_s / 2)
        due = self.store.devices_expiring_before(cutoff)
        signing = self.signer.signing_keyids()
        if signing != self._signed_with:
            stale = [d.device_id for d in self.store.list_devices() if not _signed_by_exactly(d.desired_doc, signing)]
            due = sorted(set(due) | set(stale))
        done = 0
        for device_id in due:
            self._resign(device_id)
            done += 1
        self._signed_with = signing
        return done

    # ------------------------------------------------------------------------------------------------ ingest

    def record_reported(self, msg: ReportedState) -> None:
        """Store a report; raise `Refused` (counted) for a generation this cloud never issued to the device."""
        now = _now()
        # Reports of one generation are ordered by the device's clock, but never past the cloud's: one dated far
        # ahead (forged, or a clock gone wrong) would otherwise make every real report after it look stale.
        outcome = self.store.set_reported(msg.device_id, doc=msg.to_dict(), generation=msg.generation,
                                          last_error=msg.last_error, reported_at=min(msg.reported_at, now), now=now)
        if outcome == "unknown":
            self.count("dropped_unknown_device")
        elif outcome == "stale":
            self.count("reported_stale")
        elif outcome == "ahead":
            self.count_refused("reported", "generation_ahead")
            issued = self._device(msg.device_id).desired_generation
            raise Refused(f"generation {msg.generation} is above the highest generation this cloud issued to "
                          f"{msg.device_id} ({issued}); report the generation of a desired state it signed",
                          detail={"fields": [{"field": "body.generation", "reason": "above the issued generation"}]})

    def count_refused(self, channel: str, reason: str) -> None:
        """A device message refused whole: counted in all (`refused_messages`) and by channel and reason
        (`refused_telemetry_not_finite`, `refused_reported_generation_ahead`, ...), shown by `fleet stats`."""
        self.count("refused_messages")
        self.count(f"refused_{channel}_{reason}")

    def record_telemetry(self, msg: TelemetryBatch) -> None:
        if self.store.get_device(msg.device_id) is None:
            self.count("dropped_unknown_device")
            return
        windows = [w.model_dump() for w in msg.windows]
        if not self.store.add_telemetry(msg.device_id, msg.seq, windows, msg.dropped_windows, _now()):
            self.count("telemetry_replayed")
            return
        if msg.dropped_windows:
            self.count("telemetry_dropped_windows", msg.dropped_windows)

    def record_status(self, msg: DeviceStatus) -> None:
        if not self.store.set_online(msg.device_id, msg.online, _now()):
            self.count("dropped_unknown_device")

    def _summary_since(self) -> datetime:
        return _now() - timedelta(seconds=self.settings.telemetry_summary_s)

    def status(self) -> list[DeviceStatusRow]:
        telemetry = self.store.telemetry_summary(self._summary_since())
        rows: list[DeviceStatusRow] = []
        for device in self.store.list_devices():
            rows.extend(_status_rows(device, telemetry.get(device.device_id, [])))
        return rows

    def count(self, name: str, by: int = 1) -> None:
        self.store.incr(name, by)

    def stats(self) -> StatsView:
        counters = self.store.counters()
        counters.pop(ADMIN_MARKER, None)  # a marker, not a statistic
        return StatsView(counters=counters)


# ---------------------------------------------------------------------------------------------------- views


def _signed_by_exactly(doc: dict | None, keyids: frozenset[str]) -> bool:
    """Whether a stored signed desired state is signed by `keyids` and no other key (after a finished rotation, a
    document still signed by the revoked key is re-signed, so agents see the new key alone and learn the revocation)."""
    return doc is not None and keyids == {s.get("keyid") for s in doc.get("signatures", [])}


def _label_matches(rule: str, labels: dict[str, str]) -> bool:
    key, _, value = rule.partition("=")
    return labels.get(key) == value


def _model_view(row: ModelVersion) -> ModelVersionView:
    return ModelVersionView(name=row.name, version=row.version, sha256=row.sha256, size_bytes=row.size_bytes,
                            opset=row.opset, inputs=row.inputs, outputs=row.outputs, created_at=row.created_at,
                            precision=row.precision, runtime=row.runtime, format=row.format,
                            built_for_class=row.built_for_class, job_id=row.job_id)


def _bundle_view(row: Bundle) -> BundleView:
    return BundleView(model=row.model, version=row.version, device_class=row.device_class,
                      target_path=row.target_path, sha256=row.sha256, size_bytes=row.size_bytes,
                      created_at=row.created_at)


def _deployment_view(row: Deployment, devices: list[str], bundles: list[Bundle]) -> DeploymentView:
    return DeploymentView(id=row.id, model=row.model, version=row.version, target_kind=row.target_kind,
                          target=row.target, created_at=row.created_at, devices=devices,
                          bundles=[_bundle_view(b) for b in bundles])


def _desired_models_of(device: Device) -> dict[str, int]:
    if not device.desired_doc:
        return {}
    return {m["name"]: m["version"] for m in device.desired_doc["payload"].get("models", [])}


def _reported_models(device: Device) -> list[ModelStatus]:
    if not device.reported_doc:
        return []
    out: list[ModelStatus] = []
    for m in device.reported_doc.get("models", []):
        try:
            out.append(ModelStatus.model_validate(m))
        except ValidationError:
            # Stored under an older, looser contract (an error past today's cap, a version 0): a listing must still
            # build, so show it with its texts clipped, or leave it out when even that does not read.
            try:
                out.append(ModelStatus.model_validate({**m, "error": clip_text(m.get("error")),
                                                       "phase": clip_text(m.get("phase"), MAX_SHORT_TEXT_CHARS)}))
            except (ValidationError, TypeError, AttributeError):
                log.warning("device %s: a stored model status no longer reads; left out of the view",
                            device.device_id)
    return out


def _summary(w) -> TelemetrySummary:
    return TelemetrySummary(model=w.model, version=w.version, count=w.count, errors=w.errors, p50_ms=w.p50_ms,
                            p95_ms=w.p95_ms, mean_mj=w.mean_mj, energy_source=w.energy_source, window_end=w.end)


def _device_view(device: Device, telemetry: list) -> DeviceView:
    return DeviceView(
        device_id=device.device_id, device_class=device.device_class, labels=device.labels, online=device.online,
        last_seen=device.last_seen, enrolled_at=device.enrolled_at, desired_generation=device.desired_generation,
        reported_generation=device.reported_generation, desired_models=_desired_models_of(device),
        models=_reported_models(device), last_error=device.last_error,
        telemetry=[_summary(w) for w in telemetry], has_device_key=device.public_key is not None,
        reset_pending=device.reset_at is not None, enrollments_refused=device.enrollments_refused or 0,
        last_refused_at=device.last_refused_at, last_refused_reason=device.last_refused_reason,
    )


def _model_state(desired: int, reported: ModelStatus | None) -> str:
    if reported is None:
        return "pending"
    if reported.active_version == desired and reported.state == "active":
        return "in_sync"
    if reported.target_version == desired and reported.state == "failed":
        return "failed"
    if reported.target_version == desired and reported.state == "installing":
        return "installing"
    return "pending"


def _status_rows(device: Device, telemetry: list) -> list[DeviceStatusRow]:
    base = dict(device_id=device.device_id, device_class=device.device_class, online=device.online,
                last_seen=device.last_seen)
    desired = _desired_models_of(device)
    if not desired:
        return [DeviceStatusRow(**base, state="no_model", error=device.last_error)]
    reported = {m.name: m for m in _reported_models(device)}
    windows = {(w.model, w.version): w for w in telemetry}
    rows = []
    for name, version in sorted(desired.items()):
        ms = reported.get(name)
        # Figures of the version that serves now (the active one), else of the desired one once it reports.
        w = windows.get((name, ms.active_version)) if ms and ms.active_version else None
        w = w or windows.get((name, version))
        rows.append(DeviceStatusRow(
            **base, model=name, desired_version=version, active_version=ms.active_version if ms else None,
            state=_model_state(version, ms), error=(ms.error if ms else None) or device.last_error,
            p50_ms=w.p50_ms if w else None, p95_ms=w.p95_ms if w else None, mean_mj=w.mean_mj if w else None,
            energy_source=w.energy_source if w else None,
        ))
    return rows
