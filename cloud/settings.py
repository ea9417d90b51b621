"""The cloud's configuration, in one place: `Settings`.

Theory: values come, highest priority first, from keyword arguments, `EDGEFLEET_*` environment variables, a TOML file
(named by the `config_file` argument or `EDGEFLEET_CONFIG`), then the defaults below. Every interval and limit is a
named field with its unit in the name. Code receives a `Settings`; tests build one instead of patching constants.

A config file with a key this class does not know is refused with the key and the file named: a typo such as
`max_modle_mb` must not silently fall back to a default. Any bad value raises `Invalid` with one line naming it.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgefleet.cloud.errors import Invalid
from edgefleet.protos.messages import MAX_MESSAGE_BYTES

CONFIG_ENV = "EDGEFLEET_CONFIG"

# The file a Settings() call under construction reads; a ContextVar so that concurrent constructions (threads,
# tasks) never see each other's file.
_config_path: ContextVar[Path | None] = ContextVar("_config_path", default=None)


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML config file; refuses keys that are not fields, naming the key and the file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # unused: __call__ returns the whole file

    def __call__(self) -> dict[str, Any]:
        path = _config_path.get()
        if path is None:
            return {}
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise Invalid(f"config file {path} does not exist: fix {CONFIG_ENV} or the --config path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise Invalid(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise Invalid(f"config file {path} is not valid TOML: {exc}") from None
        known = set(self.settings_cls.model_fields)
        for key in data:
            if key not in known:
                raise Invalid(
                    f"config file {path}: unknown key {key!r}; known keys are: {', '.join(sorted(known))}"
                )
        return data


class Settings(BaseSettings):
    """Everything the cloud process is configured with. Paths are made absolute at load time."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid", validate_default=True)

    # Where the SQLite file, the blob folder, TUF metadata, keys and the admin token live.
    data_dir: Path = Path(".edgefleet-data")
    # None: sqlite:///{data_dir}/edgefleet.db. A PostgreSQL URL (postgresql+psycopg://...) works the same.
    database_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # The base URL devices use to reach this cloud; None: http://{host}:{port}.
    public_url: str | None = None

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_topic_prefix: str = "edgefleet"
    mqtt_tls: bool = False
    # 30 s: the agent's MQTT keepalive; the broker declares it gone (last will) after 1.5x this.
    mqtt_keepalive_s: int = Field(default=30, ge=5)
    embedded_broker: Literal["auto", "always", "never"] = "auto"
    # Per-device broker accounts (issued at enrollment, see cloud/mqtt_accounts.py). "auto": the embedded broker
    # checks them in-process, and any Mosquitto (the cloud's own or the operator's) gets them through its dynamic
    # security plugin; "dynsec": the same, said explicitly; "none": no accounts are provisioned (an open broker).
    mqtt_auth: Literal["auto", "dynsec", "none"] = "auto"
    # The cloud's own broker login and client id. No device can take either: device ids are checked against the
    # username, and every device account is bound to its client id "edgefleet-agent-{device_id}".
    mqtt_username: str = Field(default="edgefleet-cloud", min_length=1, max_length=128)
    # None: made at the first start and kept in {data_dir}/mqtt-cloud.password (0600), like the admin token.
    mqtt_password: SecretStr | None = None
    mqtt_client_id: str = Field(default="edgefleet-cloud", min_length=1, max_length=128)
    # 5 s: a dynamic-security command is one round trip on a local broker; past this enrollment answers 503 and
    # the agent retries with backoff.
    mqtt_command_timeout_s: float = Field(default=5.0, gt=0)
    # The bridge's reconnect backoff (full jitter, common/backoff.py): 1 s first window, capped at 30 s.
    mqtt_retry_initial_s: float = Field(default=1.0, gt=0)
    mqtt_retry_max_s: float = Field(default=30.0, gt=0)
    # The cloud's MQTT session (cloud/mqtt_bridge.py): "auto" speaks MQTT 5 to any Mosquitto and 3.1.1 to the
    # embedded amqtt (which knows nothing newer). Persistent either way: the broker queues devices' messages for the
    # cloud while it is away, for up to mqtt_session_expiry_s (MQTT 5; a 3.1.1 session never expires).
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = "auto"
    mqtt_session_expiry_s: int = Field(default=7 * 86_400, ge=0, le=2**32 - 1)
    # Telemetry ingest: up to this many messages, or what came within mqtt_ingest_wait_s, per database transaction.
    mqtt_ingest_batch: int = Field(default=500, ge=1, le=10_000)
    mqtt_ingest_wait_s: float = Field(default=0.05, ge=0, le=10)
    # Per-device telemetry rate limit (cloud/ratelimit.py), in windows: what goes past it is refused and counted as
    # refused_telemetry_rate_limited (MQTT: named in the ack's refused list; HTTP: 429, and the agent retries).
    telemetry_device_windows_per_s: float = Field(default=20_000.0, gt=0)
    telemetry_device_burst_s: float = Field(default=5.0, gt=0)
    # None: looked up where Debian, Alpine and the Mosquitto tarball install mosquitto_dynamic_security.so.
    mosquitto_dynsec_plugin: Path | None = None

    # 200 MB: larger than any model an edge class in the catalog can hold, small enough to refuse a mistaken upload.
    max_model_mb: float = Field(default=200.0, gt=0)
    # 512 KiB: the cap on a JSON request body. The largest real one is a reported state or telemetry batch over the
    # HTTP fallback, at most MAX_MESSAGE_BYTES (256 KiB), so the cap may not go below that; a deployment or a class
    # is a few hundred bytes. Over it is a 413 before the rest is read (cloud/api/limits.py).
    max_json_body_kb: int = Field(default=512, ge=MAX_MESSAGE_BYTES // 1024)
    # 1 day: a device whose control plane is frozen stops trusting its desired state within a day; documents are
    # re-signed when past half their life (refresh_expiring), so a connected device never sees one expire.
    desired_state_ttl_s: int = Field(default=86400, ge=60)
    # 1 day: TUF's timestamp role is the freshness signal; the cloud re-signs it well before expiry.
    tuf_timestamp_expiry_s: int = Field(default=86400, ge=60)
    # The TUF root key is kept off this machine: the cloud refuses to start while {data_dir}/tuf/keys/root.pem exists,
    # still re-signs targets, snapshot and timestamp with their online keys, and a new root is exported, signed
    # elsewhere and imported (`edgefleet-cloud keys export-root | sign-root | import-root`).
    tuf_offline_root: bool = False
    # 60 s: how often the serve loop runs refresh_expiring and the TUF timestamp refresh.
    refresh_interval_s: float = Field(default=60.0, gt=0)
    # Status and device views roll telemetry up over this look-back (count-weighted; see Store.telemetry_summary).
    telemetry_summary_s: int = Field(default=3600, gt=0)
    # Telemetry roll-up and retention (cloud/telemetry_rollup.py, run every telemetry_maintenance_interval_s by the
    # serve loop). Raw windows roll up to hourly sums and are kept 48 h (two days: a summary look-back and a day of
    # questions about single windows), hourly sums 400 days (a year and its seasons). Batch claims (the dedup keys)
    # are kept 8 days, past the cloud's MQTT session expiry (7 days): the broker cannot redeliver a batch after that,
    # so a claim older than it guards nothing. On PostgreSQL, daily partitions are made this many days ahead.
    telemetry_raw_retention_h: int = Field(default=48, ge=1)
    telemetry_hourly_retention_d: int = Field(default=400, ge=1)
    telemetry_dedup_retention_h: int = Field(default=8 * 24, ge=1)
    telemetry_partition_days_ahead: int = Field(default=7, ge=1, le=366)
    telemetry_maintenance_interval_s: float = Field(default=300.0, gt=0)
    # Efficiency figures (cloud/efficiency.py). Prices are currency-agnostic: costs come out in whatever currency
    # these are in. 0.30 per kWh: a European household tariff; 1.0 per million offloaded inferences: the order of a
    # hosted small-model endpoint. Set both to what this fleet really pays.
    energy_price_per_kwh: float = Field(default=0.30, ge=0, allow_inf_nan=False)
    offload_price_per_million: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    # /metrics (Prometheus) answers without a token when True, as exporters do; it serves per class and model
    # aggregates and counters, no device ids and nothing secret. False: it needs the admin token (Prometheus:
    # `authorization: {credentials_file: ...}` in the scrape config).
    metrics_public: bool = True

    # Offload inference (cloud/inference/): the Open Inference Protocol server at /v2 (and `edgefleet-cloud infer`).
    # What answers a distilled version: "teacher" (the model it was distilled from, under the version's name; the
    # cloud has the cores the device lacked) or "version" (the version's own file, so cloud and device answers agree;
    # a TFLite variant, which ONNX Runtime cannot run, is answered by its teacher all the same).
    offload_serves: Literal["teacher", "version"] = "teacher"
    # ONNX Runtime threads per session; 0: one, with concurrent requests on concurrent threads, which measured as
    # fast or faster than an intra-op pool on 2 cores for every model size tried (see cloud/inference/pool.py).
    infer_intra_op_threads: int = Field(default=0, ge=0, le=256)
    # Dynamic batching: concurrent requests to one model wait up to this long to run as one batch; 0: off (every
    # request runs at once). 500-2000 us pays when many clients call a small model; it adds that much latency.
    infer_batch_max_delay_us: int = Field(default=0, ge=0, le=1_000_000)
    infer_batch_max_size: int = Field(default=32, ge=2, le=4096)
    # 64 MB: a batch of 64 224x224x3 float32 images is 38 MB. Over it is a 413 before the body is read.
    infer_max_body_mb: float = Field(default=64.0, gt=0)
    # 16 model files loaded at once, least recently used unloaded past it.
    infer_max_loaded: int = Field(default=16, ge=1)
    # The data plane as its own process (`edgefleet-cloud infer`) listens here.
    infer_port: int = Field(default=8081, ge=0, le=65535)
    # gRPC inference.GRPCInferenceService (cloud/inference/grpc_server.py); None: no gRPC server.
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    # PEM files; both or neither. Unset: plaintext (behind a TLS-terminating proxy, or on localhost).
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None

    # The gRPC agent channel (cloud/agent_channel.py, docs/protocol.md "gRPC"): agents with transport = "grpc"
    # connect here. None: off (MQTT and HTTP only). agent_channel_host None: the same interface as `host`.
    agent_channel_port: int | None = Field(default=None, ge=0, le=65535)
    agent_channel_host: str | None = None
    # What `GET /api/v1/agent-channel` tells agents to connect to (host:port), for an agent whose [grpc] target is
    # empty. None: public_url's host and the bound port. Set it behind a load balancer or a proxy.
    agent_channel_public_target: str | None = Field(default=None, min_length=3, max_length=300)
    # PEM files; both or neither. Unset: plaintext (behind a TLS-terminating proxy, or on localhost).
    agent_channel_tls_cert: Path | None = None
    agent_channel_tls_key: Path | None = None
    # 30 s ping, 10 s to answer: a stalled stream is dropped (and the device marked offline) within 40 s, about
    # when the broker's last will fires for an MQTT agent (1.5 x its 30 s keepalive). Agents may ping as often as
    # every agent_channel_min_ping_s; faster is answered with GOAWAY (gRPC's too_many_pings).
    agent_channel_keepalive_s: float = Field(default=30.0, gt=0)
    agent_channel_keepalive_timeout_s: float = Field(default=10.0, gt=0)
    agent_channel_min_ping_s: float = Field(default=10.0, gt=0)
    # 1 MiB per gRPC message: above the contract's 256 KiB (MAX_MESSAGE_BYTES), so a payload over the contract is
    # refused and counted while its stream lives on; past this, gRPC ends the stream (RESOURCE_EXHAUSTED).
    agent_channel_max_message_kb: int = Field(default=1024, gt=MAX_MESSAGE_BYTES // 1024, le=64 * 1024)
    # Streams open at once: each holds a server thread and a reader thread. Past it a connect is refused
    # (RESOURCE_EXHAUSTED) and the agent backs off; larger fleets run more cloud replicas.
    agent_channel_max_streams: int = Field(default=1000, ge=1, le=100_000)

    # Background jobs (distillation), run by `edgefleet-cloud worker`. 60 s lease, renewed every third of it: a
    # killed worker's job is claimed again within a minute, and a GC pause or a slow database round trip does not
    # lose a live one. 3 attempts: a job that kills its worker every time (out of memory) fails instead of looping.
    job_lease_s: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # 1 s: how often an idle worker looks for work; a submitted job starts within this.
    worker_poll_s: float = Field(default=1.0, gt=0)
    # 500 MB: a transfer set of 100k 224x224 RGB float16 images; the teacher obeys max_model_mb.
    max_transfer_mb: float = Field(default=500.0, gt=0)

    def __init__(self, config_file: str | Path | None = None, **values: Any) -> None:
        path = config_file if config_file is not None else os.environ.get(CONFIG_ENV) or None
        token = _config_path.set(Path(path).expanduser() if path else None)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            source = f" (config file {path})" if path else ""
            raise Invalid(f"setting {where!r}: {first.get('msg', 'invalid')}{source}") from None
        finally:
            _config_path.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        # Absolute once, so a later chdir (uvicorn reload, tests) cannot move the data.
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'edgefleet.db'}"
        if not self.public_url:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            self.public_url = f"http://{host}:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        self.mqtt_topic_prefix = self.mqtt_topic_prefix.strip("/")
        if not self.mqtt_topic_prefix or any(c in self.mqtt_topic_prefix for c in "+#"):
            raise ValueError("mqtt_topic_prefix must be non-empty and contain no MQTT wildcards (+ #)")
        if self.mqtt_client_id.startswith("edgefleet-agent-"):
            raise ValueError("mqtt_client_id must not start with edgefleet-agent- (the devices' client ids)")
        if self.mqtt_retry_initial_s > self.mqtt_retry_max_s:
            raise ValueError("mqtt_retry_initial_s must not exceed mqtt_retry_max_s")
        return self

    # Layout of the data directory: one place, so every part agrees.
    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def classes_dir(self) -> Path:
        return self.data_dir / "classes"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def mqtt_password_file(self) -> Path:
        return self.data_dir / "mqtt-cloud.password"

    @property
    def mosquitto_dir(self) -> Path:
        return self.data_dir / "mosquitto"

    @property
    def max_model_bytes(self) -> int:
        return int(self.max_model_mb * 1024 * 1024)

    @property
    def max_json_body_bytes(self) -> int:
        return self.max_json_body_kb * 1024

    @property
    def max_transfer_bytes(self) -> int:
        return int(self.max_transfer_mb * 1024 * 1024)

    @property
    def infer_max_body_bytes(self) -> int:
        return int(self.infer_max_body_mb * 1024 * 1024)
