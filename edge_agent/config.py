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

from edgefleet.edge_agent.errors import ConfigError
from edgefleet.protos.limits import MAX_WINDOW_S
from edgefleet.protos.messages import check_device_id, check_name

try:  # Python 3.11+; the agent also runs on 3.10 images where tomli is the same parser
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class ApiConfig:
    http_host: str = "127.0.0.1"  # localhost only: the local API has no authentication
    http_port: int = 0  # 0: ephemeral, written to {data_dir}/api.json
    unix_socket: str = ""  # empty: no unix socket
    max_body_mb: float = 16.0  # an OIP JSON body for a 1 MP float image is about 12 MB
    # 10 s: how long a request has to arrive whole (line, headers, body) once the server waits for it; past it a body
    # is answered 408 and anything else closed (an idle keep-alive connection too). 16 MB over localhost or the
    # unix socket takes milliseconds; without a bound, a client that sends less than its Content-Length holds a
    # server thread forever.
    read_timeout_s: float = 10.0


@dataclass(frozen=True)
class TelemetryConfig:
    window_s: float = 60.0
    outbox_max_mb: float = 16.0


@dataclass(frozen=True)
class RetryConfig:
    retry_initial_s: float = 1.0  # network: first back-off, doubled with jitter up to retry_max_s
    retry_max_s: float = 300.0
    # A failed install (bad bundle, failed smoke test) costs a download: retry it slowly, or at once when a newer
    # desired generation arrives.
    failed_retry_initial_s: float = 60.0
    failed_retry_max_s: float = 3600.0


@dataclass(frozen=True)
class LimitsConfig:
    bundle_max_mb: float = 512.0
    unpacked_max_mb: float = 2048.0
    unpacked_max_files: int = 64  # a bundle holds four files today


@dataclass(frozen=True)
class RuntimeConfig:
    intra_op_threads: int = 0  # 0: the runtime's default (one per core)
    inter_op_threads: int = 0


ENERGY_METERS = ("auto", "rapl", "ina3221", "pi5-pmic", "nvml", "modelled", "none")
RAPL_DOMAINS = ("package", "package+dram", "psys")
# 10 Hz: the floor for a sampled meter (an inference burst of 100 ms is still seen); 1 kHz: past what an
# INA3221's own conversion (about 1 ms per channel at its fastest) can give.
MIN_SAMPLE_HZ, MAX_SAMPLE_HZ = 10.0, 1000.0


@dataclass(frozen=True)
class EnergyConfig:
    # None: take the figures from the device class the cloud returns at enrollment. idle_watts set here is
    # subtracted from any meter's energy (the net figure); the class's only from a whole-board meter's.
    active_watts: float | None = None
    idle_watts: float | None = None
    # Which meter (docs/energy.md): "auto" takes the first that reads of ina3221, pi5-pmic, rapl, nvml, then the
    # modelled estimate; a named one that cannot read falls back to "modelled" with the reason logged.
    meter: str = "auto"
    sample_hz: float = 10.0  # power sensors (ina3221, pi5-pmic): samples per second of the one sampler thread
    rapl_domain: str = "package+dram"  # "package" | "package+dram" | "psys"
    ina3221_rail: str = "auto"  # "auto" (the input rail, VDD_IN or POM_5V_IN), "sum", or one rail's name
    sysfs_root: str = "/sys"  # where sysfs is mounted: "/host/sys" in a container that mounts the host's


