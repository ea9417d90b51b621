"""`GET /metrics` (cloud/metrics.py) scraped over real HTTP and parsed with prometheus_client's own text parser, on
SQLite and PostgreSQL: per class and model version gauges from the telemetry in the database, the store's counters,
open by default and behind the admin token with `metrics_public = false`."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cloud.test_efficiency_api import enroll, send, window
from tests.cloud_server import cloud_server


def scrape(http) -> dict[str, dict[tuple, float]]:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def key(device_class: str, model: str, version: int) -> tuple:
    return tuple(sorted({"device_class": device_class, "model": model, "version": str(version)}.items()))


@pytest.fixture
def cloud(tmp_path, db_url):
    with cloud_server(tmp_path / "cloud", db_url=db_url, energy_price_per_kwh=0.25) as server:
        yield server


def test_scrape_reads_the_database_at_scrape_time(cloud):
    fleet = cloud.fleet
    enroll(fleet, "pi-1", "rpi4")
    enroll(fleet, "x86-1", "x86-cpu")
    with cloud.client(token="") as anon:  # open by default: Prometheus scrapes without a token
        before = scrape(anon)
        assert before.get("edgefleet_energy_mj_per_inference", {}) == {}
        send(fleet, "pi-1", window("kws", 3, 800, 1.8, "measured"), window("kws", 3, 200, 0.2, "estimated",
                                                                           where="cloud"))
        send(fleet, "x86-1", window("kws", 4, 500, 12.0))
        m = scrape(anon)
    mj = (800 * 1.8 + 200 * 0.2) / 1000
    assert m["edgefleet_energy_mj_per_inference"][key("rpi4", "kws", 3)] == pytest.approx(mj)
    assert m["edgefleet_inferences_per_kwh"][key("rpi4", "kws", 3)] == pytest.approx(3.6e9 / mj)
    assert m["edgefleet_cost_per_million_inferences"][key("rpi4", "kws", 3)] == pytest.approx(
        mj * 1e6 / 3.6e9 * 0.25 + 0.2 * 1.0)
    assert m["edgefleet_offload_share"][key("rpi4", "kws", 3)] == pytest.approx(0.2)
    assert m["edgefleet_energy_measured_share"][key("rpi4", "kws", 3)] == pytest.approx(0.8)
    assert m["edgefleet_inferences"][key("x86-cpu", "kws", 4)] == 500
    assert m["edgefleet_energy_mj_per_inference"][key("x86-cpu", "kws", 4)] == pytest.approx(12.0)
    assert m["edgefleet_energy_price_per_kwh"][()] == 0.25
    assert m["edgefleet_events_total"][(("name", "telemetry_windows"),)] == 3
    assert m["edgefleet_events_total"][(("name", "telemetry_batches"),)] == 2
    assert not any(dict(labels).get("name") == "admin_token_created" for labels in m["edgefleet_events_total"])


def test_metrics_need_the_admin_token_when_not_public(tmp_path):
    with cloud_server(tmp_path / "cloud", metrics_public=False) as server:
        with server.client(token="") as anon:
            r = anon.get("/metrics")
            assert r.status_code == 401 and "Authorization" in r.json()["message"]
        server.fleet.count("jobs_submitted", 2)
        with server.client() as admin:
            assert scrape(admin)["edgefleet_events_total"] == {(("name", "jobs_submitted"),): 2}
