"""Where the CLI finds the cloud: a URL and an admin token, kept once and overridable per shell or per command.

Theory: three layers, each overriding the one before it, resolved field by field:

    ~/.config/edgefleet/cli.toml  <  EDGEFLEET_URL / EDGEFLEET_TOKEN  <  fleet --url / --token

The file lives under `$XDG_CONFIG_HOME` when that is set (XDG Base Directory spec), is written by `fleet login`
atomically (temp file, fsync, rename) with mode 0600 in a 0700 folder, since it holds a bearer token. A malformed
file, an unknown key or a wrong type is a `ConfigError` naming the file and the key, never a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from edgefleet.common.fsutil import atomic_write_text
from edgefleet.fleet.errors import ConfigError

ENV_URL = "EDGEFLEET_URL"
ENV_TOKEN = "EDGEFLEET_TOKEN"
ENV_TIMEOUT = "EDGEFLEET_TIMEOUT_S"
# 60 s: a model push validates the ONNX file and runs it once in the cloud before answering; listings take ms.
DEFAULT_TIMEOUT_S = 60.0
_KEYS = {"url": str, "token": str, "timeout_s": (int, float)}
LOGIN_HINT = "run `fleet login --url URL --token TOKEN`"


@dataclass(frozen=True)
class CliConfig:
    url: str
    token: str | None
    timeout_s: float = DEFAULT_TIMEOUT_S
    url_source: str = "default"  # "option", "env", "file": shown by error messages that blame the config
    token_source: str = "none"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    # The XDG spec says a relative $XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if base and Path(base).is_absolute() else Path(env.get("HOME") or Path.home()) / ".config"
    return root / "edgefleet" / "cli.toml"


def check_url(url: str, where: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: cloud URL {url!r} must look like http://HOST:PORT or https://HOST")
    return url.rstrip("/")


def load_file(path: Path) -> dict[str, object]:
    """The settings in `path`, checked; {} when the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix it or {LOGIN_HINT} to rewrite it") from None
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if not isinstance(value, _KEYS[key]) or isinstance(value, bool):
            raise ConfigError(f"{path}: key {key!r} must be a {'number' if key == 'timeout_s' else 'string'}")
    if "url" in data:
        data["url"] = check_url(str(data["url"]), str(path))
    if "timeout_s" in data and float(data["timeout_s"]) <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"{path}: key 'timeout_s' must be positive")
    return data


def resolve(
    *,
    url: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> CliConfig:
    """Merge file, environment and options (in rising priority). Raises ConfigError when no URL is known."""
    env = os.environ if env is None else env
    path = path or config_path(env)
    data = load_file(path)
    chosen_url, url_source = data.get("url"), "file"
    chosen_token, token_source = data.get("token"), "file" if data.get("token") else "none"
    if env.get(ENV_URL):
        chosen_url, url_source = check_url(env[ENV_URL], ENV_URL), "env"
    if env.get(ENV_TOKEN):
        chosen_token, token_source = env[ENV_TOKEN], "env"
    if url:
        chosen_url, url_source = check_url(url, "--url"), "option"
    if token:
        chosen_token, token_source = token, "option"
    if not chosen_url:
        raise ConfigError(f"no cloud URL configured: {LOGIN_HINT}, set {ENV_URL}, or pass --url")
    timeout_s = float(data.get("timeout_s", DEFAULT_TIMEOUT_S))  # type: ignore[arg-type]
    if env.get(ENV_TIMEOUT):
        try:
            timeout_s = float(env[ENV_TIMEOUT])
        except ValueError:
            raise ConfigError(f"{ENV_TIMEOUT}={env[ENV_TIMEOUT]!r} is not a number of seconds") from None
    return CliConfig(
        url=str(chosen_url),
        token=str(chosen_token) if chosen_token else None,
        timeout_s=timeout_s,
        url_source=url_source,
        token_source=token_source,
    )


def save(url: str, token: str, path: Path | None = None) -> Path:
    """Write url and token to the CLI config, 0600, atomically; keeps an existing `timeout_s`."""
    path = path or config_path()
    url = check_url(url, "--url")
    if not token or any(c.isspace() for c in token):
        raise ConfigError("--token must be a non-empty token without spaces")
    keep = {}
    try:
        keep = {k: v for k, v in load_file(path).items() if k == "timeout_s"}
    except ConfigError:
        pass  # `fleet login` is how a person repairs a broken file
    lines = [f"url = {json.dumps(url)}", f"token = {json.dumps(token)}"]  # JSON strings are valid TOML strings
    lines += [f"timeout_s = {v}" for v in keep.values()]
    body = ("# edgefleet CLI: written by `fleet login`; holds a bearer token, keep it 0600\n" + "\n".join(lines) + "\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(path, body, 0o600)  # 0600 from its first byte: it holds a bearer token
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


__all__ = ["CliConfig", "ConfigError", "DEFAULT_TIMEOUT_S", "ENV_TOKEN", "ENV_URL", "config_path", "resolve", "save"]
