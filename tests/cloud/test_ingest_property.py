"""A property test of the whole ingest: random telemetry batches and reported states, valid and not, through the
MQTT bridge's `handle` into a real `Fleet` on SQLite and PostgreSQL.

The oracle is the contract itself: `parse_message` says whether a message is valid, and a small model of the store's
rules (seq idempotency, generation order, the issued-generation ceiling) says what the views must then show. After
every example the functions behind GET /api/v1/devices, /status and /stats must build and serialise, the device's
telemetry roll-up must equal the roll-up of the valid windows alone, and its reported picture the last valid report
that wins by the ordering rules. Valid values are drawn over the contract's whole range, ceilings included, so the
SQL aggregates see the largest sums the contract admits.

Seeded (`derandomize=True`) and bounded so `make test` stays quick; each example uses a fresh device.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.cloud.mqtt_bridge import MqttBridge
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.protos.limits import (
    INT32_MAX,
    MAX_ENERGY_MJ,
    MAX_INFERENCES_PER_S,
    MAX_LATENCY_MS,
    MAX_WINDOW_S,
    MAX_WINDOWS_PER_BATCH,
)
from edgefleet.protos.messages import EnrollRequest, MessageError, ReportedState, TelemetryBatch, parse_message

PREFIX = "edgefleet"
NOW = datetime.now(timezone.utc).replace(microsecond=0)  # windows end in the 10 minutes before: inside the look-back
INGEST = settings(max_examples=25, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                         HealthCheck.data_too_large])

latency = st.one_of(st.just(0.0), st.just(MAX_LATENCY_MS), st.floats(0, MAX_LATENCY_MS))
energy = st.one_of(st.none(), st.just(MAX_ENERGY_MJ), st.floats(0, MAX_ENERGY_MJ))


@st.composite
def valid_window(draw: Any) -> dict[str, Any]:
    length_s = draw(st.sampled_from([1, 60, 3600, MAX_WINDOW_S]))
    end = NOW - timedelta(seconds=draw(st.integers(0, 600)))
    capacity = min(INT32_MAX, length_s * MAX_INFERENCES_PER_S)
    count = draw(st.one_of(st.just(capacity), st.integers(0, capacity)))
    errors = draw(st.integers(0, count))
    w: dict[str, Any] = {"model": draw(st.sampled_from(["a", "b"])), "version": draw(st.sampled_from([1, 2])),
                         "start": (end - timedelta(seconds=length_s)).isoformat(), "end": end.isoformat(),
                         "count": count, "errors": errors, "energy_meter": "modelled"}
    if count > errors:  # figures only when an inference succeeded, percentiles in order
        p50, p95, p99 = sorted(draw(st.lists(latency, min_size=3, max_size=3)))
        w |= {"p50_ms": p50, "p95_ms": p95, "p99_ms": draw(st.one_of(st.none(), st.just(p99))),
              "mean_mj": draw(energy)}
    return w


# Each turns a valid message into one the contract refuses.
def _set_window(key: str, value: Any):
    return lambda doc: {**doc, "windows": [{**doc["windows"][0], key: value}, *doc["windows"][1:]]}


BATCH_POISONS = [
    *(_set_window(k, v) for k in ("p50_ms", "p95_ms", "p99_ms", "mean_mj")
      for v in (float("nan"), float("inf"), float("-inf"), 1e308, -1.0)),
    _set_window("count", 2**31), _set_window("count", -1), _set_window("version", 0), _set_window("version", 2**31),
    _set_window("energy_meter", "x" * 65), _set_window("energy_meter", "bad\x00"),
    _set_window("start", (NOW + timedelta(days=1)).isoformat()),
    _set_window("start", (NOW - timedelta(days=3)).isoformat()),
    lambda doc: {**doc, "windows": [{**doc["windows"][0], "errors": doc["windows"][0]["count"] + 1}]},
    lambda doc: {**doc, "windows": doc["windows"] * (MAX_WINDOWS_PER_BATCH + 1)},
    lambda doc: {**doc, "seq": 2**63}, lambda doc: {**doc, "dropped_windows": 2**31},
]
REPORT_POISONS = [
    lambda doc: {**doc, "generation": 2**31}, lambda doc: {**doc, "generation": -1},
    lambda doc: {**doc, "last_error": "x" * 1001}, lambda doc: {**doc, "agent_version": "v" * 65},
    lambda doc: {**doc, "models": [{"name": "m", "state": "failed", "error": "e" * 1001}]},
    lambda doc: {**doc, "models": [{"name": "m", "state": "active", "active_version": 2**31}]},
    lambda doc: {**doc, "reported_at": "9999-01-01T00:00:00Z"},
]
# Anything at all in one place, from the values an attacker tries first to random JSON.
ANY_VALUE = st.one_of(
    st.sampled_from([float("nan"), float("inf"), 1e308, -1, 2**31, 2**63, "", "\x00", "x" * 2000, None, [], {}]),
    st.integers(), st.floats(), st.text(max_size=10),
)


@st.composite
def message(draw: Any) -> tuple[str, dict[str, Any]]:
    channel = draw(st.sampled_from(["telemetry", "reported"]))
    if channel == "telemetry":
        doc: dict[str, Any] = {"kind": "telemetry", "device_id": "?", "seq": None,
                               "windows": draw(st.lists(valid_window(), min_size=1, max_size=4)),
                               "dropped_windows": draw(st.integers(0, 3)), "sent_at": NOW.isoformat()}
        poisons = BATCH_POISONS
    else:
        state = draw(st.sampled_from(["active", "installing", "failed"]))
        doc = {"kind": "reported_state", "device_id": "?", "generation": draw(st.sampled_from([0, 1, 2, 2**31 - 1])),
               "reported_at": (NOW - timedelta(seconds=draw(st.integers(0, 600)))).isoformat(),
               "last_error": draw(st.one_of(st.none(), st.text(max_size=20))),
               "models": [{"name": "m", "active_version": 1, "target_version": 1, "state": state}]}
        poisons = REPORT_POISONS
    how = draw(st.sampled_from(["valid", "valid", "poison", "any"]))
    if how == "poison":
        doc = draw(st.sampled_from(poisons))(doc)
    elif how == "any":
        key = draw(st.sampled_from(sorted(k for k in doc if k not in ("device_id", "seq", "kind"))))
        doc = {**doc, key: draw(ANY_VALUE)}
    return channel, doc


@dataclass
class Expected:
    """What the views must show, from the valid messages alone."""

    issued: int
    seqs: set[int] = field(default_factory=set)
    windows: list[dict[str, Any]] = field(default_factory=list)
    reported: ReportedState | None = None

    def take(self, channel: str, msg: Any) -> str:
        if channel == "telemetry":
            if msg.seq not in self.seqs:
                self.seqs.add(msg.seq)
                self.windows += [w.model_dump() for w in msg.windows]
            return "recorded"
        if msg.generation > self.issued:
            return "refused"
        held = self.reported
        if held is None or msg.generation > held.generation or (
                msg.generation == held.generation and msg.reported_at >= held.reported_at):
            self.reported = msg
        return "recorded"

    def rollup(self) -> dict[tuple[str, int], dict[str, Any]]:
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for key in sorted({(w["model"], w["version"]) for w in self.windows}):
            ws = [w for w in self.windows if (w["model"], w["version"]) == key]

            def mean(figure: str, ws: list[dict[str, Any]] = ws) -> float | None:
                # Per-request figures are means over the successful requests: weighted by them.
                given = [w for w in ws if w[figure] is not None]
                weight = sum(w["count"] - w["errors"] for w in given)
                return sum(w[figure] * (w["count"] - w["errors"]) for w in given) / weight if weight else None

            out[key] = {"count": sum(w["count"] for w in ws), "errors": sum(w["errors"] for w in ws),
                        "p50_ms": mean("p50_ms"), "p95_ms": mean("p95_ms"), "mean_mj": mean("mean_mj")}
        return out


@pytest.fixture
def fleet(tmp_path, db_url):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data", database_url=db_url,
                                     public_url="https://cloud.example:8443"))
    try:
        yield f
    finally:
        f.close()


def _close(got: float | None, want: float | None) -> bool:
    return got == want if got is None or want is None else got == pytest.approx(want, rel=1e-9, abs=1e-9)


_devices = itertools.count()
_seqs = itertools.count()


@INGEST
@given(traffic=st.lists(message(), min_size=1, max_size=6))
def test_random_traffic_never_breaks_the_views_nor_moves_the_valid_aggregates(fleet, traffic):
    device_id = f"prop-{next(_devices)}"
    fleet.enroll(EnrollRequest(device_id=device_id, device_class="rpi4"))
    expected = Expected(issued=fleet.get_device(device_id).desired_generation)
    bridge = MqttBridge(fleet, "127.0.0.1", 1, PREFIX)
    for channel, doc in traffic:
        doc = {**doc, "device_id": device_id}
        if doc.get("seq", 0) is None:
            doc["seq"] = next(_seqs)
        raw = json.dumps(doc, allow_nan=True).encode()
        try:
            msg = parse_message(raw, TelemetryBatch if channel == "telemetry" else ReportedState)
        except MessageError as exc:
            want = "refused" if exc.refused else "malformed"
        else:
            want = expected.take(channel, msg)
        assert bridge.handle(f"{PREFIX}/devices/{device_id}/{channel}", raw) == want, doc

    devices, rows, stats = fleet.list_devices(), fleet.status(), fleet.stats()
    for view in (*devices, *rows, stats):
        view.model_dump_json()
    assert "ingest_errors" not in stats.counters  # nothing reached the database that it could not take
    view = fleet.get_device(device_id)
    got = {(s.model, s.version): s for s in view.telemetry}
    want = expected.rollup()
    assert set(got) == set(want)
    for key, agg in want.items():
        s = got[key]
        assert (s.count, s.errors) == (agg["count"], agg["errors"])
        assert _close(s.p50_ms, agg["p50_ms"]) and _close(s.p95_ms, agg["p95_ms"]), (s, agg)
        assert _close(s.mean_mj, agg["mean_mj"]), (s, agg)
    if expected.reported is None:
        assert view.reported_generation is None
    else:
        assert view.reported_generation == expected.reported.generation
        assert view.models == expected.reported.models and view.last_error == expected.reported.last_error
