"""The cloud's tables as SQLAlchemy 2 ORM classes. Alembic migrations (cloud/migrations/) create them; this module
is what the code and the migration check (tests/cloud/test_store.py) compare against.

Theory: the database is the source of truth for the fleet. Rows are flat (no ORM relationships), so a row handed out
by `Store` after its session closed can never lazy-load, and no SQL runs outside `store.py`. Documents that are
contracts (a signed desired state, a reported state, a manifest) are kept as the JSON the contract serialises to.
Times are stored as UTC and always read back timezone-aware, on SQLite too.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints so that migrations can refer to them on every backend (SQLite batch mode needs names).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out; SQLite forgets the zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # blob key of the ONNX bytes
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    opset: Mapped[int | None] = mapped_column(Integer)
    inputs: Mapped[list] = mapped_column(JSON, nullable=False)  # list of TensorSpec dicts
    outputs: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # Set for versions a distillation job built (migration 0002); None for pushed models (fp32 ONNX, any class).
    precision: Mapped[str | None] = mapped_column(String(8))  # fp32 | fp16 | int8
    runtime: Mapped[str | None] = mapped_column(String(16))  # onnxruntime | litert
    format: Mapped[str | None] = mapped_column(String(8))  # onnx | tflite
    built_for_class: Mapped[str | None] = mapped_column(String(64))  # deployable to this class only
    job_id: Mapped[int | None] = mapped_column(Integer)
    # The cost model's prediction when built: measured telemetry against these refits the class calibration.
    predicted_p95_ms: Mapped[float | None] = mapped_column(Float)
    predicted_mj: Mapped[float | None] = mapped_column(Float)
    macs: Mapped[int | None] = mapped_column(BigInteger)  # per sample: what a refit regresses latency on
    # A TFLite variant's smoke expected outputs (an .npz blob), computed by the worker with the variant's own
    # runtime: the API server that builds the bundle may have no LiteRT.
    smoke_sha256: Mapped[str | None] = mapped_column(String(64))


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (
        UniqueConstraint("model", "version", "device_class", name="uq_bundles_model_version_class"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    device_class: Mapped[str] = mapped_column(String(64), nullable=False)
    target_path: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)  # TUF target path
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # blob key of the archive
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    manifest: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class DeviceClassRow(Base):
    """A class added through the API (`Fleet.add_class`); catalog files are not copied here."""

    __tablename__ = "device_classes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    info: Mapped[dict] = mapped_column(JSON, nullable=False)  # a DeviceClassInfo dict
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    labels: Mapped[dict] = mapped_column(JSON, nullable=False)
    token_hash: Mapped[str | None] = mapped_column(String(64))  # the current device token (also in tokens)
    # sha256 of the enrollment token that enrolled the device: re-enrollment needs the same one (no takeover).
    enrolled_by: Mapped[str | None] = mapped_column(String(64))
    # The agent's own ed25519 key (base64), registered at the first enrollment; re-enrollment must be signed by it
    # (cloud/enrollment.py, migration 0005). `last_proof_at`: the newest accepted proof, so a replay is refused.
    public_key: Mapped[str | None] = mapped_column(String(64))
    last_proof_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reset_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # `fleet devices reset`: next enrollment registers
    enrollments_refused: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_refused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_refused_reason: Mapped[str | None] = mapped_column(String(300))
    agent_version: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    online: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The generation rises with every signed document; the stored doc is the one with this generation.
    desired_generation: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    desired_doc: Mapped[dict | None] = mapped_column(JSON)  # SignedDesiredState dict
    desired_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    reported_generation: Mapped[int | None] = mapped_column(Integer)
    reported_doc: Mapped[dict | None] = mapped_column(JSON)  # ReportedState dict
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class Deployment(Base):
    """A rule: model version for a device, a class or a label. Later rules for the same model name win."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    target_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # device | device_class | label
    target: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # Budgets for the devices' offload policy over the class's (migration 0009); None: the class's hold.
    p95_ms: Mapped[float | None] = mapped_column(Float)
    mj_per_inference: Mapped[float | None] = mapped_column(Float)


class DeploymentDevice(Base):
    """The devices a deployment reached when it was made (later enrollments follow the rule, not this list)."""

    __tablename__ = "deployment_devices"

    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)


class DeploymentBundle(Base):
    __tablename__ = "deployment_bundles"

    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"), primary_key=True)


