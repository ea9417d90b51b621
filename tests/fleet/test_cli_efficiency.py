"""`fleet efficiency MODEL`, and the efficiency figures of `fleet status` and `fleet stats`, through typer's CliRunner
against the real cloud (tests/cloud_server.py) holding a distillation report and telemetry (seeded as in
tests/cloud/test_efficiency_api.py)."""

from __future__ import annotations

import json

import pytest

from edgefleet.protos.messages import ModelStatus, ReportedState
from tests.cloud.test_efficiency_api import enroll, seed_distilled, send, window


def test_efficiency_table_and_json_side_by_side(cli, cloud):
    version = seed_distilled(cloud.fleet)
    enroll(cloud.fleet, "pi-1", "rpi4")
    send(cloud.fleet, "pi-1", window("kws", version, 900, 1.5, "measured", p95=3.0),
         window("kws", version, 100, 0.5, "measured", where="cloud"))

    view = json.loads(cli.ok("efficiency", "kws", "--json").stdout)
    [jetson, rpi4] = view["classes"]
    assert (jetson["device_class"], rpi4["device_class"]) == ("jetson-nano", "rpi4")
    assert rpi4["teacher"]["mj_per_inference"] == {"value": 40.0, "source": "estimated"}
    assert rpi4["edgefleet"]["mj_per_inference"]["source"] == "measured"
    assert rpi4["edgefleet"]["mj_per_inference"]["value"] == pytest.approx(1.4)
    assert rpi4["times_better"]["mj_per_inference"] == pytest.approx(40.0 / 1.4)

    table = cli.ok("efficiency", "kws").stdout
    for text in ("mJ/inference", "inferences/kWh", "cost/1M inferences", "accuracy", "p95 ms", "offloaded",
                 "40 est.", "1.4 meas.", "28.6x", "90M est.", "2.57G meas.", "97.0% meas.", "95.0% meas.",
                 "-2.0 pts", "10.0% meas.", "20x", "30x worse", "nothing ships", "1000 inferences, 1 device(s)",
                 "0.3 per kWh", "no candidate fits"):
        assert text in table, (text, table)

    assert json.loads(cli.ok("efficiency", "kws", "--window", "2h", "--json").stdout)["window_s"] == 7200


def test_efficiency_errors_say_what_to_do(cli, cloud):
    assert "fleet distill" in cli.fails("efficiency", "nope")
    bad = cli("efficiency", "nope", "--window", "soon")  # typer's usage error, before any request
    assert bad.exit_code == 2 and "Invalid value for --window" in bad.stderr
    assert "window_s" in cli.fails("efficiency", "nope", "--window", "10s")  # the cloud's least is 60 s


def test_status_shows_inferences_per_kwh_and_stats_the_fleets_totals(cli, cloud):
    version = seed_distilled(cloud.fleet)
    enroll(cloud.fleet, "pi-1", "rpi4")
    cli.ok("deploy", "kws", "--version", str(version), "--device", "pi-1")
    generation = json.loads(cli.ok("devices", "show", "pi-1", "--json").stdout)["desired_generation"]
    cloud.fleet.record_reported(ReportedState(
        device_id="pi-1", generation=generation, reported_at=window("kws", 1, 1, 1.0)["end"],
        models=[ModelStatus(name="kws", active_version=version, target_version=version, state="active")]))
    send(cloud.fleet, "pi-1", window("kws", version, 1000, 0.59, "measured"))

    [row] = json.loads(cli.ok("status", "--json").stdout)
    assert row["inferences_per_kwh"] == pytest.approx(3.6e9 / 0.59)
    assert row["cost_per_million"] == pytest.approx(0.59e6 / 3.6e9 * 0.30)
    table = cli.ok("status").stdout
    assert "inf/kWh" in table and "6.1G" in table and "0.590" in table

    stats = json.loads(cli.ok("stats", "--json").stdout)
    assert stats["efficiency"]["inferences"] == 1000 and stats["efficiency"]["energy_source"] == "measured"
    shown = cli.ok("stats").stdout
    for text in ("fleet efficiency, last 3600 s", "inferences", "1000", "energy kWh", "1.63889e-07", "measured",
                 "inferences/kWh", "6.1G", "total cost", "telemetry_windows"):
        assert text in shown, (text, shown)
