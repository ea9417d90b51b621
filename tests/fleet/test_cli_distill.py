"""fleet/commands_distill.py through typer's CliRunner against the real cloud (tests/cloud_server.py): submitting,
following and cancelling jobs, refusals as one line with exit 2, and a whole `fleet distill --wait` with a real
worker process, then its report, plot and the class's predicted-against-measured view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edgefleet.fleet.commands_distill import _outcome, parse_budgets
from edgefleet.fleet.errors import Rejected
from edgefleet.protos.jobs import JobView
from edgefleet.protos.messages import Budgets
from tests.job_kinds import tiny_teacher, tiny_transfer


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[str, str]:
    teacher, data = tmp_path / "teacher.onnx", tmp_path / "transfer.npz"
    teacher.write_bytes(tiny_teacher())
    data.write_bytes(tiny_transfer())
    return str(teacher), str(data)


@pytest.mark.parametrize("given, expected", [
    ([], {}),
    (["rpi4:p95_ms=20,mj=5"], {"rpi4": Budgets(p95_latency_ms=20, mj_per_inference=5)}),
    (["rpi4:p95_ms=20", "rpi4:mb=2", "rpi5:mj_per_inference=1"],
     {"rpi4": Budgets(p95_latency_ms=20, model_mb=2), "rpi5": Budgets(mj_per_inference=1)}),
])
def test_parse_budgets(given, expected):
    assert parse_budgets(given) == expected


@pytest.mark.parametrize("bad", ["rpi4", "rpi4:", "rpi4:fast=1", "rpi4:p95_ms=quick", ":p95_ms=1"])
def test_parse_budgets_refuses(bad):
    import typer

    with pytest.raises(typer.BadParameter):
        parse_budgets([bad])


def test_a_failed_or_cancelled_job_is_one_error(capsys):
    now = datetime.now(timezone.utc)
    base = dict(id=7, kind="distill", stage="teacher", progress=0.1, attempts=1, max_attempts=3, spec={},
                created_at=now)
    with pytest.raises(Rejected, match="job 7 failed: distill spec: transfer set has NaN"):
        _outcome(None, JobView(**base, state="failed", error="distill spec: transfer set has NaN"), False)
    with pytest.raises(Rejected, match="job 7 was cancelled"):
        _outcome(None, JobView(**base, state="cancelled"), True)
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"  # --json prints the view, then fails


def test_submit_without_waiting_then_jobs_commands(cli, inputs):
    teacher, data = inputs
    out = cli.ok("distill", teacher, "--data", data, "--classes", "x86-cpu,rpi4", "--name", "tiny", "--budget",
                 "rpi4:p95_ms=20", "--max-epochs", "3", "--no-wait", "--json").stdout
    job = JobView.model_validate_json(out)
    assert job.state == "queued" and job.spec["distill"]["budgets"] == {
        "rpi4": {"p95_latency_ms": 20.0, "mj_per_inference": None, "model_mb": None}}
    assert "tiny" in cli.ok("jobs", "list").stdout
    assert [j["id"] for j in json.loads(cli.ok("jobs", "--json").stdout)] == [job.id]
    assert "queued" in cli.ok("jobs", "show", str(job.id)).stdout
    assert "queued (distill)" in cli.ok("jobs", "logs", str(job.id)).stdout
    assert "queued" in cli.fails("jobs", "report", str(job.id))
    assert "cancelled" in cli.ok("jobs", "cancel", str(job.id)).stdout
    assert "cancelled before it started" in cli.ok("jobs", "logs", str(job.id), "--follow").stdout
    assert "no job 99" in cli.fails("jobs", "show", "99")


def test_refusals_are_one_line(cli, inputs, tmp_path: Path):
    teacher, data = inputs
    assert "unknown device class 'nope'" in cli.fails("distill", teacher, "--data", data, "--classes", "nope",
                                                      "--name", "tiny", "--no-wait")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(tiny_transfer(n_in=5))
    assert "error:" in cli.fails("distill", teacher, "--data", str(bad), "--classes", "rpi4", "--name", "tiny")
    assert "no variants built" in cli.ok("classes", "show", "rpi4").stdout
    assert "no telemetry" in cli.fails("classes", "refit", "rpi4")


def test_distill_waits_and_prints_the_report(cli, cloud, inputs, tmp_path: Path):
    teacher, data = inputs
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_DATABASE_URL": cloud.settings.database_url, "EDGEFLEET_WORKER_POLL_S": "0.1"}
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([sys.executable, "-m", "edgefleet.cloud.main", "worker", "--data-dir",
                               str(cloud.data_dir), "--id", "w1"], stdout=log, stderr=log, env=env)
    try:
        result = cli.ok("distill", teacher, "--data", data, "--classes", "x86-cpu", "--name", "tiny",
                        "--max-epochs", "4")
        out = result.stdout
        assert "x86-cpu" in out and "teacher" in out and "student" in out
        assert "deploy with: fleet deploy tiny --version 1 --class x86-cpu" in out
        job_id = json.loads(cli.ok("jobs", "--json").stdout)[0]["id"]
        assert f"fleet jobs plot {job_id} -o plot.svg" in out
        assert "job 1: " in result.stderr  # progress lines (no terminal: one per stage)
        report = json.loads(cli.ok("jobs", "report", str(job_id), "--json").stdout)
        assert report["kind"] == "distill_report" and "x86-cpu" in report["classes"]
        svg = tmp_path / "plot.svg"
        cli.ok("jobs", "plot", str(job_id), "-o", str(svg))
        assert svg.read_bytes().lstrip().startswith(b"<")
        assert "succeeded" in cli.ok("jobs", "logs", str(job_id), "--follow").stdout
        shown = cli.ok("classes", "show", "x86-cpu").stdout
        assert "tiny" in shown and "calibration" in shown
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
