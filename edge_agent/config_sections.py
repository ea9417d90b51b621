"""The sections of the agent's configuration (edge_agent/config.py): one frozen dataclass per TOML table, with the
checks on values beyond their types (`_check_energy`, `_check_grpc`, `_check_offload`), each a one-line
ConfigError naming the file and the dotted key. config.py reads the file and re-exports every name here."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from edgefleet.edge_agent.errors import ConfigError


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