class TelemetryBatchRow(Base):
    """One row per accepted batch: the primary key makes an outbox replay a no-op."""

    __tablename__ = "telemetry_batches"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The agent outbox's incarnation (migration 0007): (device_id, epoch, seq) is a batch's identity.
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=0)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    windows: Mapped[int] = mapped_column(Integer, nullable=False)
    dropped_windows: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    merged_windows: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class TelemetryWindowRow(Base):
    """One window as the agent sent it (protos/telemetry.py): `count` and `errors` are requests, `rows` the rows
    (inferences) in them; `p50_ms`..`p99_ms`, `mean_ms` and `mean_mj` are per request, `row_ms` and `row_mj` per
    row. Windows stored before migration 0006 read as batch 1 (rows = count, row figures from the request ones)."""

    __tablename__ = "telemetry_windows"
    __table_args__ = (Index("ix_telemetry_windows_device_model_end", "device_id", "model", "version", "end"),)

    # 64-bit since migration 0008 (100,000 windows a second use up 32 bits in six hours). On PostgreSQL the table
    # is partitioned by day on `end` (cloud/telemetry_rollup.py) and its primary key is (id, end), as a
    # partitioned table's key must hold the partition key; ids come from one sequence, so id alone stays unique.
    # SQLite keeps INTEGER PRIMARY KEY, its 64-bit rowid.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)  # with seq: the batch it came in
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    start: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    end: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False)
    errors: Mapped[int] = mapped_column(Integer, nullable=False)
    p50_ms: Mapped[float | None] = mapped_column(Float)
    p95_ms: Mapped[float | None] = mapped_column(Float)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    mean_mj: Mapped[float | None] = mapped_column(Float)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)  # a day at MAX_ROWS_PER_S needs 64 bits
    mean_ms: Mapped[float | None] = mapped_column(Float)
    row_ms: Mapped[float | None] = mapped_column(Float)
    row_mj: Mapped[float | None] = mapped_column(Float)
    energy_source: Mapped[str] = mapped_column(String(16), nullable=False)
    energy_meter: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    energy_method: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    energy_hz: Mapped[float | None] = mapped_column(Float)
    row_net_mj: Mapped[float | None] = mapped_column(Float)  # idle-subtracted energy per row
    idle_w: Mapped[float | None] = mapped_column(Float)
    where: Mapped[str] = mapped_column(String(8), nullable=False, default="local")


class TelemetryReasonRow(Base):
    """The offload policy's decisions in one window, one row per reason (protos/telemetry.py `reasons`): what
    `fleet status` shows as why a device offloads. Kept apart from telemetry_windows, whose rows most agents send
    without reasons, and deleted by time with the raw windows' retention (migration 0010)."""

    __tablename__ = "telemetry_reasons"
    __table_args__ = (Index("ix_telemetry_reasons_device_end", "device_id", "end"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    where: Mapped[str] = mapped_column(String(8), nullable=False)  # where the window's requests ran
    end: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)  # the window's end
    reason: Mapped[str] = mapped_column(String(48), nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False)


class TelemetryHourlyRow(Base):
    """Windows rolled up per device, (model, version) and UTC hour of their `end` (cloud/telemetry_rollup.py,
    migration 0008): additive sums, so hours and raw windows combine into the same figures
    `Store.telemetry_summary` computes from windows alone. `*_sum` is the figure times its weight (requests for
    per-request figures, rows for per-row ones) and `*_weight` the weight of the windows that had the figure."""

    __tablename__ = "telemetry_hourly"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    windows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    p50_ms_sum: Mapped[float | None] = mapped_column(Float)
    p50_ms_weight: Mapped[float] = mapped_column(Float, nullable=False)
    p95_ms_sum: Mapped[float | None] = mapped_column(Float)
    p95_ms_weight: Mapped[float] = mapped_column(Float, nullable=False)
    p99_ms: Mapped[float | None] = mapped_column(Float)  # the worst window's
    mean_ms_sum: Mapped[float | None] = mapped_column(Float)
    mean_ms_weight: Mapped[float] = mapped_column(Float, nullable=False)
    mean_mj_sum: Mapped[float | None] = mapped_column(Float)
    mean_mj_weight: Mapped[float] = mapped_column(Float, nullable=False)
    row_ms_sum: Mapped[float | None] = mapped_column(Float)
    row_ms_weight: Mapped[float] = mapped_column(Float, nullable=False)
    row_mj_sum: Mapped[float | None] = mapped_column(Float)
    row_mj_weight: Mapped[float] = mapped_column(Float, nullable=False)
    energy_source: Mapped[str] = mapped_column(String(16), nullable=False)  # the greatest, as the summary's max
    end: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)  # the latest window end in the hour


class Token(Base):
    """Bearer tokens, stored as sha256 hex of the token; the token itself is shown once and never stored."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # admin | enroll | device
    device_id: Mapped[str | None] = mapped_column(String(128), index=True)
    note: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MqttCredential(Base):
    """A device's broker login (username = device id), issued at enrollment (migration 0004).

    Only a salted scrypt hash is kept (`cloud/mqtt_accounts.py`); re-enrollment replaces it, revocation stamps
    `revoked_at` and the broker refuses the login from then on.
    """

    __tablename__ = "mqtt_credentials"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Counter(Base):
    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Job(Base):
    """A unit of background work (kind "distill"), queued here and run by `edgefleet-cloud worker` processes.

    A worker owns a running job while `lease_until` is in the future and renews it; a claim takes queued jobs and
    running jobs whose lease ran out (a dead worker), adding one to `attempts`. Writes by the worker are fenced on
    (worker, attempts), so a worker that lost its lease cannot overwrite the next owner's progress or result.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_id", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # queued|running|succeeded|failed|cancelled
    spec: Mapped[dict] = mapped_column(JSON, nullable=False)
    inputs: Mapped[dict] = mapped_column(JSON, nullable=False)  # role -> blob sha256 (teacher, data)
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    stage: Mapped[str] = mapped_column(String(64), nullable=False, default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobLogLine(Base):
    """A job's log, one row per line, so readers page with an offset while the worker appends."""

    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    line: Mapped[str] = mapped_column(Text, nullable=False)


class ClassCalibration(Base):
    """The cost model's calibration per device class (a costmodel.Calibration as JSON), refit from telemetry."""

    __tablename__ = "class_calibrations"

    device_class: Mapped[str] = mapped_column(String(64), primary_key=True)
    calibration: Mapped[dict] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
