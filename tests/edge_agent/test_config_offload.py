"""edge_agent/config.py, the [offload] section: a good one loads with its units; garbage is ONE clear line."""

from __future__ import annotations

import pytest

from edgefleet.edge_agent.config import OffloadConfig, load_config
from edgefleet.edge_agent.errors import ConfigError

TOP = """
device_id = "pi-1"
device_class = "rpi4"
cloud_url = "http://cloud.local:8000"
data_dir = "data"
"""


def load(tmp_path, section: str):
    path = tmp_path / "agent.toml"
    path.write_text(TOP + "[offload]\n" + section)
    return load_config(path)


def test_defaults_are_off_and_a_full_section_loads(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(TOP)
    assert load_config(path).offload == OffloadConfig()
    assert OffloadConfig().enabled is False and OffloadConfig().slowdown_factor == 1.0
    cfg = load(tmp_path, """
enabled = true
url = "https://triton.local:8000/prefix"
token = "tok"
binary = false
timeout_ms = 250
connect_timeout_ms = 100
p95_ms = 30
mj_per_inference = 2.5
energy_j_per_min = 60
cascade_metric = "entropy"
cascade_threshold = 0.6
cascade_output = "probabilities"
hysteresis = 0.25
min_dwell_s = 3
local_probe_s = 0.5
local_parallel = 2
latency_window = 32
latency_window_s = 5
breaker_failures = 4
breaker_open_s = 2
breaker_max_open_s = 30
slowdown_factor = 8
""").offload
    assert cfg == OffloadConfig(enabled=True, url="https://triton.local:8000/prefix", token="tok", binary=False,
                                timeout_ms=250.0, connect_timeout_ms=100.0, p95_ms=30.0, mj_per_inference=2.5,
                                energy_j_per_min=60.0, cascade_metric="entropy", cascade_threshold=0.6,
                                cascade_output="probabilities", hysteresis=0.25, min_dwell_s=3.0, local_probe_s=0.5,
                                local_parallel=2,
                                latency_window=32, latency_window_s=5.0, breaker_failures=4, breaker_open_s=2.0,
                                breaker_max_open_s=30.0, slowdown_factor=8.0)


@pytest.mark.parametrize(("section", "message"), [
    ('enabled = "yes"', "'offload.enabled' must be true or false, got 'yes'"),
    ("enabled = 1", "'offload.enabled' must be true or false, got 1"),
    ("binary = 0", "'offload.binary' must be true or false"),
    ("timeout_ms = true", "'offload.timeout_ms' must be a number, got True"),
    ("timeout_ms = 0", "'offload.timeout_ms' must be > 0, got 0.0"),
    ("timeout_ms = -5", "'offload.timeout_ms' must be a finite number >= 0"),
    ("timeout_ms = nan", "'offload.timeout_ms' must be a finite number >= 0"),
    ("p95_ms = 0", "'offload.p95_ms' must be > 0"),
    ('p95_ms = "fast"', "'offload.p95_ms' must be a number, got 'fast'"),
    ("energy_j_per_min = 0", "'offload.energy_j_per_min' must be > 0"),
    ("latency_window = 1.5", "'offload.latency_window' must be an integer, got 1.5"),
    ("breaker_failures = 0", "'offload.breaker_failures' must be > 0"),
    ("local_parallel = 0", "'offload.local_parallel' must be > 0"),
    ("breaker_open_s = 10\nbreaker_max_open_s = 5", "'offload.breaker_max_open_s' must not be below"),
    ('url = "cloud.local:8000"', "'offload.url' must start with http:// or https://"),
    ("hysteresis = 1", "'offload.hysteresis' must be in [0, 1)"),
    ("slowdown_factor = 0.5", "'offload.slowdown_factor' must be >= 1"),
    ("slowdown_factor = 8\nemulate_class = true", "'offload.emulate_class' and 'offload.slowdown_factor' both"),
    ('emulate_class = "yes"', "'offload.emulate_class' must be"),
    ('cascade_metric = "max-prob"\ncascade_threshold = 0.5', "is 'max-prob' (did you mean 'max_prob'?)"),
    ('cascade_metric = "margin"', "'offload.cascade_threshold' is not"),
    ("cascade_threshold = 0.5", "'offload.cascade_metric' is not"),
    ('cascade_metric = "margin"\ncascade_threshold = 1.5', "'offload.cascade_threshold' must be in [0, 1]"),
    ("p95ms = 20", "unknown key 'offload.p95ms' (did you mean 'offload.p95_ms'?)"),
    ("slowdown = 4", "unknown key 'offload.slowdown' (did you mean 'offload.slowdown_factor'?)"),
])
def test_garbage_is_one_clear_line(tmp_path, section, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, section + "\n")
    text = str(info.value)
    assert message in text and "agent.toml" in text and "\n" not in text


def test_offload_must_be_a_table(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('offload = "on"\n' + TOP)
    with pytest.raises(ConfigError, match=r"'offload' must be a table \(\[offload\]\)"):
        load_config(path)
