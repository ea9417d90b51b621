"""`fleet distill`, `fleet jobs ...` and `fleet classes show|refit`: distillation from the operator's seat.

Theory: like every command, these parse, call `FleetClient`, render. `fleet distill` uploads teacher and transfer
set with the spec, then (with --wait, the default) polls the job and draws one progress bar on stderr whose label is
the job's current stage; without a terminal it prints each new stage as a line instead. At the end it prints the
report per class (teacher against the chosen student) and the versions built, ready for `fleet deploy`. A job that
fails or is cancelled is an error: one line (the job's own reason) and exit 2, via the CLI's one error mapping.

Registered into the root app by fleet/main.py; `_client` and `_emit` are looked up there at call time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from edgefleet.fleet import render, render_jobs
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.errors import Rejected
from edgefleet.protos.jobs import DistillSubmit, JobView
from edgefleet.protos.messages import Budgets

# 0.5 s: a stage of a small distillation lasts seconds; polling faster only loads the cloud.
POLL_S = 0.5
_BUDGET_KEYS = {"p95_ms": "p95_latency_ms", "p95_latency_ms": "p95_latency_ms", "mj": "mj_per_inference",
                "mj_per_inference": "mj_per_inference", "mb": "model_mb", "model_mb": "model_mb"}

jobs_app = typer.Typer(help="Background jobs (distillations). Alone, `fleet jobs` lists them.")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON view instead of a table.")]
JobId = Annotated[int, typer.Argument(metavar="ID", help="The job id (from `fleet jobs list`).")]


def _client(ctx: typer.Context) -> FleetClient:
    from edgefleet.fleet.main import _client as client

    return client(ctx)


def _emit(as_json: bool, value: Any, table: Any) -> None:
    from edgefleet.fleet.main import _emit as emit

    emit(as_json, value, table)


def parse_budgets(values: list[str]) -> dict[str, Budgets]:
    """`rpi4:p95_ms=20,mj=5` -> {"rpi4": Budgets(p95_latency_ms=20, mj_per_inference=5)}."""
    out: dict[str, Budgets] = {}
    for value in values:
        cls, sep, rest = value.partition(":")
        if not sep or not cls or not rest:
            raise typer.BadParameter(f"{value!r}: use CLASS:KEY=VALUE[,KEY=VALUE], e.g. rpi4:p95_ms=20,mj=5",
                                     param_hint="--budget")
        fields: dict[str, float] = {}
        for pair in rest.split(","):
            key, eq, number = pair.partition("=")
            if not eq or key.strip() not in _BUDGET_KEYS:
                raise typer.BadParameter(f"{pair!r}: keys are p95_ms, mj and mb (e.g. p95_ms=20)",
                                         param_hint="--budget")
            try:
                fields[_BUDGET_KEYS[key.strip()]] = float(number)
            except ValueError:
                raise typer.BadParameter(f"{pair!r}: {number!r} is not a number", param_hint="--budget") from None
        out[cls.strip()] = Budgets(**{**(out[cls.strip()].model_dump(exclude_none=True) if cls.strip() in out
                                         else {}), **fields})
    return out


def wait_for_job(client: FleetClient, job: JobView, *, quiet: bool = False) -> JobView:
    """Poll until the job finishes, showing its stage and progress on stderr."""
    err = Console(stderr=True)
    if quiet:
        while not job.finished:
            time.sleep(POLL_S)
            job = client.get_job(job.id)
        return job
    if not err.is_terminal:  # logs and pipes: one line per stage, no redrawn bar
        stage = None
        while True:
            if job.stage != stage:
                stage = job.stage
                err.print(f"job {job.id}: {job.state}, {stage} ({job.progress:.0%})", highlight=False)
            if job.finished:
                return job
            time.sleep(POLL_S)
            job = client.get_job(job.id)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"job {job.id}: {job.state}", total=1.0)
        while True:
            bar.update(task, completed=job.progress, description=f"job {job.id}: {job.state}, {job.stage}")
            if job.finished:
                return job
            time.sleep(POLL_S)
            job = client.get_job(job.id)


def _outcome(client: FleetClient, job: JobView, as_json: bool) -> None:
    """Print a finished job; a failed or cancelled one raises (exit 2 with its reason)."""
    if as_json:
        typer.echo(render.to_json(job))
    if job.state == "failed":
        raise Rejected(f"job {job.id} failed: {job.error}")
    if job.state == "cancelled":
        raise Rejected(f"job {job.id} was cancelled")
    if as_json:
        return
    out = Console()
    if job.has_report:
        report = client.job_report(job.id)
        out.print(render_jobs.report_tables(report))
        for warning in report.warnings:  # on stderr too, where a script that reads stdout still shows them
            typer.echo(f"warning: {warning}", err=True)
    out.print(render_jobs.job_detail(job))
    for v in job.versions:
        out.print(f"deploy with: fleet deploy {v.model} --version {v.version} --class {v.device_class}",
                  highlight=False)
    if job.has_plot:
        out.print(f"plot (accuracy against mJ/inference): fleet jobs plot {job.id} -o plot.svg", highlight=False)


def distill(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Argument(metavar="TEACHER.onnx", help="The teacher model.", exists=True,
                                            dir_okay=False, readable=True)],
    data: Annotated[Path, typer.Option("--data", help="Transfer set: .npz with x (and optionally y).", exists=True,
                                       dir_okay=False, readable=True)],
    classes: Annotated[str, typer.Option("--classes", help="Comma-separated device classes, e.g. rpi4,rpi5.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name the built variants become versions of.")],
    task: Annotated[str, typer.Option("--task", help="classification or regression.")] = "classification",
    budget: Annotated[list[str] | None, typer.Option("--budget", metavar="CLASS:KEY=V,...",
                                                        help="Override budgets: p95_ms, mj, mb (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the training.")] = 0,
    max_epochs: Annotated[int | None, typer.Option("--max-epochs", min=1, help="Cap on epochs per student.")]
    = None,
    test: Annotated[Path | None, typer.Option(
        "--test", help="A labelled test set (.npz with x and y) of rows no model saw: teacher and every candidate "
        "are ranked on it. Without one, the report says its held-out figures may flatter.", exists=True,
        dir_okay=False, readable=True)] = None,
    objective: Annotated[str, typer.Option(
        "--objective", help="efficiency: the least predicted mJ/inference within --max-accuracy-drop points of the "
        "teacher; accuracy: the best score within the budgets.")] = "efficiency",
    max_accuracy_drop: Annotated[float, typer.Option(
        "--max-accuracy-drop", metavar="PT", min=0, max=100,
        help="Points of accuracy the efficiency objective may give up against the teacher.")] = 1.0,
    augment: Annotated[str, typer.Option(
        "--augment", help="Synthetic training rows labelled by the teacher (MUNGE for tables, mixup, shifts and "
        "noise for signals and images): auto (below 1000 rows), on or off.")] = "auto",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job to its end (default).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Distil a teacher into a budget-fitting student per device class; each becomes a version of --name."""
    wanted = [c.strip() for c in classes.split(",") if c.strip()]
    if not wanted:
        raise typer.BadParameter("name at least one class, e.g. --classes rpi4,rpi5", param_hint="--classes")
    if task not in ("classification", "regression"):
        raise typer.BadParameter("classification or regression", param_hint="--task")
    if objective not in ("accuracy", "efficiency"):
        raise typer.BadParameter("efficiency or accuracy", param_hint="--objective")
    if augment not in ("auto", "on", "off"):
        raise typer.BadParameter("auto, on or off", param_hint="--augment")
    spec = DistillSubmit(name=name, classes=wanted, task=task, budgets=parse_budgets(budget or []), seed=seed,
                         max_epochs=max_epochs, objective=objective, max_accuracy_drop=max_accuracy_drop,
                         augment=augment)
    client = _client(ctx)
    job = client.submit_distill(teacher, data, spec, test=test)
    if not wait:
        _emit(as_json, job, render_jobs.job_detail(job))
        return
    if not as_json:
        Console(stderr=True).print(f"job {job.id} queued; waiting for a worker (`edgefleet-cloud worker`)",
                                   highlight=False)
    try:
        job = wait_for_job(client, job, quiet=as_json)
    except KeyboardInterrupt:
        typer.echo(f"stopped waiting; job {job.id} goes on: fleet jobs show {job.id}", err=True)
        raise typer.Exit(130) from None
    _outcome(client, job, as_json)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context, state: Annotated[str | None, typer.Option(
        "--state", help="queued, running, succeeded, failed or cancelled.")] = None, as_json: JsonOpt = False) -> None:
    """List jobs, newest first: state, stage, progress, attempts, worker."""
    jobs = _client(ctx).list_jobs(state)
    _emit(as_json, jobs, render_jobs.jobs_table(jobs))


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """One job: state, stage, attempts, error, and the versions it built."""
    job = _client(ctx).get_job(job_id)
    _emit(as_json, job, render_jobs.job_detail(job))


