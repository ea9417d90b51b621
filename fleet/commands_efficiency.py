"""`fleet efficiency MODEL`: per device class, the teacher as it would run there against what edgefleet ships and
routes (the student variant plus offload), side by side, each figure labelled measured or estimated.

Theory: like every command, it parses, calls the cloud (`GET /api/v1/models/{name}/efficiency`), renders: a table
for people (one block of rows per class: mJ per inference, inferences per kWh, cost per million, accuracy, p95
latency, offload share; the teacher, edgefleet, and how many times better), or with `--json` the API's
`ModelEfficiencyView` unchanged. The figures and their labels are the cloud's (cloud/efficiency.py); this module
only formats them. Registered by fleet/main.py; `_client` is looked up there at call time.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from edgefleet.fleet import render
from edgefleet.fleet.client import FleetClient
from edgefleet.protos.api import ClassEfficiency, LabelledFigure, ModelEfficiencyView

DASH = render.DASH
si = render.si
_SHORT = {"measured": "meas.", "estimated": "est.", "mixed": "mixed", "none": ""}
_SOURCE_STYLE = {"measured": "green", "estimated": "yellow", "mixed": "cyan"}


def _client(ctx: typer.Context) -> FleetClient:
    from edgefleet.fleet.main import _client as client

    return client(ctx)


def _examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"$ {line}" for line in lines)


def _window_s(value: str) -> int:
    from edgefleet.fleet.main import _ttl_s

    return _ttl_s(value, "--window")


# -- rendering ---------------------------------------------------------------------------------------------------


def _cell(f: LabelledFigure, shown: str) -> Text:
    if f.value is None:
        return Text(DASH)
    text = Text(shown)
    if _SHORT[f.source]:
        text.append(f" {_SHORT[f.source]}", style=_SOURCE_STYLE.get(f.source, "dim"))
    return text


def _times(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.3g}x" if value >= 1 else f"{1 / value:.3g}x worse"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.1%}"


def _rows(c: ClassEfficiency) -> list[tuple[str, Text, Text, str]]:
    t, e, x = c.teacher, c.edgefleet, c.times_better
    delta = DASH if c.accuracy_delta_points is None else f"{c.accuracy_delta_points:+.1f} pts"
    return [
        ("mJ/inference", _cell(t.mj_per_inference, si(t.mj_per_inference.value)),
         _cell(e.mj_per_inference, si(e.mj_per_inference.value)), _times(x.get("mj_per_inference"))),
        ("inferences/kWh", _cell(t.inferences_per_kwh, si(t.inferences_per_kwh.value)),
         _cell(e.inferences_per_kwh, si(e.inferences_per_kwh.value)), _times(x.get("inferences_per_kwh"))),
        ("cost/1M inferences", _cell(t.cost_per_million, si(t.cost_per_million.value)),
         _cell(e.cost_per_million, si(e.cost_per_million.value)), _times(x.get("cost_per_million"))),
        ("accuracy", _cell(t.accuracy, _pct(t.accuracy.value)), _cell(e.accuracy, _pct(e.accuracy.value)), delta),
        ("p95 ms", _cell(t.p95_ms, si(t.p95_ms.value)), _cell(e.p95_ms, si(e.p95_ms.value)),
         _times(x.get("p95_ms"))),
        ("offloaded", _cell(t.offload_share, _pct(t.offload_share.value)),
         _cell(e.offload_share, _pct(e.offload_share.value)), ""),
    ]


def efficiency_table(view: ModelEfficiencyView) -> Group:
    t = Table(title=f"{view.model}: the teacher on each class against what edgefleet ships and routes",
              title_justify="left")
    for col, justify in (("class", "left"), ("figure", "left"), ("teacher", "right"), ("edgefleet", "right"),
                         ("better", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for i, c in enumerate(view.classes):
        shipped = (f"v{c.version} {c.candidate or ''} {c.precision or ''}".strip() if c.version is not None
                   else "nothing ships")
        for j, (figure, teacher, edge, better) in enumerate(_rows(c)):
            label = {0: c.device_class, 1: Text(shipped, style="dim"),
                     2: Text(f"{c.inferences} inferences, {c.devices} device(s)", style="dim")}.get(j, "")
            t.add_row(label, figure, teacher, edge, better, end_section=j == 5 and i < len(view.classes) - 1)
    p = view.prices
    t.caption = (f"last {view.window_s} s; prices: {p.energy_price_per_kwh:g} per kWh, "
                 f"{p.offload_price_per_million:g} per 1M offloaded (the cloud's currency); "
                 "meas. = metered, est. = cost model or power model, mixed = both; better = how many times "
                 "edgefleet's figure beats the teacher's (accuracy: edgefleet - teacher)")
    notes = [Text(f"{c.device_class}: {note}", style="dim") for c in view.classes for note in c.notes]
    return Group(t, *notes)


# -- the command -------------------------------------------------------------------------------------------------


def efficiency(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A model distilled with `fleet distill`.")],
    window: Annotated[str | None, typer.Option("--window", help="Telemetry look-back: 30m, 6h, 7d (default: the "
                                               "cloud's telemetry_summary_s).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON view instead of a table.")] = False,
) -> None:
    """Per device class: the teacher against the student variant plus offload, side by side.

    mJ per inference, inferences per kWh, cost per million inferences, accuracy and p95 latency, each labelled
    measured or estimated, and how many times better. The teacher's figures come from the distillation report (the
    cost model on the class); edgefleet's from the fleet's telemetry of the variant once devices serve it, else
    from the same report's prediction.
    """
    view = _client(ctx).model_efficiency(model, _window_s(window) if window else None)
    if as_json:
        typer.echo(render.to_json(view))
    else:
        Console().print(efficiency_table(view))


def register(app: typer.Typer) -> None:
    app.command("efficiency", epilog=_examples("fleet efficiency kws", "fleet efficiency kws --window 7d",
                                               "fleet efficiency kws --json | jq '.classes[].times_better'"))(
        efficiency)


__all__ = ["efficiency_table", "register"]
