"""`Store`: the only code that runs SQL. Every method is one short transaction.

Theory: the database is the fleet's source of truth, and several processes (API workers, the MQTT bridge, replicas
on other machines) write to it at once, so each allocation that reads then writes is made safe by the database,
not by Python: model versions by the (name, version) unique constraint plus a retry, device generations by a row
lock (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite transactions start with BEGIN IMMEDIATE, see db/session.py),
telemetry idempotency by the (device_id, seq) primary key with `ON CONFLICT DO NOTHING`. Rows handed out are
flat ORM objects detached from their session (no lazy loads, so no SQL escapes this module). SQLAlchemy errors are
wrapped here: a constraint violation becomes `Conflict`, anything else `Unavailable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from edgefleet.cloud.db.models import (
    Bundle,
    Counter,
    Deployment,
    DeploymentBundle,
    DeploymentDevice,
    Device,
    DeviceClassRow,
    ModelVersion,
    Token,
)
from edgefleet.cloud.db.session import make_sessionmaker, migrate
from edgefleet.cloud.enrollment import Enrolled, EnrollmentRefused
from edgefleet.cloud.errors import Conflict, Unavailable
from edgefleet.cloud.store_jobs import JobStoreMixin
from edgefleet.cloud.store_mqtt import MqttCredentialStoreMixin
from edgefleet.cloud.store_telemetry import TelemetryStoreMixin
from edgefleet.cloud.store_telemetry_upkeep import TelemetryUpkeepMixin

# 8 tries: each retry happens only when another writer took the same version between our read and insert.
VERSION_RETRIES = 8
ADMIN_MARKER = "admin_token_created"  # a counter row whose primary key makes "first start" happen once


class Store(JobStoreMixin, MqttCredentialStoreMixin, TelemetryStoreMixin, TelemetryUpkeepMixin):
    """All SQL; the jobs queue and calibrations are in `store_jobs.py`, devices' broker logins in
    `store_mqtt.py`, telemetry in `store_telemetry.py`, mixed in."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        self._dialect = engine.dialect.name

    @classmethod
    def open(cls, url: str) -> Store:
        """Migrate the database at `url` to head and open it."""
        return cls(migrate(url))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError as exc:
            raise Conflict(f"conflicting write: {str(exc.orig).splitlines()[0] if exc.orig else exc}") from None
        except SQLAlchemyError as exc:
            raise Unavailable(
                f"database error ({exc.__class__.__name__}): {str(exc).splitlines()[0]}; check the database is up"
            ) from None

    def _insert(self, table: Any) -> Any:
        # Both dialects speak INSERT ... ON CONFLICT; the construct lives in each dialect's module.
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    # ---------------------------------------------------------------------------------------------- counters

    def incr(self, name: str, by: int = 1) -> None:
        stmt = self._insert(Counter).values(name=name, value=by)
        stmt = stmt.on_conflict_do_update(index_elements=[Counter.name], set_={"value": Counter.value + by})
        with self._tx() as s:
            s.execute(stmt)

    def set_gauge(self, name: str, value: int) -> None:
        """A figure read from elsewhere (the broker's own drop count), kept beside the counters as it was read."""
        stmt = self._insert(Counter).values(name=name, value=value)
        stmt = stmt.on_conflict_do_update(index_elements=[Counter.name], set_={"value": value})
        with self._tx() as s:
            s.execute(stmt)

    def counters(self) -> dict[str, int]:
        with self._tx() as s:
            return {name: int(value) for name, value in s.execute(select(Counter.name, Counter.value))}

    # ---------------------------------------------------------------------------------------------- tokens

    def add_admin_token_once(self, token_hash: str, now: datetime) -> bool:
        """Store the admin token unless one was ever made; True when this call made it."""
        try:
            with self._tx() as s:
                s.add(Counter(name=ADMIN_MARKER, value=1))
                s.flush()  # the marker's primary key decides the race between two first starts
                s.add(Token(token_hash=token_hash, kind="admin", note="first start", created_at=now))
        except Conflict:
            return False
        return True

    def add_token(self, token_hash: str, kind: str, *, device_id: str | None, expires_at: datetime | None,
                  note: str, now: datetime) -> None:
        with self._tx() as s:
            s.add(Token(token_hash=token_hash, kind=kind, device_id=device_id, note=note[:200], created_at=now,
                        expires_at=expires_at))

    def find_token(self, token_hash: str) -> Token | None:
        with self._tx() as s:
            return s.scalar(select(Token).where(Token.token_hash == token_hash))

    def token_id(self, token_hash: str) -> int | None:
        with self._tx() as s:
            return s.scalar(select(Token.id).where(Token.token_hash == token_hash))

    def list_tokens(self, kind: str | None = None) -> list[Token]:
        query = select(Token).order_by(Token.id)
        if kind is not None:
            query = query.where(Token.kind == kind)
        with self._tx() as s:
            return list(s.scalars(query))

    def delete_token(self, token_id: int) -> Token | None:
        """Revoke: the row goes, so the token authenticates no more from the next request on. None when absent.
        A device token's device forgets it too."""
        with self._tx() as s:
            row = s.get(Token, token_id, with_for_update=True)
            if row is None:
                return None
            if row.kind == "device" and row.device_id is not None:
                s.execute(update(Device).where(Device.device_id == row.device_id, Device.token_hash == row.token_hash)
                          .values(token_hash=None))
            s.delete(row)
        return row

    def set_token_expiry(self, token_id: int, expires_at: datetime) -> Token | None:
        with self._tx() as s:
            row = s.get(Token, token_id, with_for_update=True)
            if row is not None:
                row.expires_at = expires_at
        return row

    # ---------------------------------------------------------------------------------------------- classes

    def put_class(self, name: str, info: dict[str, Any], now: datetime) -> None:
        stmt = self._insert(DeviceClassRow).values(name=name, info=info, created_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[DeviceClassRow.name], set_={"info": info})
        with self._tx() as s:
            s.execute(stmt)

    def list_classes(self) -> dict[str, dict[str, Any]]:
        with self._tx() as s:
            return {row.name: row.info for row in s.scalars(select(DeviceClassRow).order_by(DeviceClassRow.name))}

    # ---------------------------------------------------------------------------------------------- models

    def add_model_version(self, name: str, *, sha256: str, size_bytes: int, opset: int | None,
                          inputs: list[dict], outputs: list[dict], now: datetime,
                          variant: dict[str, Any] | None = None) -> ModelVersion:
        """Insert the next version of `name`: max + 1, retried when a concurrent upload took that number.

        `variant`: the facts of a version a distillation built (precision, runtime, format, built_for_class,
        job_id, predicted_p95_ms, predicted_mj); None for a pushed model."""
        for _ in range(VERSION_RETRIES):
            try:
                with self._tx() as s:
                    latest = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
                    row = ModelVersion(name=name, version=(latest or 0) + 1, sha256=sha256, size_bytes=size_bytes,
                                       opset=opset, inputs=inputs, outputs=outputs, created_at=now,
                                       **(variant or {}))
                    s.add(row)
                return row
            except Conflict:
                continue
        raise Unavailable(f"could not allocate a version for model {name!r} after {VERSION_RETRIES} tries; retry")

    def get_model_version(self, name: str, version: int | None = None) -> ModelVersion | None:
        """That version, or the latest when `version` is None."""
        query = select(ModelVersion).where(ModelVersion.name == name)
        query = query.where(ModelVersion.version == version) if version is not None else query.order_by(
            ModelVersion.version.desc()).limit(1)
        with self._tx() as s:
            return s.scalar(query)

    def list_model_versions(self) -> list[ModelVersion]:
        with self._tx() as s:
            return list(s.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)))

    # ---------------------------------------------------------------------------------------------- bundles

    def get_bundle(self, model: str, version: int, device_class: str) -> Bundle | None:
        with self._tx() as s:
            return s.scalar(select(Bundle).where(Bundle.model == model, Bundle.version == version,
                                                 Bundle.device_class == device_class))

    def get_bundle_by_target(self, target_path: str) -> Bundle | None:
        with self._tx() as s:
            return s.scalar(select(Bundle).where(Bundle.target_path == target_path))

    def add_bundle(self, *, model: str, version: int, device_class: str, target_path: str, sha256: str,
                   size_bytes: int, manifest: dict[str, Any], now: datetime) -> Bundle:
        """Record a built bundle; when another builder recorded it first, return that one."""
        try:
            with self._tx() as s:
                row = Bundle(model=model, version=version, device_class=device_class, target_path=target_path,
                             sha256=sha256, size_bytes=size_bytes, manifest=manifest, created_at=now)
                s.add(row)
            return row
        except Conflict:
            existing = self.get_bundle(model, version, device_class)
            if existing is None:
                raise
            return existing

    # ---------------------------------------------------------------------------------------------- devices

    def enroll_device(self, device_id: str, device_class: str, labels: dict[str, str], agent_version: str,
                      token_hash: str, now: datetime, enrolled_by: str | None = None, *,
                      public_key: str | None = None, proof_at: datetime | None = None,
                      admit: Callable[[Enrolled], str | None] | None = None) -> tuple[Device, bool]:
        """Create the device, or re-enroll an existing one; either way its device token is replaced.

        Returns (row, created). For an existing id `admit` (the pure rule of `cloud/enrollment.py`) decides, on the
        locked row; a refusal is recorded on the device (count, time, reason) and committed, THEN raised as
        `EnrollmentRefused`, so the attempt stays visible. A different class for an existing id is a Conflict: its
        desired state, bundles and telemetry belong to the old class.
        """
        refused: str | None = None
        with self._tx() as s:
            row = s.get(Device, device_id, with_for_update=True)
            created = row is None
            if row is None:
                row = Device(device_id=device_id, device_class=device_class, labels=labels, enrolled_at=now,
                             online=False, desired_generation=0, agent_version=agent_version,
                             enrollments_refused=0)
                s.add(row)
            elif row.device_class != device_class:
                raise Conflict(
                    f"device {device_id!r} is enrolled as class {row.device_class!r}, not {device_class!r}: enroll "
                    "with the same class, or pick a new device id"
                )
            elif admit is not None and (refused := admit(Enrolled(
                    device_class=row.device_class, public_key=row.public_key, last_proof_at=row.last_proof_at,
                    reset=row.reset_at is not None))) is not None:
                row.enrollments_refused = (row.enrollments_refused or 0) + 1
                row.last_refused_at = now
                row.last_refused_reason = refused[:300]
            if refused is None:
                row.labels = dict(labels)
                row.agent_version = agent_version
                if enrolled_by is not None:
                    row.enrolled_by = enrolled_by
                if public_key is not None or row.reset_at is not None:
                    row.public_key = public_key  # registered at the first enrollment, or after a reset
                row.last_proof_at = proof_at or row.last_proof_at
                row.reset_at = None
                row.token_hash = token_hash
                # Rotation: the previous device token stops working the moment the new one exists.
                s.execute(delete(Token).where(Token.kind == "device", Token.device_id == device_id))
                s.add(Token(token_hash=token_hash, kind="device", device_id=device_id, note="enrollment",
                            created_at=now))
        if refused is not None:
            raise EnrollmentRefused(f"device id {device_id!r} is already enrolled and this request may not take it "
                                    f"over: {refused}", detail={"device_id": device_id})
        return row, created

    def reset_device(self, device_id: str, now: datetime) -> Device | None:
        """An operator's word that the device was reinstalled: forget its key, revoke its device tokens; the next
        enrollment of the id registers the key it brings. None when there is no such device."""
        with self._tx() as s:
            row = s.get(Device, device_id, with_for_update=True)
            if row is None:
                return None
            row.public_key = None
            row.last_proof_at = None
            row.reset_at = now
            row.token_hash = None
            s.execute(delete(Token).where(Token.kind == "device", Token.device_id == device_id))
        return row

    def get_device(self, device_id: str) -> Device | None:
        with self._tx() as s:
            return s.get(Device, device_id)

    def list_devices(self, device_class: str | None = None) -> list[Device]:
        query = select(Device).order_by(Device.device_id)
        if device_class is not None:
            query = query.where(Device.device_class == device_class)
        with self._tx() as s:
            return list(s.scalars(query))

    def commit_desired(
        self,
        device_id: str,
        *,
        rules_mark: tuple[int, int],
        device_class: str,
        labels: dict[str, str],
        make_doc: Callable[[int], tuple[dict[str, Any], datetime]],
    ) -> int | None:
        """Bump the device's generation and store the document `make_doc(generation)` signs, atomically.

        The caller computed the document's models from the deployment rules it saw (`rules_mark`) and the device's
        class and labels; if any of these changed since, nothing is written and None is returned, so the caller
        recomputes. This keeps a slow deploy from overwriting a newer one's document with a higher generation.
        """
        with self._tx() as s:
            row = s.get(Device, device_id, with_for_update=True)
            if row is None:
                return None
            if self._rules_mark(s) != rules_mark or row.device_class != device_class or row.labels != labels:
                return None
            generation = row.desired_generation + 1
            doc, expires_at = make_doc(generation)
            row.desired_generation = generation
            row.desired_doc = doc
            row.desired_expires_at = expires_at
            return generation

    def devices_expiring_before(self, when: datetime) -> list[str]:
        """Ids of devices whose document expires before `when`, or that have none yet."""
        query = select(Device.device_id).where(
            (Device.desired_expires_at.is_(None)) | (Device.desired_expires_at < when)
        ).order_by(Device.device_id)
        with self._tx() as s:
            return list(s.scalars(query))

    def set_reported(self, device_id: str, *, doc: dict[str, Any], generation: int, last_error: str | None,
                     reported_at: datetime, now: datetime) -> Literal["stored", "stale", "ahead", "unknown"]:
        """Store a reported state: "stored"; "stale": older than the one stored (a replay), ignored; "ahead": a
        generation above the highest the cloud issued to the device (forged, or from another database), refused
        and nothing touched, so it cannot make every real report after it look stale; "unknown": no such device."""
        with self._tx() as s:
            row = s.get(Device, device_id, with_for_update=True)
            if row is None:
                return "unknown"
            # Under the row lock: commit_desired raises desired_generation under the same lock, before publishing.
            if generation > row.desired_generation:
                return "ahead"
            row.last_seen = now
            if row.reported_generation is not None and (
                generation < row.reported_generation
                or (generation == row.reported_generation and row.reported_at and reported_at < row.reported_at)
            ):
                return "stale"
            row.reported_doc = doc
            row.reported_generation = generation
            row.reported_at = reported_at
            row.last_error = last_error
            return "stored"

    def set_online(self, device_id: str, online: bool, now: datetime) -> bool:
        with self._tx() as s:
            result = s.execute(update(Device).where(Device.device_id == device_id).values(online=online,
                                                                                          last_seen=now))
            return result.rowcount > 0

    # ---------------------------------------------------------------------------------------------- deployments

    @staticmethod
    def _rules_mark(s: Session) -> tuple[int, int]:
        count, top = s.execute(select(func.count(Deployment.id), func.max(Deployment.id))).one()
        return int(count or 0), int(top or 0)

    def deployment_rules(self) -> tuple[list[Deployment], tuple[int, int]]:
        """Every deployment in the order made (later rules win) and a mark to detect new ones."""
        with self._tx() as s:
            rules = list(s.scalars(select(Deployment).order_by(Deployment.id)))
            return rules, self._rules_mark(s)

    def add_deployment(self, *, model: str, version: int, target_kind: str, target: str, device_ids: list[str],
                       bundle_ids: list[int], now: datetime, p95_ms: float | None = None,
                       mj_per_inference: float | None = None) -> Deployment:
        with self._tx() as s:
            row = Deployment(model=model, version=version, target_kind=target_kind, target=target, created_at=now,
                             p95_ms=p95_ms, mj_per_inference=mj_per_inference)
            s.add(row)
            s.flush()
            s.add_all(DeploymentDevice(deployment_id=row.id, device_id=d) for d in sorted(set(device_ids)))
            s.add_all(DeploymentBundle(deployment_id=row.id, bundle_id=b) for b in sorted(set(bundle_ids)))
        return row

    def list_deployments(self) -> list[tuple[Deployment, list[str], list[Bundle]]]:
        with self._tx() as s:
            rows = list(s.scalars(select(Deployment).order_by(Deployment.id)))
            devices: dict[int, list[str]] = {}
            for dep_id, dev in s.execute(select(DeploymentDevice.deployment_id, DeploymentDevice.device_id)
                                         .order_by(DeploymentDevice.device_id)):
                devices.setdefault(dep_id, []).append(dev)
            bundles: dict[int, list[Bundle]] = {}
            for dep_id, bundle in s.execute(select(DeploymentBundle.deployment_id, Bundle)
                                            .join(Bundle, Bundle.id == DeploymentBundle.bundle_id)
                                            .order_by(Bundle.device_class)):
                bundles.setdefault(dep_id, []).append(bundle)
            return [(r, devices.get(r.id, []), bundles.get(r.id, [])) for r in rows]
