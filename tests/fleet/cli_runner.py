"""`fleet` through typer's CliRunner with its own config folders, the cloud's URL and a token in the environment: each
call asserts its exit code and, for a failure, the one `error:` line on stderr the CLI promises."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgefleet.fleet.main import app


class Cli:
    def __init__(self, tmp_path: Path, url: str | None = None, token: str | None = None) -> None:
        """url and token None: none in the environment (the test logs in, or means the CLI to find none)."""
        self.runner = CliRunner()
        self.env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home"), "EDGEFLEET_URL": url,
                    "EDGEFLEET_TOKEN": token, "EDGEFLEET_TIMEOUT_S": None, "COLUMNS": "250"}

    def __call__(self, *args: str):
        return self.runner.invoke(app, list(args), env=self.env, catch_exceptions=False)

    def ok(self, *args: str):
        result = self(*args)
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return result

    def fails(self, *args: str, code: int = 2) -> str:
        result = self.last = self(*args)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]


class IsolatedCli:
    """`fleet` with its own config folder and no EDGEFLEET_* variables from the developer's shell (the test passes
    --url/--token, logs in, or means the CLI to find none); `env` per call overrides."""

    def __init__(self, tmp_path: Path) -> None:
        self.runner = CliRunner()
        self.env = {
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "HOME": str(tmp_path / "home"),
            "EDGEFLEET_URL": None,
            "EDGEFLEET_TOKEN": None,
            "EDGEFLEET_TIMEOUT_S": None,
            "COLUMNS": "200",
        }
        self.config_file = tmp_path / "xdg" / "edgefleet" / "cli.toml"

    def __call__(self, *args: str, **env: str):
        result = self.runner.invoke(app, list(args), env={**self.env, **env}, catch_exceptions=False)
        return result

    def ok(self, *args: str, **env: str):
        result = self(*args, **env)
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return result

    def fails(self, code: int, *args: str, **env: str) -> str:
        """Run, expect exit `code`, and return the single stderr line."""
        result = self(*args, **env)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        if code != 2 or lines[:1] and lines[0].startswith("error:"):  # usage errors are click's boxed help
            assert len(lines) == 1, result.stderr
        return result.stderr.strip()
