"""`Fleet`: the facade every surface (REST routes, the MQTT bridge, the serve loop, tests) calls.

Theory: the database is the source of truth; the facade is one class built from mixins, one per concept, each in
its own module: the model registry and bundle builds (`services_models.py`), deployments and signed desired states
(`services_deploy.py`), tokens, enrollment and resets (`services_identity.py`), devices' broker logins
(`services_broker.py`), bundle provenance (`services_provenance.py`), jobs, distillation and calibrations
(`services_distill.py`). This module holds what they share: the device classes (catalog files, and classes added
through the API, kept in the database), the devices, the ingest of what devices send (reported state, telemetry,
status, each refused or counted, never crashing on a bad one), the status rows and the counters.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from edgefleet.cloud.blobs import BlobStore, LocalBlobStore
from edgefleet.cloud.catalog import load_catalog, parse_class
from edgefleet.cloud.db.models import Device
from edgefleet.cloud.efficiency import energy_cost_per_million, inferences_per_kwh
from edgefleet.cloud.errors import Conflict, NotFound, Refused, UnknownClass
from edgefleet.cloud.ratelimit import TokenBuckets
from edgefleet.cloud.services_broker import BrokerLoginFacade
from edgefleet.cloud.services_deploy import DeployFacade, Publish
from edgefleet.cloud.services_distill import DistillFacade
from edgefleet.cloud.services_efficiency import efficiency
from edgefleet.cloud.services_identity import IdentityFacade
from edgefleet.cloud.services_models import ModelsFacade
from edgefleet.cloud.services_provenance import ProvenanceFacade
from edgefleet.cloud.settings import Settings
from edgefleet.cloud.store import ADMIN_MARKER, Store
from edgefleet.cloud.store_telemetry import ROLLUP_SEEN, ROLLUP_THROUGH, BatchIn
from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.common.fsutil import private_dir
from edgefleet.protos.api import DeviceStatusRow, DeviceView, StatsView, TelemetrySummary
from edgefleet.protos.limits import MAX_SHORT_TEXT_CHARS, clip_text
from edgefleet.protos.messages import (
    AgentChannelInfo,
    DeviceClassInfo,
    DeviceStatus,
    ModelStatus,
    ReportedState,
    TelemetryBatch,
)

log = logging.getLogger(__name__)

def _now() -> datetime:
    # Whole seconds: the signed payload then reads the same in every JSON round trip and log line.
    return datetime.now(timezone.utc).replace(microsecond=0)


class Fleet(ModelsFacade, DeployFacade, DistillFacade, BrokerLoginFacade, IdentityFacade, ProvenanceFacade):
    """The facade, with the mixins named in the module's docstring."""

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
        # Where agents with transport = "grpc" connect (`GET /api/v1/agent-channel`); set by the runtime that runs
        # the channel (cloud/main.py), None while it is off.
        self.agent_channel: AgentChannelInfo | None = None
        # Serialises commit + publish in this process, so retained MQTT messages go out in generation order.
        self._publish_lock = threading.Lock()
        # A flood from one device is refused past its bucket, so it cannot take the ingest from the others.
        self._limiter = TokenBuckets(settings.telemetry_device_windows_per_s,
                                     settings.telemetry_device_windows_per_s * settings.telemetry_device_burst_s)
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
                               f"one as a TOML file in {self.settings.classes_dir} (then restart the cloud), or "
                               "with POST /api/v1/classes")
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

    def count_refused(self, channel: str, reason: str, by: int = 1) -> None:
        """A device message refused whole: counted in all (`refused_messages`) and by channel and reason
        (`refused_telemetry_not_finite`, `refused_reported_generation_ahead`, ...), shown by `fleet stats`."""
        self.count("refused_messages", by)
        self.count(f"refused_{channel}_{reason}", by)

    def record_telemetry(self, msg: TelemetryBatch) -> str:
        """Store one batch once (HTTP path); returns "stored", "replayed", "unknown_device" or "rate_limited"."""
        return self.record_telemetry_many([msg])[0]

    def record_telemetry_many(self, msgs: list[TelemetryBatch | BatchIn]) -> list[str]:
        """Store many batches in one transaction (the MQTT bridge's ingest); per batch "stored", "replayed",
        "unknown_device" or "rate_limited" (past the device's token bucket: not stored, counted). Raises when the
        database fails: then nothing was stored and nothing may be acknowledged."""
        now = time.monotonic()
        admitted = [self._limiter.take(m.device_id, max(1, _size(m)), now) for m in msgs]
        batches = [_batch_in(m) for m, ok in zip(msgs, admitted, strict=True) if ok]
        stored = iter(self.store.add_telemetry_many(batches, _now()) if batches else [])
        outcomes = [next(stored) if ok else "rate_limited" for ok in admitted]
        if limited := outcomes.count("rate_limited"):
            self.count_refused("telemetry", "rate_limited", limited)
        return outcomes

    def record_status(self, msg: DeviceStatus) -> None:
        if not self.store.set_online(msg.device_id, msg.online, _now()):
            self.count("dropped_unknown_device")

    def _summary_since(self) -> datetime:
        return _now() - timedelta(seconds=self.settings.telemetry_summary_s)

    def status(self) -> list[DeviceStatusRow]:
        from edgefleet.cloud.store_efficiency import offload_mix

        since = self._summary_since()
        telemetry = self.store.telemetry_summary(since)
        mix = offload_mix(self.store, since)
        price = self.settings.energy_price_per_kwh
        rows: list[DeviceStatusRow] = []
        for device in self.store.list_devices():
            rows.extend(_status_rows(device, telemetry.get(device.device_id, []), price, mix))
        return rows

    def count(self, name: str, by: int = 1) -> None:
        self.store.incr(name, by)

    def set_gauge(self, name: str, value: int) -> None:
        """A figure read from elsewhere (the broker's own drop count), shown beside the counters as it was read."""
        self.store.set_gauge(name, value)

    def counters(self) -> dict[str, int]:
        """The counters `fleet stats` and `/metrics` show: markers and watermarks kept in the same table left out."""
        counters = self.store.counters()
        for marker in (ADMIN_MARKER, ROLLUP_THROUGH, ROLLUP_SEEN):
            counters.pop(marker, None)
        return counters

    def stats(self) -> StatsView:
        counters = self.counters()
        view = efficiency(self)  # fleet-wide totals over the look-back: inferences, energy, cost
        return StatsView(counters=counters, efficiency=view.total, prices=view.prices, window_s=view.window_s)