def _check_energy(source: str, energy: dict[str, Any]) -> None:
    """The [energy] section's values beyond their types; one ConfigError line naming the key and the fix."""
    meter = energy.get("meter", EnergyConfig.meter)
    if meter not in ENERGY_METERS:
        close = difflib.get_close_matches(meter, ENERGY_METERS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: 'energy.meter' is {meter!r}{hint}; use one of {', '.join(ENERGY_METERS)}")
    hz = energy.get("sample_hz", EnergyConfig.sample_hz)
    if not MIN_SAMPLE_HZ <= hz <= MAX_SAMPLE_HZ:
        raise ConfigError(f"{source}: 'energy.sample_hz' must be between {MIN_SAMPLE_HZ:g} and {MAX_SAMPLE_HZ:g} "
                          f"samples per second, got {hz!r}")
    domain = energy.get("rapl_domain", EnergyConfig.rapl_domain)
    if domain not in RAPL_DOMAINS:
        raise ConfigError(f"{source}: 'energy.rapl_domain' is {domain!r}; use one of {', '.join(RAPL_DOMAINS)}")
    if not energy.get("ina3221_rail", EnergyConfig.ina3221_rail).strip():
        raise ConfigError(f"{source}: 'energy.ina3221_rail' is empty; use \"auto\", \"sum\" or a rail name such "
                          "as \"VDD_IN\"")
    if "active_watts" in energy and energy["active_watts"] <= 0:
        raise ConfigError(f"{source}: 'energy.active_watts' must be > 0 (watts while inferring), "
                          f"got {energy['active_watts']!r}; leave it out to use the device class's")
    root = energy.get("sysfs_root", EnergyConfig.sysfs_root)
    if not root.startswith("/"):
        raise ConfigError(f"{source}: 'energy.sysfs_root' must be an absolute path such as \"/sys\", got {root!r}")


@dataclass(frozen=True)
class MqttConfig:
    # None: use the broker the cloud names at enrollment.
    host: str | None = None
    port: int | None = None


TRANSPORTS = ("mqtt", "grpc")


@dataclass(frozen=True)
class GrpcConfig:
    """The gRPC agent channel (edge_agent/link_grpc.py), used with transport = "grpc"."""

    # host:port of the cloud's agent channel (edgefleet-cloud serve --agent-channel-port); "": the one the cloud
    # names (GET /api/v1/agent-channel, asked before each stream until it answers).
    target: str = ""
    tls: bool = False
    ca_file: str = ""  # PEM roots that sign the cloud's certificate; empty: the system's (implies tls when set)
    # 30 s ping, 10 s to answer: a stream stalled without closing is given up within 40 s and reconnected. The
    # cloud lets agents ping every agent_channel_min_ping_s (10 s) at most.
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0


def _check_grpc(source: str, transport: str, grpc: dict[str, Any]) -> None:
    """The transport and the [grpc] section beyond their types; one ConfigError line naming the key and the fix."""
    if transport not in TRANSPORTS:
        close = difflib.get_close_matches(transport, TRANSPORTS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: 'transport' is {transport!r}{hint}; use \"mqtt\" or \"grpc\"")
    target = grpc.get("target", "")
    if target:
        host, _, port = target.rpartition(":")
        if "://" in target or "/" in target:
            raise ConfigError(f"{source}: 'grpc.target' must be host:port, not a URL, got {target!r}; e.g. "
                              "\"cloud.local:8082\" (grpc.tls = true for TLS)")
        if not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{source}: 'grpc.target' must be host:port with a port from 1 to 65535, got "
                              f"{target!r}")
    for key in ("keepalive_s", "keepalive_timeout_s"):
        if key in grpc and grpc[key] <= 0:
            raise ConfigError(f"{source}: 'grpc.{key}' must be > 0, got {grpc[key]!r}; leave it out for the default")
    if grpc.get("ca_file") and grpc.get("tls") is False:
        raise ConfigError(f"{source}: 'grpc.ca_file' is set but 'grpc.tls' is false; set tls = true (a CA is for "
                          "checking the cloud's TLS certificate) or drop ca_file")


@dataclass(frozen=True)
class LinkConfig:
    # How long a report or telemetry batch waits for the link's acknowledgement (MQTT: PUBACK) before it goes over
    # HTTP instead. 5 s, as before this was a field: a healthy broker's PUBACK takes well under a second.
    ack_timeout_s: float = 5.0
    # While the link is down, fetch the desired state over HTTP this often. None: every retry.retry_max_s.
    desired_poll_s: float | None = None


@dataclass(frozen=True)
class ReconcileConfig:
    # The loop waits at most this long for news before it closes telemetry windows and replans (or every
    # telemetry.window_s, when that is shorter).
    tick_s: float = 1.0
    # Plan-and-apply rounds per wake-up; a fresh install takes three. Running out is reported as last_error.
    max_rounds: int = 20


CASCADE_METRICS = ("max_prob", "margin", "entropy")


