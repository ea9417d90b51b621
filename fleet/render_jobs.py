"""Rendering of jobs, distillation reports and class cost-model facts for people (rich); `--json` prints the API's
views unchanged (render.to_json). Like render.py: numbers rounded for reading, absent values "-", never raises on a
missing field, never calls the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from edgefleet.fleet.render import DASH, _size, _v, ago, num
from edgefleet.protos.distill import CandidateFigures, DistillReport
from edgefleet.protos.jobs import ClassDetailView, JobLogView, JobView, RefitView, VariantMeasurement

_STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "bold red",
                "cancelled": "dim"}


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f}%"


def _count(value: int | None) -> str:
    if value is None:
        return DASH
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def jobs_table(jobs: Sequence[JobView]) -> Table:
    t = Table(title=f"{len(jobs)} job(s)", title_justify="left")
    for col in ("id", "kind", "name", "classes", "state", "stage", "progress", "attempts", "worker", "created"):
        t.add_column(col)
    for j in jobs:
        distill = j.spec.get("distill", {})
        t.add_row(str(j.id), j.kind, _v(j.spec.get("name")), ",".join(distill.get("classes", [])) or DASH,
                  _state(j.state), j.stage, f"{j.progress:.0%}", f"{j.attempts}/{j.max_attempts}", _v(j.worker),
                  ago(j.created_at))
    return t


def job_detail(j: JobView) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("job", f"{j.id} ({j.kind})")
    facts.add_row("model name", _v(j.spec.get("name")))
    facts.add_row("state", _state(j.state) + (Text(" (cancel requested)", style="dim") if j.cancel_requested
                                              and not j.finished else Text("")))
    facts.add_row("stage", f"{j.stage} ({j.progress:.0%})")
    facts.add_row("attempts", f"{j.attempts} of {j.max_attempts}")
    facts.add_row("worker", _v(j.worker))
    facts.add_row("created", ago(j.created_at))
    facts.add_row("started", ago(j.started_at) if j.started_at else DASH)
    facts.add_row("finished", ago(j.finished_at) if j.finished_at else DASH)
    if j.error:
        facts.add_row("error", Text(j.error, style="red"))
    parts: list = [facts]
    if j.versions:
        t = Table(title="versions built", title_justify="left")
        for col in ("class", "model", "version", "precision", "runtime", "format", "pred. p95 ms", "pred. mJ"):
            t.add_column(col)
        for v in j.versions:
            t.add_row(v.device_class, v.model, str(v.version), v.precision, v.runtime, v.format,
                      num(v.predicted_p95_ms, 2), num(v.predicted_mj, 3))
        parts.append(t)
    return Group(*parts)


def log_lines(view: JobLogView) -> list[str]:
    return [f"{x.at:%H:%M:%S} [{x.attempt}] {x.line}" for x in view.lines]


def _figures_row(label: str, c: CandidateFigures, test: bool) -> list:
    row = [label, _pct(c.accuracy)] + ([_pct(c.test_accuracy)] if test else [])
    return row + [_pct(c.agreement), _count(c.params) if c.family != "teacher" else DASH, _count(c.macs),
                  _size(c.size_bytes), num(c.predicted_p95_ms, 2), num(c.predicted_mj, 3), f"{c.precision}/{c.runtime}"]


def _label(c: CandidateFigures) -> str:
    return "teacher (its own variant)" if c.family == "teacher" else f"student {c.candidate}"


def report_tables(r: DistillReport) -> Group:
    test = r.evaluation == "test"
    samples = f"{r.n_samples} samples ({r.n_train} train, {r.n_val} val, {r.n_heldout} held out)"
    if r.n_synthetic:
        samples += f" + {r.n_synthetic} synthetic training rows labelled by the teacher"
    if test:
        samples += f", test set of {r.n_test}"
    head = Text.assemble(("distilled ", ""), (r.model_name, "bold"), (f": {samples}; {r.metric}", ""))
    parts: list = [head]
    rule = ("efficiency: least predicted mJ/inference within "
            f"{r.max_accuracy_drop:g} points of the teacher" if r.objective == "efficiency" else
            "accuracy: best score within the budgets")
    parts.append(Text(f"objective {rule}; no student costlier than the teacher is ever chosen", style="dim"))
    parts.append(Text(r.evaluation_note, style="dim" if test else "yellow"))
    if r.majority_baseline is not None:
        parts.append(Text(f"majority-class baseline: {_pct(r.majority_baseline)}", style="dim"))
    if r.teacher.macs_basis and not r.teacher.macs_basis.startswith("counted"):
        parts.append(Text(f"teacher MACs: {r.teacher.macs_basis}", style="dim"))
    if r.how_probabilities_were_handled:
        parts.append(Text(r.how_probabilities_were_handled, style="dim"))
    for note in r.interface_notes:
        parts.append(Text(f"interface: {note}", style="dim"))
    for name, cr in sorted(r.classes.items()):
        b = cr.budgets
        budget = ", ".join(x for x in (f"p95 <= {b.p95_latency_ms:g} ms" if b.p95_latency_ms else "",
                                       f"<= {b.mj_per_inference:g} mJ" if b.mj_per_inference else "",
                                       f"<= {b.model_mb:g} MB" if b.model_mb else "") if x) or "no budgets"
        t = Table(title=f"{name}: {budget}", title_justify="left",
                  caption=f"calibration: {cr.calibration_source or DASH}", caption_justify="left")
        columns = ["pick", "model", "held-out acc."] + (["test acc."] if test else [])
        for col in columns + ["agreement", "params", "MACs", "size", "p95 ms (pred.)", "mJ (pred.)", "precision"]:
            t.add_column(col)
        rows: list[tuple[str, CandidateFigures, str]] = []
        if cr.teacher_variant is not None:
            rows.append(("teacher", cr.teacher_variant, ""))
        for pick, fig in (("by accuracy", cr.chosen_by_accuracy), ("by efficiency", cr.chosen_by_efficiency)):
            if fig is not None:
                style = "bold green" if cr.chosen is not None and fig.candidate == cr.chosen.candidate and \
                    pick.endswith(cr.objective) else ""
                rows.append((pick + (" (ships)" if style else ""), fig, style))
        if cr.chosen is None and cr.nearest is not None:
            rows.append(("nearest", cr.nearest, "yellow"))
        for pick, fig, style in rows:
            t.add_row(pick, *_figures_row(_label(fig), fig, test), style=style)
        parts.append(t)
        chosen = cr.chosen or cr.nearest
        why = cr.reason + (f"; precision: {chosen.precision_reason}" if chosen and chosen.precision_reason else "")
        if cr.chosen is None:
            parts.append(Text(f"nothing ships for {name}: {why}", style="red"))
        else:
            parts.append(Text(f"why: {why}", style="dim"))
    for warning in r.warnings:
        parts.append(Text(f"warning: {warning}", style="bold yellow"))
    return Group(*parts)


def _calibration_line(values: dict) -> str:
    gmacs = values.get("gmacs_per_s", {})
    return (", ".join(f"{p} {g:.4g} GMAC/s" for p, g in sorted(gmacs.items()))
            + f"; overhead {num(values.get('overhead_ms'), 3)} ms; active {num(values.get('active_watts'))} W")


def variants_table(variants: Sequence[VariantMeasurement], p95_factor: float | None, title: str) -> Table:
    """Predicted against measured per deployed variant, per inference (row); p95 measured is per request, of
    `rows/req` rows on average, so it compares with the single-row prediction only at batch 1."""
    t = Table(title=title, title_justify="left")
    for col in ("model", "version", "precision", "runtime", "ms/inf pred.", "ms/inf meas.", "mJ/inf pred.",
                "mJ/inf meas.", "p95 ms pred.", "p95 ms/req meas.", "rows/req", "inferences", "devices"):
        t.add_column(col)
    for v in variants:
        predicted_ms = (v.predicted_p95_ms / p95_factor if v.predicted_p95_ms is not None and p95_factor
                        else None)
        t.add_row(v.model, str(v.version), _v(v.precision), _v(v.runtime), num(predicted_ms, 3),
                  num(v.measured_ms, 3), num(v.predicted_mj, 3), num(v.measured_mj, 3), num(v.predicted_p95_ms, 2),
                  num(v.measured_p95_ms, 2), num(v.batch, 1), str(v.inferences), str(v.devices))
    return t


def class_detail(d: ClassDetailView) -> Group:
    c = d.info
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("class", c.name)
    facts.add_row("hardware", f"{_v(c.cpu)}, {c.cores} cores, {c.memory_mb} MB" + (f", {c.accelerator}"
                                                                                   if c.accelerator else ""))
    facts.add_row("runtimes", ", ".join(c.runtimes) + f" (prefers {c.preferred_precision})")
    facts.add_row("power", f"idle {num(c.idle_watts)} W, active {num(c.active_watts)} W")
    b = c.budgets
    facts.add_row("budgets", f"p95 {num(b.p95_latency_ms)} ms, {num(b.mj_per_inference)} mJ, {num(b.model_mb)} MB")
    cal = d.calibration
    facts.add_row("calibration", f"{cal.source} ({cal.samples} samples): {_calibration_line(cal.values)}")
    if not d.variants:
        return Group(facts, Text("no variants built for this class yet (fleet distill ... --classes "
                                 f"{c.name})", style="dim"))
    title = "deployed variants: predicted against measured, per inference (a batched request is one per row)"
    return Group(facts, variants_table(d.variants, cal.values.get("p95_factor"), title))


def refit_detail(r: RefitView) -> Group:
    """The calibration in force, the one the telemetry fits, and whether it was applied (or why it was held)."""
    t = Table(title=f"{r.device_class}: refit from {r.windows} window(s), {r.inferences} inferences",
              title_justify="left")
    for col in ("", "source", "figures"):
        t.add_column(col)
    t.add_row("current", r.current.source, _calibration_line(r.current.values))
    t.add_row("proposed", r.proposed.source, _calibration_line(r.proposed.values),
              style="" if r.applied else "yellow")
    parts: list = [t]
    if r.windows_ignored:
        parts.append(Text(f"{r.windows_ignored} window(s) of fewer than {r.min_rows} rows left out", style="dim"))
    for line in r.held:
        parts.append(Text(f"moves {line}", style="yellow"))
    if r.applied:
        parts.append(Text("applied (accepted past the hold)" if r.accepted else "applied: later distillations "
                          "predict with it", style="green"))
    else:
        parts.append(Text(f"held, not applied: a refit may move a figure by at most {r.max_factor:g}x without "
                          f"confirmation; if the devices really are this different, `fleet classes refit "
                          f"{r.device_class} --accept` applies it", style="bold yellow"))
    return Group(*parts)


__all__ = ["class_detail", "job_detail", "jobs_table", "log_lines", "refit_detail", "report_tables",
           "variants_table"]
