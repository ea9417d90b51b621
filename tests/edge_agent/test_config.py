"""edge_agent/config.py: a good file loads; every bad one is ONE line naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgefleet.edge_agent.config import AgentConfig, load_config
from edgefleet.edge_agent.errors import ConfigError

GOOD = """
device_id = "pi-kitchen-1"
device_class = "rpi4"
cloud_url = "http://cloud.local:8000"
enrollment_token = "tok"
data_dir = "data"

[labels]
site = "kitchen"

[api]
http_port = 8181
unix_socket = "/run/edgefleet/api.sock"

[telemetry]
window_s = 30
outbox_max_mb = 4.5

[retry]
retry_initial_s = 0.5
retry_max_s = 60

[limits]
bundle_max_mb = 100

[mqtt]
host = "broker.local"
port = 1883

[link]
ack_timeout_s = 2
desired_poll_s = 45

[reconcile]
tick_s = 0.5
max_rounds = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_units_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, AgentConfig)
    assert cfg.device_id == "pi-kitchen-1" and cfg.device_class == "rpi4"
    assert cfg.data_dir == tmp_path.resolve() / "data"  # relative to the config file
    assert cfg.labels == {"site": "kitchen"}
    assert cfg.api.http_port == 8181 and cfg.api.http_host == "127.0.0.1"
    assert cfg.telemetry.window_s == 30.0 and isinstance(cfg.telemetry.window_s, float)
    assert cfg.telemetry.outbox_max_mb == 4.5
    assert cfg.retry.retry_initial_s == 0.5 and cfg.limits.unpacked_max_mb == 2048.0
    assert cfg.mqtt.host == "broker.local" and cfg.mqtt.port == 1883
    assert cfg.link.ack_timeout_s == 2.0 and cfg.link.desired_poll_s == 45.0 and cfg.desired_poll_s == 45.0
    assert cfg.reconcile.tick_s == 0.5 and cfg.reconcile.max_rounds == 30
    assert cfg.state_path == cfg.data_dir / "state.json" and cfg.api_json_path == cfg.data_dir / "api.json"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device_id = "x"  # type: ignore[misc]


def test_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, 'device_id="d1"\ndevice_class="rpi4"\ncloud_url="https://c"\ndata_dir="/var/x"\n'))
    assert cfg.data_dir == Path("/var/x") and cfg.mqtt.host is None and cfg.api.unix_socket == ""
    # The daemon's timings as they were before they became fields: the HTTP poll follows retry.retry_max_s.
    assert cfg.link.ack_timeout_s == 5.0 and cfg.link.desired_poll_s is None and cfg.desired_poll_s == 300.0
    assert cfg.reconcile.tick_s == 1.0 and cfg.reconcile.max_rounds == 20


def test_api_read_timeout_has_a_default_and_can_be_set(tmp_path):
    assert load_config(write(tmp_path, GOOD)).api.read_timeout_s == 10.0
    cfg = load_config(write(tmp_path, GOOD.replace("http_port = 8181", "http_port = 8181\nread_timeout_s = 2")))
    assert cfg.api.read_timeout_s == 2.0 and isinstance(cfg.api.read_timeout_s, float)


