"""The agent's configuration: one frozen `AgentConfig`, read once from a TOML file and passed down.

Theory of operation: the TOML file is parsed with `tomllib`, then walked against a schema table (`_SCHEMA`: dotted
key -> type and default). Anything the schema does not know, any value of the wrong type and any value out of range
raises `ConfigError` with ONE line that names the file and the dotted key, and suggests the closest known key for a
typo. Nothing is read from the environment here; tests build `AgentConfig(...)` directly instead of patching
constants. Every interval and limit carries its unit in its name (`window_s`, `outbox_max_mb`).

Example:

    device_id = "pi-kitchen-1"
    device_class = "rpi4"
    cloud_url = "http://cloud.local:8000"
    enrollment_token = "..."
    data_dir = "/var/lib/edgefleet"        # relative paths are relative to the config file
    transport = "mqtt"                     # or "grpc": the cloud's agent channel, [grpc] below
    [labels]
    site = "kitchen"
    [api]
    http_host = "127.0.0.1"
    http_port = 8181                       # 0: ephemeral; the bound address goes to {data_dir}/api.json
    read_timeout_s = 10                    # then a stalled request is answered 408 and closed
    unix_socket = "/run/edgefleet/api.sock"
    [telemetry]
    window_s = 60
    outbox_max_mb = 16
    [link]
    ack_timeout_s = 5                      # then the HTTP fallback carries the report or batch
    [grpc]                                 # with transport = "grpc" (pip install 'edgefleet[agent,grpc]')
    target = "cloud.local:8082"            # host:port; leave it out to use the one the cloud names
    tls = true
    ca_file = "/etc/edgefleet/cloud-ca.pem"  # empty: the system's roots
    [reconcile]
    max_rounds = 20
    [offload]                              # docs/offload.md: the policy, its reasons and every key
    enabled = true
    url = "http://cloud.local:8000"        # any OIP server (Triton, KServe, MLServer); empty: cloud_url
    p95_ms = 50                            # overrides the manifest's budget
    cascade_metric = "max_prob"            # escalate to the cloud when the local answer is less sure than
    cascade_threshold = 0.8                # this
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet.edge_agent.config_sections import (  # noqa: F401 - re-exported: callers import them from here
    CASCADE_METRICS,
    ENERGY_METERS,
    RAPL_DOMAINS,
    TRANSPORTS,
    ApiConfig,
    EnergyConfig,
    GrpcConfig,
    LimitsConfig,
    LinkConfig,
    MqttConfig,
    OffloadConfig,
    ReconcileConfig,
    RetryConfig,
    RuntimeConfig,
    TelemetryConfig,
    _check_energy,
    _check_grpc,
    _check_offload,
)
from edgefleet.edge_agent.errors import ConfigError
from edgefleet.protos.limits import MAX_WINDOW_S
from edgefleet.protos.messages import check_device_id, check_name

try:  # Python 3.11+; the agent also runs on 3.10 images where tomli is the same parser
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    device_class: str
    cloud_url: str
    data_dir: Path
    enrollment_token: str = ""
    transport: str = "mqtt"  # "mqtt" | "grpc": how the link reaches the cloud (HTTP is the fallback of both)
    labels: dict[str, str] = field(default_factory=dict)
    api: ApiConfig = ApiConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    retry: RetryConfig = RetryConfig()
    limits: LimitsConfig = LimitsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    energy: EnergyConfig = EnergyConfig()
    mqtt: MqttConfig = MqttConfig()
    grpc: GrpcConfig = GrpcConfig()
    link: LinkConfig = LinkConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    offload: OffloadConfig = OffloadConfig()

    @property
    def desired_poll_s(self) -> float:
        """The HTTP poll interval of the desired state while the link is down (link.desired_poll_s resolved)."""
        return self.link.desired_poll_s if self.link.desired_poll_s is not None else self.retry.retry_max_s

    # The data dir layout, in one place (docs/internals.md "Agent data dir layout").
    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def downloads_dir(self) -> Path:
        return self.data_dir / "downloads"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def api_json_path(self) -> Path:
        return self.data_dir / "api.json"


_SECTIONS: dict[str, type] = {
    "api": ApiConfig,
    "telemetry": TelemetryConfig,
    "retry": RetryConfig,
    "limits": LimitsConfig,
    "runtime": RuntimeConfig,
    "energy": EnergyConfig,
    "mqtt": MqttConfig,
    "grpc": GrpcConfig,
    "link": LinkConfig,
    "reconcile": ReconcileConfig,
    "offload": OffloadConfig,
}
_TOP_LEVEL = {"device_id": str, "device_class": str, "cloud_url": str, "data_dir": str, "enrollment_token": str,
              "transport": str}
_REQUIRED = ("device_id", "device_class", "cloud_url", "data_dir")
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _section_types(cls: type) -> dict[str, type]:
    """Field name -> the scalar type a TOML value must have (Optional unwrapped)."""
    out: dict[str, type] = {}
    for f in fields(cls):
        ann = str(f.type).replace(" ", "")
        out[f.name] = (int if ann.startswith("int") else float if ann.startswith("float")
                       else bool if ann.startswith("bool") else str)
    return out


def _known_keys() -> list[str]:
    keys = list(_TOP_LEVEL) + ["labels"]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{name}" for name in _section_types(cls)]
    return keys


def _unknown(source: str, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def _coerce(source: str, key: str, want: type, value: Any) -> Any:
    # bool is an int subclass in Python; `port = true` is a mistake, not 1.
    ok = (
        isinstance(value, bool)
        if want is bool
        else isinstance(value, str)
        if want is str
        else isinstance(value, int) and not isinstance(value, bool)
        if want is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {_TYPE_WORDS[want]}, got {value!r}")
    if want is float:
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{source}: '{key}' must be a finite number >= 0, got {value!r}")
    if want is int and value < 0:
        raise ConfigError(f"{source}: '{key}' must be >= 0, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], *, source: str = "config", base_dir: Path | None = None) -> AgentConfig:
    """Validate a decoded TOML document into an `AgentConfig`; `source` names the file in error lines."""
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP_LEVEL:
            top[key] = _coerce(source, key, _TOP_LEVEL[key], value)
        elif key == "labels":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'labels' must be a table of strings, got {value!r}")
            for lk, lv in value.items():
                if not isinstance(lv, str):
                    raise ConfigError(f"{source}: 'labels.{lk}' must be a string, got {lv!r}")
                try:
                    check_name(lk)
                except ValueError as exc:
                    raise ConfigError(f"{source}: 'labels.{lk}': {exc}") from None
            top["labels"] = dict(value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a table ([{key}]), got {value!r}")
            types = _section_types(_SECTIONS[key])
            values = {}
            for sub, sub_value in value.items():
                dotted = f"{key}.{sub}"
                if sub not in types:
                    raise _unknown(source, dotted)
                values[sub] = _coerce(source, dotted, types[sub], sub_value)
            sections[key] = values
        elif isinstance(value, dict):
            # A misspelt section: name the first key inside it so the hint can match 'telemetry.window_s'.
            first = next(iter(value), None)
            raise _unknown(source, f"{key}.{first}" if first is not None else key)
        else:
            raise _unknown(source, key)
    for key in _REQUIRED:
        if not top.get(key):
            raise ConfigError(f"{source}: missing required key '{key}'")
    try:
        check_device_id(top["device_id"])
    except ValueError as exc:
        raise ConfigError(f"{source}: 'device_id': {exc}") from None
    try:
        check_name(top["device_class"])
    except ValueError as exc:
        raise ConfigError(f"{source}: 'device_class': {exc}") from None
    if not top["cloud_url"].startswith(("http://", "https://")):
        raise ConfigError(f"{source}: 'cloud_url' must start with http:// or https://, got {top['cloud_url']!r}")
    api = sections.get("api", {})
    if not 0 <= api.get("http_port", 0) <= 65535:
        raise ConfigError(f"{source}: 'api.http_port' must be between 0 and 65535, got {api['http_port']!r}")
    mqtt = sections.get("mqtt", {})
    if "port" in mqtt and not 1 <= mqtt["port"] <= 65535:
        raise ConfigError(f"{source}: 'mqtt.port' must be between 1 and 65535, got {mqtt['port']!r}")
    retry = sections.get("retry", {})
    if retry.get("retry_initial_s", RetryConfig.retry_initial_s) > retry.get("retry_max_s", RetryConfig.retry_max_s):
        raise ConfigError(f"{source}: 'retry.retry_initial_s' must not exceed 'retry.retry_max_s'")
    # Zero would make the loop spin, every publish fall back to HTTP at once, the poll hammer the cloud, or every
    # local API read time out at once.
    for section, key in (("link", "ack_timeout_s"), ("link", "desired_poll_s"), ("reconcile", "tick_s"),
                         ("reconcile", "max_rounds"), ("api", "read_timeout_s")):
        value = sections.get(section, {}).get(key)
        if value is not None and value <= 0:
            raise ConfigError(f"{source}: '{section}.{key}' must be > 0, got {value!r}")
    _check_energy(source, sections.get("energy", {}))
    _check_offload(source, sections.get("offload", {}))
    grpc = sections.get("grpc", {})
    _check_grpc(source, top.get("transport", "mqtt"), grpc)
    # The cloud refuses a telemetry window longer than the contract's MAX_WINDOW_S (protos/limits.py).
    window_s = sections.get("telemetry", {}).get("window_s", TelemetryConfig.window_s)
    if not 0 < window_s <= MAX_WINDOW_S:
        raise ConfigError(f"{source}: 'telemetry.window_s' must be > 0 and at most {MAX_WINDOW_S} (one day), "
                          f"got {window_s!r}")

    data_dir = Path(top.pop("data_dir")).expanduser()
    if not data_dir.is_absolute() and base_dir is not None:
        data_dir = base_dir / data_dir
    unix_socket = api.get("unix_socket", "")
    if unix_socket and not Path(unix_socket).is_absolute() and base_dir is not None:
        api["unix_socket"] = str(base_dir / unix_socket)
    ca_file = grpc.get("ca_file", "")
    if ca_file and not Path(ca_file).expanduser().is_absolute() and base_dir is not None:
        grpc["ca_file"] = str(base_dir / ca_file)
    built = {name: cls(**sections.get(name, {})) for name, cls in _SECTIONS.items()}
    return AgentConfig(data_dir=data_dir, **top, **built)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the TOML file at `path`; every problem is one `ConfigError` line naming the key."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text; save the config file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line N, column M)".
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return config_from_dict(data, source=source, base_dir=path.parent.resolve())
