"""Prometheus exposition of the fleet's efficiency and the cloud's counters: a custom collector read at scrape time.

Theory: the database is the source of truth and several cloud replicas share it, so nothing is counted in process
memory (each replica would expose its own partial count); every scrape reads the database. Per (device class,
model, version), over the look-back `telemetry_summary_s`, gauges of mJ per inference, inferences per kWh, cost per
million inferences, inferences, offload share and measured share (the label rule of cloud/efficiency.py as a
number, so a series keeps its identity when a class gains a real meter). No per-device series: a fleet's devices
are unbounded cardinality, `GET /api/v1/efficiency` has them. The store's counters table is one counter family,
`edgefleet_events_total{name=...}`, monotonic as Prometheus expects (counters only ever rise in the table).

Whether `/metrics` needs a token is `metrics_public` (cloud/settings.py; default open, as exporters are).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgefleet.cloud import efficiency as core
from edgefleet.cloud.errors import Unavailable
from edgefleet.cloud.services_efficiency import prices, since_of
from edgefleet.cloud.store_efficiency import efficiency_slices

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from edgefleet.cloud.services import Fleet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LABELS = ["device_class", "model", "version"]
# (name, help, figure field): the gauges per class and model version.
_GAUGES = (
    ("edgefleet_energy_mj_per_inference", "Device energy per inference, gross, mJ", "mj_per_inference"),
    ("edgefleet_inferences_per_kwh", "Inferences per kWh of device energy", "inferences_per_kwh"),
    ("edgefleet_cost_per_million_inferences", "Cost of a million inferences as routed (energy at the kWh price "
     "plus the offloaded share at the cloud's price), in the configured currency", "cost_per_million"),
    ("edgefleet_inferences", "Inferences (rows) over the look-back, local and offloaded", "inferences"),
    ("edgefleet_offload_share", "Share of inferences offloaded to the cloud (0-1)", "offload_share"),
    ("edgefleet_energy_measured_share", "Share of the metered inferences measured by a real meter, not estimated "
     "(0-1)", "measured_share"),
)


class EfficiencyCollector:
    """A prometheus_client collector (anything with `collect()`); imported lazily, see `exposition`."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fleet = self.fleet
        window_s = fleet.settings.telemetry_summary_s
        since = since_of(window_s)
        p = prices(fleet)
        grouped = core.merge(efficiency_slices(fleet.store, since),
                             lambda s: (s.device_class, s.model, s.version))
        families = {field: GaugeMetricFamily(name, f"{help_}, over the last {window_s} s", labels=_LABELS)
                    for name, help_, field in _GAUGES}
        for (device_class, model, version), totals in grouped.items():
            figures = core.figures(totals, p)
            for field, family in families.items():
                value = getattr(figures, field)
                if value is not None:  # an absent figure is an absent sample, never a 0 that reads as a result
                    family.add_metric([device_class, model, str(version)], float(value))
        yield from families.values()
        yield GaugeMetricFamily("edgefleet_energy_price_per_kwh", "The configured price per kWh",
                                value=p.energy_per_kwh)
        yield GaugeMetricFamily("edgefleet_offload_price_per_million", "The configured cloud price per million "
                                "offloaded inferences", value=p.offload_per_million)
        events = CounterMetricFamily("edgefleet_events", "The cloud's counters (those `fleet stats` shows)",
                                     labels=["name"])
        for name, value in sorted(fleet.counters().items()):
            events.add_metric([name], float(value))
        yield events


def exposition(fleet: Fleet) -> bytes:
    """The text exposition of one scrape. prometheus-client is imported here, not at module load: a cloud
    installed without it still serves everything else, and /metrics answers 503 saying what to install."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise Unavailable("/metrics needs the prometheus-client package: pip install 'prometheus-client>=0.20' "
                          "(part of the cloud extra) and restart the cloud") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EfficiencyCollector(fleet))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "EfficiencyCollector", "exposition"]