BAD = [
    ("telemtry", GOOD.replace("[telemetry]", "[telemtry]"),
     "unknown key 'telemtry.window_s' (did you mean 'telemetry.window_s'?)"),
    ("typo key", GOOD.replace("window_s = 30", "windows_s = 30"),
     "unknown key 'telemetry.windows_s' (did you mean 'telemetry.window_s'?)"),
    ("top typo", GOOD.replace("cloud_url", "clod_url"), "unknown key 'clod_url' (did you mean 'cloud_url'?)"),
    ("port str", GOOD.replace("http_port = 8181", 'http_port = "abc"'),
     "'api.http_port' must be an integer, got 'abc'"),
    ("port bool", GOOD.replace("http_port = 8181", "http_port = true"), "'api.http_port' must be an integer, got True"),
    ("port range", GOOD.replace("http_port = 8181", "http_port = 70000"),
     "'api.http_port' must be between 0 and 65535"),
    ("window neg", GOOD.replace("window_s = 30", "window_s = -1"), "'telemetry.window_s' must be a finite number >= 0"),
    # The cloud refuses a window longer than the contract's MAX_WINDOW_S: the agent must never build one.
    ("window long", GOOD.replace("window_s = 30", "window_s = 172800"),
     "'telemetry.window_s' must be > 0 and at most 86400 (one day), got 172800.0"),
    ("window zero", GOOD.replace("window_s = 30", "window_s = 0"), "'telemetry.window_s' must be > 0"),
    ("float str", GOOD.replace("outbox_max_mb = 4.5", 'outbox_max_mb = "big"'),
     "'telemetry.outbox_max_mb' must be a number, got 'big'"),
    ("label type", GOOD.replace('site = "kitchen"', "site = 3"), "'labels.site' must be a string, got 3"),
    ("device id", GOOD.replace("pi-kitchen-1", "bad/id"), "'device_id': invalid device id 'bad/id'"),
    ("missing", GOOD.replace('device_class = "rpi4"\n', ""), "missing required key 'device_class'"),
    ("retry order", GOOD.replace("retry_max_s = 60", "retry_max_s = 0.1"),
     "'retry.retry_initial_s' must not exceed 'retry.retry_max_s'"),
    ("url", GOOD.replace("http://cloud.local:8000", "cloud.local"), "'cloud_url' must start with http://"),
    ("ack zero", GOOD.replace("ack_timeout_s = 2", "ack_timeout_s = 0"), "'link.ack_timeout_s' must be > 0, got 0.0"),
    ("poll zero", GOOD.replace("desired_poll_s = 45", "desired_poll_s = 0"), "'link.desired_poll_s' must be > 0"),
    ("tick zero", GOOD.replace("tick_s = 0.5", "tick_s = 0"), "'reconcile.tick_s' must be > 0"),
    ("rounds zero", GOOD.replace("max_rounds = 30", "max_rounds = 0"), "'reconcile.max_rounds' must be > 0, got 0"),
    # A zero read timeout would time every local API request out at once.
    ("read timeout zero", GOOD.replace("http_port = 8181", "http_port = 8181\nread_timeout_s = 0"),
     "'api.read_timeout_s' must be > 0, got 0.0"),
    ("read timeout str", GOOD.replace("http_port = 8181", 'http_port = 8181\nread_timeout_s = "10s"'),
     "'api.read_timeout_s' must be a number, got '10s'"),
    ("read timeout typo", GOOD.replace("http_port = 8181", "http_port = 8181\nread_timeout = 5"),
     "unknown key 'api.read_timeout' (did you mean 'api.read_timeout_s'?)"),
    ("rounds float", GOOD.replace("max_rounds = 30", "max_rounds = 2.5"),
     "'reconcile.max_rounds' must be an integer, got 2.5"),
    ("link typo", GOOD.replace("ack_timeout_s = 2", "ack_timeout = 2"),
     "unknown key 'link.ack_timeout' (did you mean 'link.ack_timeout_s'?)"),
]


@pytest.mark.parametrize("case,text,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(tmp_path, case, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, 'device_id = "d1"\ndevice_class = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid TOML" in str(info.value) and "line 2" in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_section_must_be_a_table(tmp_path):
    text = 'device_id="d1"\ndevice_class="rpi4"\ncloud_url="https://c"\ndata_dir="/x"\napi = 3\n'
    with pytest.raises(ConfigError, match="'api' must be a table"):
        load_config(write(tmp_path, text))


def test_the_packaged_example_loads_with_every_commented_key_set(tmp_path):
    """packaging/agent.example.toml says every key the agent knows is in it: it loads as shipped, and with each
    commented-out `key = value` line switched on."""
    import re

    example = Path(__file__).resolve().parents[2] / "packaging" / "agent.example.toml"
    text = example.read_text()
    shipped = tmp_path / "shipped.toml"
    shipped.write_text(text)
    load_config(shipped)
    switched_on = tmp_path / "all.toml"
    switched_on.write_text(re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M))
    config = load_config(switched_on)
    assert (config.energy.meter, config.energy.sample_hz, config.energy.idle_watts) == ("auto", 10.0, 2.7)
