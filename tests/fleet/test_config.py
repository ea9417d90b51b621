"""fleet/config.py: layering (file < env < option), XDG paths, 0600 atomic writes, and one-line errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgefleet.fleet import config as cfg
from edgefleet.fleet.errors import ConfigError


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), **extra}


def test_path_honours_xdg_and_ignores_relative_xdg(tmp_path):
    assert cfg.config_path(_env(tmp_path)) == tmp_path / "home" / ".config" / "edgefleet" / "cli.toml"
    assert cfg.config_path(_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "x"))) == tmp_path / "x/edgefleet/cli.toml"
    # XDG Base Directory spec: a relative path is invalid and ignored.
    assert cfg.config_path(_env(tmp_path, XDG_CONFIG_HOME="rel")) == tmp_path / "home/.config/edgefleet/cli.toml"


def test_save_writes_0600_in_0700_dir_and_round_trips(tmp_path):
    path = tmp_path / "conf" / "edgefleet" / "cli.toml"
    cfg.save("http://cloud.local:8080/", 'tok"with\\quotes', path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    got = cfg.resolve(env={}, path=path)
    assert (got.url, got.token, got.url_source, got.token_source) == (
        "http://cloud.local:8080", 'tok"with\\quotes', "file", "file")
    assert [p.name for p in path.parent.iterdir()] == ["cli.toml"]  # no temp file left behind


def test_save_tightens_an_existing_world_readable_file_and_keeps_timeout(tmp_path):
    path = tmp_path / "cli.toml"
    path.write_text('url = "http://old:1"\ntoken = "old"\ntimeout_s = 5\n')
    os.chmod(path, 0o644)
    cfg.save("https://new.example", "new", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    got = cfg.resolve(env={}, path=path)
    assert (got.url, got.token, got.timeout_s) == ("https://new.example", "new", 5.0)


def test_save_repairs_a_broken_file(tmp_path):
    path = tmp_path / "cli.toml"
    path.write_text("this is [not toml")
    cfg.save("http://a:1", "t", path)
    assert cfg.resolve(env={}, path=path).token == "t"


@pytest.mark.parametrize("token", ["", "has space", "new\nline"])
def test_save_refuses_bad_tokens(tmp_path, token):
    with pytest.raises(ConfigError, match="--token"):
        cfg.save("http://a:1", token, tmp_path / "cli.toml")


def test_layers_env_over_file_option_over_env(tmp_path):
    path = tmp_path / "cli.toml"
    cfg.save("http://file:1", "file-token", path)
    env = {cfg.ENV_URL: "http://env:2", cfg.ENV_TOKEN: "env-token"}
    got = cfg.resolve(env=env, path=path)
    assert (got.url, got.token, got.url_source, got.token_source) == ("http://env:2", "env-token", "env", "env")
    got = cfg.resolve(url="http://opt:3", token="opt-token", env=env, path=path)
    assert (got.url, got.token, got.url_source, got.token_source) == ("http://opt:3", "opt-token", "option", "option")
    # Field by field: an env URL does not drop the file's token.
    got = cfg.resolve(env={cfg.ENV_URL: "http://env:2"}, path=path)
    assert (got.url, got.token) == ("http://env:2", "file-token")


def test_missing_file_and_no_url_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="fleet login") as exc:
        cfg.resolve(env={}, path=tmp_path / "absent.toml")
    assert "\n" not in str(exc.value)
    got = cfg.resolve(env={cfg.ENV_URL: "http://x:1"}, path=tmp_path / "absent.toml")
    assert got.token is None and got.token_source == "none"


@pytest.mark.parametrize(
    "body, match",
    [
        ("url = ", "not valid TOML"),
        ('url = "http://a:1"\ntokn = "x"\n', "unknown key 'tokn'"),
        ("url = 42\n", "key 'url' must be a string"),
        ('url = "http://a:1"\ntimeout_s = "slow"\n', "key 'timeout_s' must be a number"),
        ('url = "http://a:1"\ntimeout_s = true\n', "key 'timeout_s' must be a number"),
        ('url = "http://a:1"\ntimeout_s = -1\n', "must be positive"),
        ('url = "ftp://a"\n', "must look like http"),
        ('url = "cloud.local:8080"\n', "must look like http"),
        (b"\xff\xfe", "not valid TOML"),
    ],
)
def test_bad_file_is_one_line_naming_file_and_key(tmp_path, body, match):
    path = tmp_path / "cli.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(ConfigError, match=match) as exc:
        cfg.resolve(env={}, path=path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_file(tmp_path):
    path = tmp_path / "cli.toml"
    path.mkdir()  # a directory where the file should be: read fails even as root
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.resolve(env={}, path=path)


def test_bad_env_values(tmp_path):
    with pytest.raises(ConfigError, match="EDGEFLEET_URL"):
        cfg.resolve(env={cfg.ENV_URL: "localhost:8080"}, path=tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="EDGEFLEET_TIMEOUT_S"):
        cfg.resolve(env={cfg.ENV_URL: "http://a:1", cfg.ENV_TIMEOUT: "soon"}, path=tmp_path / "absent.toml")
    got = cfg.resolve(env={cfg.ENV_URL: "http://a:1", cfg.ENV_TIMEOUT: "2.5"}, path=tmp_path / "absent.toml")
    assert got.timeout_s == 2.5
