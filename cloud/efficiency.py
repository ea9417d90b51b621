"""Efficiency figures: energy per inference, inferences per kWh, cost per million inferences. A pure core.

Theory: the store hands over `Slice`s, sums over the telemetry windows of one (device, class, model, version,
where, energy_source) (cloud/store_efficiency.py). Sums add, so any grouping (a device, a class, a model version,
the fleet) is a merge of slices (`merge`), and every figure is computed once, from sums, by `figures`:

    mJ per inference       = sum(row_mj x rows) / rows, over the inferences that carry an energy figure (gross,
                             the device's own draw; idle-subtracted in `net_mj_per_inference` where the agent sent it)
    inferences per kWh     = 3.6e9 mJ per kWh / mJ per inference
    cost per 1M inferences = mJ x 1e6 / 3.6e9 x price per kWh  +  offload share x cloud price per 1M offloaded

Offloaded inferences are windows with `where == "cloud"`: the device's energy for them (forwarding, waiting) counts
where the agent metered it, and the cloud's side is its price per million. Prices are currency-agnostic settings
(`energy_price_per_kwh`, `offload_price_per_million`).

Labels (`energy_label`): a figure is "measured" only when every inference behind it was metered by a real meter,
"estimated" when none was (the agent's power model), "mixed" when both are in it (with `measured_share`, the
measured inferences' share), "none" when no inference carried energy. "mixed" rather than the weaker label: a
fleet half on RAPL says so instead of hiding its measured half.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, fields
from typing import TypeVar

from edgefleet.protos.api import EfficiencyFigures, EnergyLabel, PricesView

MJ_PER_KWH = 3.6e9  # 1 kWh = 3.6e6 J = 3.6e9 mJ
PER_MILLION = 1e6
LABEL_RULE = ("measured: every inference with an energy figure was metered; estimated: none was (power model); "
              "mixed: both (measured_share says how much was measured); none: no energy figure")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Prices:
    energy_per_kwh: float
    offload_per_million: float

    def view(self) -> PricesView:
        return PricesView(energy_price_per_kwh=self.energy_per_kwh,
                          offload_price_per_million=self.offload_per_million)


@dataclass(frozen=True)
class Slice:
    """Sums over the windows of one (device, class, model, version, where, energy_source)."""

    device_id: str = ""
    device_class: str = ""
    model: str = ""
    version: int = 0
    where: str = "local"
    energy_source: str = "none"
    requests: int = 0
    rows: int = 0
    energy_rows: int = 0  # rows of the windows with an energy figure
    energy_mj: float = 0.0  # sum of row_mj x rows over those
    net_rows: int = 0
    net_mj: float = 0.0
    latency_rows: int = 0
    latency_ms: float = 0.0  # sum of row_ms x rows
    p95_requests: int = 0  # local windows only: offloaded latency is the network's
    p95_ms: float = 0.0  # sum of p95_ms x requests


@dataclass(frozen=True)
class Totals:
    """Additive sums of any number of slices; `figures` turns them into a view."""

    requests: int = 0
    rows: int = 0
    offloaded: int = 0
    energy_rows: int = 0
    measured_rows: int = 0
    estimated_rows: int = 0
    energy_mj: float = 0.0
    net_rows: int = 0
    net_mj: float = 0.0
    latency_rows: int = 0
    latency_ms: float = 0.0
    p95_requests: int = 0
    p95_ms: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def totals_of(s: Slice) -> Totals:
    metered = s.energy_rows if s.energy_source in ("measured", "estimated") else 0
    return Totals(
        requests=s.requests, rows=s.rows, offloaded=s.rows if s.where == "cloud" else 0, energy_rows=metered,
        measured_rows=metered if s.energy_source == "measured" else 0,
        estimated_rows=metered if s.energy_source == "estimated" else 0,
        energy_mj=s.energy_mj if metered else 0.0, net_rows=s.net_rows if metered else 0,
        net_mj=s.net_mj if metered else 0.0, latency_rows=s.latency_rows, latency_ms=s.latency_ms,
        p95_requests=s.p95_requests if s.where == "local" else 0, p95_ms=s.p95_ms if s.where == "local" else 0.0)


def merge(slices: Iterable[Slice], key: Callable[[Slice], K]) -> dict[K, Totals]:
    """Slices summed per `key(slice)`, keys in sorted order."""
    out: dict[K, Totals] = {}
    for s in slices:
        k = key(s)
        out[k] = out.get(k, Totals()) + totals_of(s)
    return dict(sorted(out.items(), key=lambda kv: kv[0]))  # type: ignore[arg-type,return-value]


def total(slices: Iterable[Slice]) -> Totals:
    out = Totals()
    for s in slices:
        out = out + totals_of(s)
    return out


def energy_label(measured_rows: int, estimated_rows: int) -> EnergyLabel:
    """The label rule of the module's docstring."""
    if measured_rows and estimated_rows:
        return "mixed"
    if measured_rows:
        return "measured"
    if estimated_rows:
        return "estimated"
    return "none"