@dataclass(frozen=True)
class OffloadConfig:
    """The offload router (edge_agent/offload.py, docs/offload.md). Off by default: an agent routes only once told
    where to."""

    enabled: bool = False
    url: str = ""  # the OIP server (the cloud's /v2, Triton, KServe, MLServer); empty: cloud_url
    token: str = ""  # bearer token; empty: the device token from enrollment
    binary: bool = True  # the binary tensor extension; false: plain JSON bodies
    connect_timeout_ms: float = 500.0
    # 2 s per read: a cloud answer slower than this is a dead cloud to a device app; the breaker counts it.
    timeout_ms: float = 2000.0
    # Budgets: None takes the manifest's (the device class's defaults, overridable per deployment).
    p95_ms: float | None = None
    mj_per_inference: float | None = None
    energy_j_per_min: float | None = None  # local inference energy per trailing minute; None: no limit
    cascade_metric: str = ""  # "" (no cascade) | "max_prob" | "margin" | "entropy"
    cascade_threshold: float | None = None  # escalate below this confidence, in [0, 1]
    cascade_output: str = ""  # the class-scores output; empty: the first float [rows, classes] output
    hysteresis: float = 0.2  # back to local only below budget x (1 - hysteresis)
    min_dwell_s: float = 5.0  # and no sooner than this after switching to the cloud
    local_probe_s: float = 1.0  # while offloaded, one local run this often
    cloud_recheck_s: float = 5.0  # kept local as the cloud's estimate is slower: one cloud call this often renews it
    local_parallel: int = 1  # local runs served at once at full speed (1: ONNX Runtime's run uses every core)
    latency_window: int = 64  # samples in the sliding p95
    latency_window_s: float = 10.0  # and none older than this
    breaker_failures: int = 3  # consecutive cloud failures that open the breaker
    breaker_open_s: float = 5.0  # first open period; doubles per failed probe
    breaker_max_open_s: float = 60.0
    slowdown_factor: float = 1.0  # >1: emulate a slower device class (edge_agent/emulate.py)
    emulate_class: bool = False  # true: each model slowed by its bundle's emulation_factor (the class's cost model)


def _check_offload(source: str, offload: dict[str, Any]) -> None:
    """The [offload] section's values beyond their types; one ConfigError line naming the key and the fix."""
    url = offload.get("url", "")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: 'offload.url' must start with http:// or https://, got {url!r}; leave it out "
                          "to use cloud_url")
    for key in ("connect_timeout_ms", "timeout_ms", "p95_ms", "mj_per_inference", "energy_j_per_min",
                "latency_window", "latency_window_s", "local_parallel", "breaker_failures", "breaker_open_s",
                "breaker_max_open_s", "cloud_recheck_s"):
        if key in offload and offload[key] <= 0:
            raise ConfigError(f"{source}: 'offload.{key}' must be > 0, got {offload[key]!r}; leave it out for the "
                              "default")
    if not 0 <= offload.get("hysteresis", OffloadConfig.hysteresis) < 1:
        raise ConfigError(f"{source}: 'offload.hysteresis' must be in [0, 1) (a fraction of the budget, 0.2 is "
                          f"20 %), got {offload['hysteresis']!r}")
    open_s = offload.get("breaker_open_s", OffloadConfig.breaker_open_s)
    if offload.get("breaker_max_open_s", OffloadConfig.breaker_max_open_s) < open_s:
        raise ConfigError(f"{source}: 'offload.breaker_max_open_s' must not be below 'offload.breaker_open_s' "
                          f"({open_s:g})")
    if offload.get("slowdown_factor", 1.0) < 1:
        raise ConfigError(f"{source}: 'offload.slowdown_factor' must be >= 1 (1: no emulation, 8: about an rpi4 "
                          f"on this class of x86), got {offload['slowdown_factor']!r}")
    if offload.get("emulate_class") and offload.get("slowdown_factor", 1.0) != 1:
        raise ConfigError(f"{source}: 'offload.emulate_class' and 'offload.slowdown_factor' both set the emulated "
                          "speed; keep one (emulate_class takes each model's factor from the class's cost model)")
    metric = offload.get("cascade_metric", "")
    threshold = offload.get("cascade_threshold")
    if metric and metric not in CASCADE_METRICS:
        close = difflib.get_close_matches(metric, CASCADE_METRICS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: 'offload.cascade_metric' is {metric!r}{hint}; use one of "
                          f"{', '.join(CASCADE_METRICS)}, or leave it out for no cascade")
    if metric and threshold is None:
        raise ConfigError(f"{source}: 'offload.cascade_metric' is set but 'offload.cascade_threshold' is not; "
                          "give the confidence below which a request goes to the cloud, e.g. 0.8")
    if threshold is not None and not metric:
        raise ConfigError(f"{source}: 'offload.cascade_threshold' is set but 'offload.cascade_metric' is not; "
                          f"name one of {', '.join(CASCADE_METRICS)}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"{source}: 'offload.cascade_threshold' must be in [0, 1] (every metric is a confidence "
                          f"from 0 to 1), got {threshold!r}")


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
