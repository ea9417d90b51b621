"""Rendering for people (rich tables) and for scripts (JSON of the `protos.api` views, unchanged).

Theory: every command has exactly two outputs. `--json` prints `model_dump(mode="json")` of the views the API
returned, so a script sees the same fields the REST API documents and nothing the CLI invented. Without it, a
table: numbers rounded for reading, times shown relative to now ("12s ago"), absent values as "-". Rendering
never calls the network and never raises on a missing field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgefleet.protos.api import (
    DeploymentView,
    DeviceClassInfo,
    DeviceStatusRow,
    DeviceView,
    EnrollmentTokenView,
    ModelVersionView,
    StatsView,
    TokenView,
)

DASH = "-"


def to_json(value: BaseModel | Sequence[BaseModel]) -> str:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    else:
        data = [v.model_dump(mode="json") for v in value]
    return json.dumps(data, indent=2)


def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    now = now or datetime.now(timezone.utc)
    if when.tzinfo is None:  # the API speaks UTC; a naive time from an older cloud is UTC too
        when = when.replace(tzinfo=timezone.utc)
    s = int((now - when).total_seconds())
    if s < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def num(value: float | int | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _v(value: object) -> str:
    return DASH if value is None or value == "" else str(value)


def _online(online: bool) -> Text:
    return Text("online", style="green") if online else Text("offline", style="red")


_STATE_STYLE = {"in_sync": "green", "pending": "yellow", "installing": "cyan", "failed": "bold red", "no_model": "dim"}


def devices_table(devices: Sequence[DeviceView]) -> Table:
    t = Table(title=f"{len(devices)} device(s)", title_justify="left")
    for col in ("device", "class", "labels", "status", "last seen", "generation", "models"):
        t.add_column(col)
    for d in devices:
        labels = ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or DASH
        gen = f"{_v(d.reported_generation)}/{d.desired_generation}"
        active = {m.name: m.active_version for m in d.models}
        models = ", ".join(f"{n} v{_v(active.get(n))}/v{v}" for n, v in sorted(d.desired_models.items())) or DASH
        t.add_row(d.device_id, d.device_class, labels, _online(d.online), ago(d.last_seen), gen, models)
    t.caption = "generation and models: reported/desired"
    return t


def device_detail(d: DeviceView) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("device", d.device_id)
    facts.add_row("class", d.device_class)
    facts.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or DASH)
    facts.add_row("status", _online(d.online))
    facts.add_row("last seen", ago(d.last_seen))
    facts.add_row("enrolled", d.enrolled_at.isoformat(timespec="seconds"))
    facts.add_row("generation", f"desired {d.desired_generation}, reported {_v(d.reported_generation)}")
    facts.add_row("last error", Text(_v(d.last_error), style="red" if d.last_error else ""))
    key = "registered" if d.has_device_key else "none (enrolled by an older agent)"
    facts.add_row("device key", "reset: the next enrollment registers a new key" if d.reset_pending else key)
    if d.enrollments_refused:
        when = d.last_refused_at.isoformat(timespec="seconds") if d.last_refused_at else DASH
        facts.add_row("refused enrollments", Text(f"{d.enrollments_refused}, last at {when}: {d.last_refused_reason}",
                                                  style="red"))
    models = Table(title="models", title_justify="left")
    for col in ("model", "desired", "active", "target", "state", "phase", "error"):
        models.add_column(col)
    reported = {m.name: m for m in d.models}
    for name in sorted(set(d.desired_models) | set(reported)):
        m = reported.get(name)
        models.add_row(
            name,
            _v(d.desired_models.get(name)),
            _v(m and m.active_version),
            _v(m and m.target_version),
            _v(m and m.state),
            _v(m and m.phase),
            _v(m and m.error),
        )
    tele = Table(title="telemetry (latest window per model version)", title_justify="left")
    for col in ("model", "version", "requests", "errors", "inferences", "p50 ms/req", "p95 ms/req", "ms/inf",
                "mJ/inf", "energy", "window end"):
        tele.add_column(col)
    for s in d.telemetry:
        tele.add_row(s.model, str(s.version), str(s.count), str(s.errors), _v(s.rows), num(s.p50_ms, 2),
                     num(s.p95_ms, 2), num(s.row_ms, 3), num(s.row_mj, 3), s.energy_source, ago(s.window_end))
    if not d.telemetry:
        return Group(facts, models, Text("no telemetry yet", style="dim"))
    return Group(facts, models, tele)


def classes_table(classes: Sequence[DeviceClassInfo]) -> Table:
    t = Table(title=f"{len(classes)} device class(es)", title_justify="left")
    for col in ("class", "cpu", "cores", "memory MB", "runtimes", "precision", "idle W", "active W", "budget p95 ms",
                "budget mJ"):
        t.add_column(col)
    for c in classes:
        t.add_row(c.name, _v(c.cpu), str(c.cores), str(c.memory_mb), ",".join(c.runtimes), c.preferred_precision,
                  num(c.idle_watts), num(c.active_watts), num(c.budgets.p95_latency_ms),
                  num(c.budgets.mj_per_inference))
    return t


def _shape(shape: Sequence[Any]) -> str:
    return f"[{','.join('?' if d is None else str(d) for d in shape)}]"


def _tensors(specs: Sequence[Any]) -> str:
    # Escaped: a table cell is rich markup, which would eat a shape such as [n,1,40] as a style tag.
    return escape(", ".join(f"{s.name}:{s.dtype}{_shape(s.shape)}" for s in specs))


def models_table(models: Sequence[ModelVersionView]) -> Table:
    t = Table(title=f"{len(models)} model version(s)", title_justify="left")
    for col in ("model", "version", "size", "opset", "inputs", "outputs", "sha256", "pushed"):
        t.add_column(col)
    for m in models:
        t.add_row(m.name, str(m.version), _size(m.size_bytes), _v(m.opset), _tensors(m.inputs), _tensors(m.outputs),
                  m.sha256[:12], ago(m.created_at))
    return t


def model_detail(m: ModelVersionView, versions: Sequence[ModelVersionView] = ()) -> Group:
    """One version: its facts, then its signature, one row per input and output with the full shape."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", escape(f"{m.name} v{m.version}"))
    facts.add_row("size", _size(m.size_bytes))
    facts.add_row("sha256", m.sha256)
    facts.add_row("opset", _v(m.opset))
    facts.add_row("pushed", f"{m.created_at.isoformat(timespec='seconds')} ({ago(m.created_at)})")
    if m.built_for_class or m.job_id is not None:
        facts.add_row("variant", escape(f"{_v(m.precision)} {_v(m.format)} for {_v(m.runtime)}, built for class "
                                        f"{_v(m.built_for_class)} by job {_v(m.job_id)}"))
    if versions:
        facts.add_row("versions", ", ".join(str(v.version) for v in versions))
    sig = Table(title="signature", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        sig.add_column(col)
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for spec in specs:
            sig.add_row(kind, escape(spec.name), escape(spec.dtype), escape(_shape(spec.shape)))
    sig.caption = "? or a name: a dynamic dimension"
    return Group(facts, sig)


def deployment_summary(d: DeploymentView) -> Group:
    head = Text.assemble(
        ("deployed ", ""), (f"{d.model} v{d.version}", "bold"), (f" to {d.target_kind} {d.target}: ", ""),
        (f"{len(d.devices)} device(s)", "bold"), (f" [deployment {d.id}]", "dim"),
    )
    t = Table(title="bundles", title_justify="left")
    for col in ("class", "target", "size", "sha256"):
        t.add_column(col)
    for b in d.bundles:
        t.add_row(b.device_class, b.target_path, _size(b.size_bytes), b.sha256[:12])
    parts: list[Any] = [head, t]
    budgets = _budgets(d)
    if budgets != DASH:
        parts.append(Text(f"budgets: {budgets} (over the class's)"))
    if d.devices:
        parts.append(Text("devices: " + ", ".join(d.devices)))
    return Group(*parts)


def _budgets(d: DeploymentView) -> str:
    parts = [f"p95 {d.p95_ms:g} ms" if d.p95_ms is not None else "",
             f"{d.mj_per_inference:g} mJ/inf" if d.mj_per_inference is not None else ""]
    return ", ".join(p for p in parts if p) or DASH


def deployments_table(deployments: Sequence[DeploymentView]) -> Table:
    t = Table(title=f"{len(deployments)} deployment(s)", title_justify="left")
    for col in ("id", "model", "version", "target", "devices", "classes", "budgets", "created"):
        t.add_column(col)
    for d in deployments:
        t.add_row(str(d.id), d.model, str(d.version), f"{d.target_kind}:{d.target}", str(len(d.devices)),
                  ",".join(sorted({b.device_class for b in d.bundles})) or DASH, _budgets(d), ago(d.created_at))
    return t


def status_table(rows: Sequence[DeviceStatusRow]) -> Table:
    t = Table(title=f"fleet status: {len(rows)} row(s)", title_justify="left")
    # An inference is a row: a request of 1,200 rows is 1,200 inferences, so ms/inf and mJ/inf are per row and
    # p50/p95 per request (of inf/req rows on average).
    for col in ("device", "class", "model", "desired", "active", "state", "last seen", "p50 ms/req", "p95 ms/req",
                "ms/inf", "mJ/inf", "inf/kWh", "inf/req", "energy", "offload"):
        t.add_column(col)
    for r in rows:
        state = Text(r.state, style=_STATE_STYLE.get(r.state, ""))
        if r.error:
            state.append(f" ({r.error})", style="red")
        seen = Text(ago(r.last_seen), style="" if r.online else "red")
        batch = r.rows / r.requests if r.rows is not None and r.requests else None
        t.add_row(r.device_id, r.device_class, _v(r.model), _v(r.desired_version), _v(r.active_version), state, seen,
                  num(r.p50_ms, 2), num(r.p95_ms, 2), num(r.row_ms, 3), num(r.row_mj, 3),
                  si(r.inferences_per_kwh), num(batch, 1), _v(r.energy_source), offload_cell(r))
    return t


def offload_cell(r: DeviceStatusRow) -> str:
    """"12% cloud: local_p95_over_budget 40, low_confidence 8": the share offloaded and the policy's top reasons."""
    if r.offload_share is None:
        return DASH
    top = sorted(r.offload_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    why = ", ".join(f"{reason} {n}" for reason, n in top)
    return f"{r.offload_share:.0%} cloud" + (f": {why}" if why else "")


def si(value: float | None) -> str:
    """3 significant digits with k/M/G/T: 6.1G inferences per kWh reads, 6101694915 does not."""
    if value is None:
        return DASH
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def token_panel(tok: EnrollmentTokenView) -> Group:
    return Group(
        Text("enrollment token (shown once; put it in the agent's config as enrollment_token):"),
        Text(tok.token, style="bold"),
        Text(f"expires {tok.expires_at.isoformat(timespec='seconds')}" + (f"; note: {tok.note}" if tok.note else ""),
             style="dim"),
    )


def tokens_table(tokens: Sequence[TokenView]) -> Table:
    t = Table(title=f"{len(tokens)} token(s)", title_justify="left")
    for col in ("id", "kind", "device", "note", "created", "expires"):
        t.add_column(col)
    for tok in tokens:
        expires = DASH if tok.expires_at is None else tok.expires_at.isoformat(timespec="seconds")
        t.add_row(str(tok.id), tok.kind, tok.device_id or DASH, tok.note or DASH,
                  tok.created_at.isoformat(timespec="seconds"),
                  Text(f"{expires} (expired)", style="red") if tok.expired else expires)
    t.caption = "revoke with `fleet tokens revoke ID`; the tokens themselves are never stored"
    return t


def stats_table(stats: StatsView) -> Table | Group:
    t = Table(title="cloud counters", title_justify="left")
    t.add_column("counter")
    t.add_column("value", justify="right")
    for k, v in sorted(stats.counters.items()):
        t.add_row(k, str(v))
    e = stats.efficiency
    if e is None:  # an older cloud
        return t
    totals = Table(title=f"fleet efficiency, last {_v(stats.window_s)} s", title_justify="left")
    totals.add_column("figure")
    totals.add_column("value", justify="right")
    source = e.energy_source + (f" ({e.measured_share:.0%} measured)" if e.energy_source == "mixed"
                                and e.measured_share is not None else "")
    share = DASH if e.offload_share is None else f"{e.offload_share:.1%}"
    for name, value in (("inferences", str(e.inferences)), ("offloaded", f"{e.offloaded} ({share})"),
                        ("energy kWh", f"{e.energy_kwh:.6g}"), ("energy source", source),
                        ("mJ/inference", num(e.mj_per_inference, 3)), ("inferences/kWh", si(e.inferences_per_kwh)),
                        ("energy cost", f"{e.energy_cost:.6g}"), ("offload cost", f"{e.offload_cost:.6g}"),
                        ("total cost", f"{e.total_cost:.6g}"), ("cost/1M inferences", si(e.cost_per_million))):
        totals.add_row(name, value)
    if stats.prices is not None:
        totals.caption = (f"at {stats.prices.energy_price_per_kwh:g} per kWh and "
                          f"{stats.prices.offload_price_per_million:g} per 1M offloaded (the cloud's currency)")
    return Group(t, totals)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


__all__ = [
    "ago", "classes_table", "deployment_summary", "deployments_table", "device_detail", "devices_table",
    "model_detail", "models_table", "si", "stats_table", "status_table", "to_json", "token_panel",
]
