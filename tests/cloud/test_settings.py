"""cloud/settings.py: defaults, environment, TOML file, precedence, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cloud.errors import Invalid
from edgefleet.cloud.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("EDGEFLEET_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_live_under_the_data_dir(tmp_path: Path):
    s = Settings()
    assert s.data_dir == (tmp_path / ".edgefleet-data").resolve()
    assert s.database_url == f"sqlite:///{s.data_dir / 'edgefleet.db'}"
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.embedded_broker == "auto"
    assert s.blobs_dir == s.data_dir / "blobs" and s.admin_token_file == s.data_dir / "admin.token"
    assert s.max_model_bytes == int(s.max_model_mb * 1024 * 1024)


def test_relative_data_dir_is_made_absolute_once(tmp_path: Path):
    s = Settings(data_dir="state")
    assert s.data_dir == tmp_path.resolve() / "state"


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("EDGEFLEET_PORT", "9100")
    monkeypatch.setenv("EDGEFLEET_EMBEDDED_BROKER", "never")
    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "postgresql+psycopg://u@db/edgefleet")
    s = Settings()
    assert s.port == 9100 and s.embedded_broker == "never"
    assert s.database_url == "postgresql+psycopg://u@db/edgefleet"
    assert s.public_url == "http://127.0.0.1:9100"


def test_toml_file_then_env_then_arguments(monkeypatch, tmp_path: Path):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('port = 9000\nmax_model_mb = 5\npublic_url = "https://fleet.example.com/"\n'
                   'desired_state_ttl_s = 600\n')
    s = Settings(config_file=cfg)
    assert (s.port, s.max_model_mb, s.desired_state_ttl_s) == (9000, 5.0, 600)
    assert s.public_url == "https://fleet.example.com"  # trailing slash dropped: URLs are joined with '/...'
    monkeypatch.setenv("EDGEFLEET_PORT", "9100")
    assert Settings(config_file=cfg).port == 9100  # env beats the file
    assert Settings(config_file=cfg, port=9200).port == 9200  # arguments beat env
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(cfg))
    assert Settings().max_model_mb == 5.0  # the file named by EDGEFLEET_CONFIG


def test_unknown_key_in_file_is_named(tmp_path: Path):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text("max_modle_mb = 5\n")
    with pytest.raises(Invalid, match=r"cloud\.toml: unknown key 'max_modle_mb'"):
        Settings(config_file=cfg)


def test_wrong_type_names_the_key(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('desired_state_ttl_s = "a day"\n')
    with pytest.raises(Invalid, match="desired_state_ttl_s"):
        Settings(config_file=cfg)
    monkeypatch.setenv("EDGEFLEET_MQTT_PORT", "not-a-port")
    with pytest.raises(Invalid, match="mqtt_port"):
        Settings()


def test_bad_toml_and_missing_file(tmp_path: Path):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text("port = = 1\n")
    with pytest.raises(Invalid, match="not valid TOML"):
        Settings(config_file=cfg)
    with pytest.raises(Invalid, match="does not exist"):
        Settings(config_file=tmp_path / "nope.toml")


def test_limits_are_checked():
    with pytest.raises(Invalid, match="max_model_mb"):
        Settings(max_model_mb=0)
    with pytest.raises(Invalid, match="embedded_broker"):
        Settings(embedded_broker="sometimes")
    with pytest.raises(Invalid, match="wildcards"):
        Settings(mqtt_topic_prefix="fleet/#")
