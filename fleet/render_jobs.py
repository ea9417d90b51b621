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
from edgefleet.protos.jobs import ClassDetailView, JobLogView, JobView

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


def _figures_row(label: str, c: CandidateFigures) -> list:
    return [label, _pct(c.accuracy), _pct(c.agreement), _count(c.params), _count(c.macs), _size(c.size_bytes),
            num(c.predicted_p95_ms, 2), num(c.predicted_mj, 3), f"{c.precision}/{c.runtime}"]


def report_tables(r: DistillReport) -> Group:
    head = Text.assemble(("distilled ", ""), (r.model_name, "bold"),
                         (f": {r.n_samples} samples ({r.n_train} train, {r.n_val} val, {r.n_heldout} held out); "
                          f"{r.metric}", ""))
    parts: list = [head]
    if r.how_probabilities_were_handled:
        parts.append(Text(r.how_probabilities_were_handled, style="dim"))
    for name, cr in sorted(r.classes.items()):
        b = cr.budgets
        budget = ", ".join(x for x in (f"p95 <= {b.p95_latency_ms:g} ms" if b.p95_latency_ms else "",
                                       f"<= {b.mj_per_inference:g} mJ" if b.mj_per_inference else "",
                                       f"<= {b.model_mb:g} MB" if b.model_mb else "") if x) or "no budgets"
        t = Table(title=f"{name}: {budget}", title_justify="left",
                  caption=f"calibration: {cr.calibration_source or DASH}", caption_justify="left")
        for col in ("model", "accuracy", "agreement", "params", "MACs", "size", "p95 ms (pred.)", "mJ (pred.)",
                    "precision"):
            t.add_column(col)
        te = r.teacher
        t.add_row("teacher", _pct(te.accuracy), DASH, _count(te.params), _count(te.macs), _size(te.size_bytes),
                  num(cr.teacher_predicted_p95_ms, 2), num(cr.teacher_predicted_mj, 3), "fp32/onnxruntime")
        if cr.chosen is not None:
            t.add_row(*_figures_row(f"student {cr.chosen.candidate}", cr.chosen), style="bold green")
        elif cr.nearest is not None:
            t.add_row(*_figures_row(f"nearest {cr.nearest.candidate}", cr.nearest), style="yellow")
        parts.append(t)
        chosen = cr.chosen or cr.nearest
        why = cr.reason + (f"; precision: {chosen.precision_reason}" if chosen and chosen.precision_reason else "")
        if cr.chosen is None:
            parts.append(Text(f"no student fits: {why}", style="red"))
        else:
            parts.append(Text(f"why: {why}", style="dim"))
    return Group(*parts)


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
    gmacs = cal.values.get("gmacs_per_s", {})
    facts.add_row("calibration", f"{cal.source} ({cal.samples} samples): " + ", ".join(
        f"{p} {g:g} GMAC/s" for p, g in sorted(gmacs.items())) + f"; overhead {num(cal.values.get('overhead_ms'), 3)}"
        " ms")
    t = Table(title="deployed variants: predicted against measured", title_justify="left")
    for col in ("model", "version", "precision", "runtime", "p95 ms pred.", "p95 ms meas.", "mJ pred.", "mJ meas.",
                "inferences", "devices"):
        t.add_column(col)
    for v in d.variants:
        t.add_row(v.model, str(v.version), _v(v.precision), _v(v.runtime), num(v.predicted_p95_ms, 2),
                  num(v.measured_p95_ms, 2), num(v.predicted_mj, 3), num(v.measured_mj, 3), str(v.inferences),
                  str(v.devices))
    if not d.variants:
        return Group(facts, Text("no variants built for this class yet (fleet distill ... --classes "
                                 f"{c.name})", style="dim"))
    return Group(facts, t)


__all__ = ["class_detail", "job_detail", "jobs_table", "log_lines", "report_tables"]
