"""cloud/keys_cli.py: `edgefleet-cloud keys ...` through typer's runner, on a real data dir.

The commands' effects are checked on the files (and by the agent-side tests for what agents make of them); here:
that each command does its step, prints one line a person can act on, and exits 2 on a refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cloud.main import app
from edgefleet.cloud.trust import TufRepository

runner = CliRunner()
OFFLINE = {"EDGEFLEET_TUF_OFFLINE_ROOT": "1"}


def keys(data: Path, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["keys", *args, "--data-dir", str(data)] if args[0] not in ("sign-root", "new-key")
                         else ["keys", *args], env=env)


def status(data: Path, env: dict[str, str] | None = None) -> dict:
    result = keys(data, "status", "--json", env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_help_names_every_command():
    result = runner.invoke(app, ["keys", "--help"])
    assert result.exit_code == 0
    for command in ("status", "rotate", "export-root", "sign-root", "import-root", "take-root-offline", "new-key"):
        assert command in result.output


def test_rotate_tuf_roles_and_the_desired_key(tmp_path: Path):
    data = tmp_path / "data"
    before = status(data)
    assert before["tuf"]["root_online"] is True and before["desired"]["version"] == 0
    result = keys(data, "rotate", "--role", "targets")
    assert result.exit_code == 0 and "root v2" in result.output
    assert status(data)["tuf"]["keyids"]["targets"] != before["tuf"]["keyids"]["targets"]

    result = keys(data, "rotate", "--role", "desired")
    assert result.exit_code == 0 and "--finish" in result.output
    mid = status(data)["desired"]
    assert mid["version"] == 1 and mid["rotating"] and len(mid["signing"]) == 2
    result = keys(data, "rotate", "--role", "desired", "--finish")
    assert result.exit_code == 0 and "revoked" in result.output
    done = status(data)["desired"]
    assert done["version"] == 2 and done["revoked"] == before["desired"]["keyids"] and not done["rotating"]
    assert TufRepository(data / "tuf").get_target("trust/desired-state-keys/2.json") is not None

    for refused in (["rotate", "--role", "desired", "--finish"], ["rotate", "--role", "targets", "--finish"]):
        result = keys(data, *refused)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_offline_root_export_sign_import(tmp_path: Path):
    data, usb = tmp_path / "data", tmp_path / "usb"
    usb.mkdir()
    status(data)  # first start: the repository and its four keys
    assert keys(data, "take-root-offline", "--out", str(usb / "root.pem")).exit_code == 0
    result = keys(data, "status", env={})  # the flag is not set yet, but the key is gone: it runs offline
    assert result.exit_code == 0 and "TUF root key: offline" in result.output

    result = keys(data, "rotate", "--role", "timestamp", env=OFFLINE)
    assert result.exit_code == 2 and "export-root" in result.output

    exported = tmp_path / "next-root.json"
    assert keys(data, "export-root", str(exported), "--rotate", "timestamp", env=OFFLINE).exit_code == 0
    result = keys(data, "import-root", str(exported), env=OFFLINE)
    assert result.exit_code == 2 and "not signed enough" in result.output

    result = keys(data, "sign-root", str(exported), "--key", str(usb / "root.pem"))  # the offline machine
    assert result.exit_code == 0 and "root v2" in result.output
    result = keys(data, "import-root", str(exported), env=OFFLINE)
    assert result.exit_code == 0 and "root v2 published" in result.output
    after = status(data, env=OFFLINE)["tuf"]
    assert after["versions"]["root"] == 2 and after["root_online"] is False

    # a root key rotation, offline: a new key made where it will be kept, both keys sign
    new_pub = usb / "root-2.pub.pem"
    assert keys(data, "new-key", str(usb / "root-2.pem"), "--public-out", str(new_pub)).exit_code == 0
    assert keys(data, "export-root", str(exported), "--root-key", str(new_pub), env=OFFLINE).exit_code == 0
    assert keys(data, "sign-root", str(exported), "--key", str(usb / "root.pem"), "--key",
                str(usb / "root-2.pem")).exit_code == 0
    assert keys(data, "import-root", str(exported), env=OFFLINE).exit_code == 0
    assert len(status(data, env=OFFLINE)["tuf"]["keyids"]["root"]) == 1


@pytest.mark.parametrize("args", [["new-key", "{tmp}/exists.pem"], ["sign-root", "{tmp}/missing.json", "--key", "k"],
                                  ["import-root", "{tmp}/missing.json"]])
def test_refusals_are_one_line_and_exit_2(tmp_path: Path, args: list[str]):
    (tmp_path / "exists.pem").write_text("x")
    result = keys(tmp_path / "data", *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