@jobs_app.command("logs")
def jobs_logs(ctx: typer.Context, job_id: JobId,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")]
              = False,
              since: Annotated[int, typer.Option("--since", min=0, help="Skip this many lines.")] = 0) -> None:
    """Print the job's log (stages, progress, messages); --follow while it runs."""
    client = _client(ctx)
    while True:
        view = client.job_logs(job_id, since)
        for line in render_jobs.log_lines(view):
            typer.echo(line)
        since = view.next
        if not follow or (view.state in ("succeeded", "failed", "cancelled") and not view.lines):
            return
        if not view.lines:
            time.sleep(POLL_S)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """Cancel a job: at once when queued, at its next progress report when running."""
    job = _client(ctx).cancel_job(job_id)
    _emit(as_json, job, render_jobs.job_detail(job))


@jobs_app.command("report")
def jobs_report(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """The distillation report: per class, teacher against the chosen student, and why."""
    report = _client(ctx).job_report(job_id)
    _emit(as_json, report, render_jobs.report_tables(report))


@jobs_app.command("plot")
def jobs_plot(ctx: typer.Context, job_id: JobId,
              output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the SVG.")]
              = Path("plot.svg")) -> None:
    """Save the job's plot (accuracy against mJ/inference per candidate and class) as SVG."""
    svg = _client(ctx).job_plot(job_id)
    try:
        output.write_bytes(svg)
    except OSError as exc:
        raise Rejected(f"cannot write {output}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {output} ({len(svg)} bytes)")


def classes_show(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="A class name.")],
                 as_json: JsonOpt = False) -> None:
    """A class: facts, the cost-model calibration in use, predicted against measured per deployed variant."""
    detail = _client(ctx).class_detail(name)
    _emit(as_json, detail, render_jobs.class_detail(detail))


def classes_refit(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME", help="A class name.")],
                  accept: Annotated[bool, typer.Option(
                      "--accept", help="Apply the refit even if it moves a figure (throughput, watts) by more than "
                      "the cloud's factor (3x); without it such a refit is shown and held.")] = False,
                  as_json: JsonOpt = False) -> None:
    """Refit the class's cost model from its deployed variants' telemetry, per inference; later distillations use
    it. A refit that moves the class too far is shown and held until you run it again with --accept."""
    view = _client(ctx).refit_calibration(name, accept=accept)
    _emit(as_json, view, render_jobs.refit_detail(view))
    if not view.applied and not as_json:
        typer.echo(f"warning: refit of {view.device_class} held, not applied: {'; '.join(view.held)}", err=True)


def register(app: typer.Typer, classes_app: typer.Typer) -> None:
    app.command("distill")(distill)
    app.add_typer(jobs_app, name="jobs")
    classes_app.command("show")(classes_show)
    classes_app.command("refit")(classes_refit)

    @jobs_app.callback(invoke_without_command=True)
    def _default(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        if ctx.invoked_subcommand is None:
            jobs_list(ctx, None, as_json)


__all__ = ["jobs_app", "parse_budgets", "register", "wait_for_job"]
