"""cloud/main.py: `edgefleet-cloud serve` as a real process: it migrates, prints the admin token once (first start
only), serves, runs an embedded broker when asked, and exits cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from edgefleet.cloud.main import app
from tests.cloud_server import MqttProbe, mqtt_connack
from tests.harness import free_port, port_open, wait_for

CLI = [sys.executable, "-m", "edgefleet.cloud.main"]


def _serve(data_dir: Path, port: int, mqtt_port: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_EMBEDDED_BROKER": "always", "EDGEFLEET_MQTT_PORT": str(mqtt_port),
            "EDGEFLEET_REFRESH_INTERVAL_S": "0.5"}
    return subprocess.Popen([*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json() == {"ok": True}
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=5)
        raise AssertionError(f"edgefleet-cloud did not exit on {sig!r}; stderr:\n{err}") from None
    return proc.returncode, err


def test_help_lists_serve_and_its_options():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "serve" in out.stdout
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--host", "--port", "--data-dir", "--config"):
        assert option in out.stdout


def test_serve_prints_the_admin_token_once_and_stops_cleanly(tmp_path):
    data, port, mqtt_port = tmp_path / "data", free_port(), free_port()
    proc = _serve(data, port, mqtt_port)
    try:
        wait_for(lambda: _healthy(port) or proc.poll() is not None, 60, what="the cloud to serve")
        assert proc.poll() is None, proc.communicate()[1]
        assert port_open("127.0.0.1", mqtt_port), "the embedded broker is not listening"
        token = (data / "admin.token").read_text().strip()
        assert oct((data / "admin.token").stat().st_mode & 0o777) == "0o600"
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/stats", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        # The broker is a real one, and a secured one: the cloud's login (0600 file) gets in, no anonymous client.
        assert oct((data / "mqtt-cloud.password").stat().st_mode & 0o777) == "0o600"
        password = (data / "mqtt-cloud.password").read_text().strip()
        probe = MqttProbe("127.0.0.1", mqtt_port, client_id="edgefleet-cloud-probe", username="edgefleet-cloud",
                          password=password)
        probe.publish("edgefleet/devices/x/desired", b"", retain=True)
        probe.stop()
        assert mqtt_connack("127.0.0.1", mqtt_port, client_id="anonymous").is_failure
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert token in err and str(data / "admin.token") in err
    assert f"fleet login --url http://127.0.0.1:{port} --token {token}" in err  # works as printed (test_cli.py)
    assert not port_open("127.0.0.1", mqtt_port), "the embedded broker outlived the cloud"

    # Second start on the same data dir: no new token, and the old one still works.
    proc = _serve(data, port, mqtt_port)
    try:
        wait_for(lambda: _healthy(port) or proc.poll() is not None, 60, what="the cloud to serve again")
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    finally:
        code, err = _stop(proc, signal.SIGINT)
    assert code == 0, err
    assert token not in err and "admin token" not in err


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('max_modle_mb = 5\n')
    proc = _serve(tmp_path / "data", free_port(), free_port(), "--config", str(cfg))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "max_modle_mb" in err and "Traceback" not in err


def test_typer_app_is_the_console_script():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "edgefleet-cloud"]
    assert ep.value == "edgefleet.cloud.main:main"
    assert app.info.help


def test_console_script_runs():
    exe = Path(sys.executable).with_name("edgefleet-cloud")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout


def test_stopping_the_runtime_closes_its_database_connections(tmp_path, pg_url):
    """CloudRuntime.stop() ends with Fleet.close(): PostgreSQL sees none of the cloud's connections left."""
    import psycopg

    from edgefleet.cloud.main import CloudRuntime
    from edgefleet.cloud.settings import Settings
    from tests.harness import PG_ADMIN_URL

    database = pg_url.rsplit("/", 1)[1]

    def connections() -> int:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
            return int(row[0])

    runtime = CloudRuntime(Settings(data_dir=tmp_path / "data", database_url=pg_url), mqtt=False).start()
    assert runtime.fleet is not None and runtime.fleet.stats() is not None  # used: the pool holds a connection
    assert connections() >= 1
    runtime.stop()
    wait_for(lambda: connections() == 0, 10, what="the cloud's PostgreSQL connections to close")