def inferences_per_kwh(mj_per_inference: float | None) -> float | None:
    if mj_per_inference is None or mj_per_inference <= 0:
        return None  # zero energy is a meter that read nothing, not infinite efficiency
    return MJ_PER_KWH / mj_per_inference


def energy_cost_per_million(mj_per_inference: float | None, price_per_kwh: float) -> float | None:
    if mj_per_inference is None:
        return None
    return mj_per_inference * PER_MILLION / MJ_PER_KWH * price_per_kwh


def cost_per_million(mj_per_inference: float | None, offload_share: float, prices: Prices) -> float | None:
    """A million inferences as routed: the device's energy at the kWh price plus the offloaded share's cloud price.
    None when the device's energy is unknown (the cloud's part alone would understate it)."""
    energy = energy_cost_per_million(mj_per_inference, prices.energy_per_kwh)
    if energy is None:
        return None
    return energy + offload_share * prices.offload_per_million


def _ratio(num: float, den: int) -> float | None:
    return num / den if den > 0 else None


def figures(t: Totals, prices: Prices) -> EfficiencyFigures:
    mj = _ratio(t.energy_mj, t.energy_rows)
    share = _ratio(t.offloaded, t.rows)
    energy_kwh = t.energy_mj / MJ_PER_KWH
    energy_cost = energy_kwh * prices.energy_per_kwh
    offload_cost = t.offloaded / PER_MILLION * prices.offload_per_million
    return EfficiencyFigures(
        inferences=t.rows, offloaded=t.offloaded, offload_share=share, metered_inferences=t.energy_rows,
        mj_per_inference=mj, net_mj_per_inference=_ratio(t.net_mj, t.net_rows),
        inferences_per_kwh=inferences_per_kwh(mj), cost_per_million=cost_per_million(mj, share or 0.0, prices),
        energy_kwh=energy_kwh, energy_cost=energy_cost, offload_cost=offload_cost,
        total_cost=energy_cost + offload_cost, ms_per_inference=_ratio(t.latency_ms, t.latency_rows),
        p95_ms=_ratio(t.p95_ms, t.p95_requests), energy_source=energy_label(t.measured_rows, t.estimated_rows),
        measured_share=_ratio(t.measured_rows, t.energy_rows))


def times_better(teacher: float | None, edgefleet: float | None, *, higher_is_better: bool = False) -> float | None:
    """How many times better edgefleet's figure is than the teacher's (above 1: better); None without both."""
    if teacher is None or edgefleet is None or teacher <= 0 or edgefleet <= 0:
        return None
    return edgefleet / teacher if higher_is_better else teacher / edgefleet


def weaker(*labels: EnergyLabel) -> EnergyLabel:
    """The label of a figure computed from figures of these labels (a blend of measured and estimated is mixed)."""
    given = {x for x in labels if x != "none"}
    if not given:
        return "none"
    if given == {"measured"}:
        return "measured"
    if given == {"estimated"}:
        return "estimated"
    return "mixed"


def only(slices: Iterable[Slice], **match: object) -> list[Slice]:
    """The slices whose fields equal `match` (a field given as None matches anything)."""
    return [s for s in slices if all(v is None or getattr(s, k) == v for k, v in match.items())]


__all__ = ["LABEL_RULE", "MJ_PER_KWH", "Prices", "Slice", "Totals", "cost_per_million", "energy_cost_per_million",
           "energy_label", "figures", "inferences_per_kwh", "merge", "only", "times_better", "total", "weaker"]