# ---------------------------------------------------------------------------------------------------- views


def _batch_in(msg: TelemetryBatch | BatchIn) -> BatchIn:
    """What the store takes. The fast decoder (cloud/telemetry_decode.py) gives it already; a pydantic window holds
    only scalars and times, so its field dict is what model_dump gives, at a fourteenth of the cost (0.13 against
    1.9 us; tests/protos/test_telemetry_fields.py checks they are equal)."""
    if isinstance(msg, BatchIn):
        return msg
    return BatchIn(msg.device_id, msg.epoch, msg.seq, [w.__dict__.copy() for w in msg.windows], msg.dropped_windows,
                   msg.merged_windows)


def _size(msg: TelemetryBatch | BatchIn) -> int:
    return msg.size if isinstance(msg, BatchIn) else len(msg.windows)


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
                            p95_ms=w.p95_ms, mean_mj=w.mean_mj, energy_source=w.energy_source, window_end=w.end,
                            rows=w.rows, row_ms=w.row_ms, row_mj=w.row_mj)


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


def _status_rows(device: Device, telemetry: list, price_per_kwh: float = 0.0,
                 mix: dict | None = None) -> list[DeviceStatusRow]:
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
        offload = (mix or {}).get((device.device_id, name))
        rows.append(DeviceStatusRow(
            **base, model=name, desired_version=version, active_version=ms.active_version if ms else None,
            state=_model_state(version, ms), error=(ms.error if ms else None) or device.last_error,
            p50_ms=w.p50_ms if w else None, p95_ms=w.p95_ms if w else None, mean_mj=w.mean_mj if w else None,
            requests=w.count if w else None, rows=w.rows if w else None, row_ms=w.row_ms if w else None,
            row_mj=w.row_mj if w else None,
            energy_source=w.energy_source if w else None,
            inferences_per_kwh=inferences_per_kwh(w.row_mj) if w else None,
            cost_per_million=energy_cost_per_million(w.row_mj, price_per_kwh) if w else None,
            offload_share=offload.share if offload else None,
            offload_reasons=dict(offload.reasons) if offload else {},
        ))
    return rows
