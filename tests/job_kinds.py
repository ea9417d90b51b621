"""Test-only job kinds, registered into `edgefleet.cloud.worker.KINDS` on import: in-process by the worker tests, and
in real worker processes with `edgefleet-cloud worker --plugin tests.job_kinds` (PYTHONPATH=the repo root).

    test-echo   returns {"echo": spec}; with spec["fail"] = "invalid" raises Invalid, "crash" raises ValueError
    test-spin   reports progress until stopped (cancel, lost lease, shutdown); logs through edgefleet.cloud.distill
    test-gate   attempt 1 reports "gated" and then waits (a bound of 120 s) for a file that never comes, so a test
                can SIGKILL its worker mid-job; later attempts report steps and succeed with {"attempt": n}
    distill     the real distillation, except that attempt 1 blocks (as test-gate does) once training is a third
                done, so that a test kills a worker that is really training; later attempts run straight through

    tiny_teacher() -> bytes, tiny_transfer(...) -> bytes: a linear ONNX teacher (input [N, 8] -> logits [N, 3]) and
    a 240-row transfer set for it, so that a real distillation in a test takes seconds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from edgefleet.cloud.errors import Invalid
from edgefleet.cloud.worker import JobContext, register_kind

# 120 s: longer than any test waits before killing the worker; an orphan never outlives the test run by much.
GATE_WAIT_S = 120.0


def echo(fleet: Any, ctx: JobContext) -> dict:
    fail = ctx.job.spec.get("fail")
    ctx.progress("echo", 0.5)
    if fail == "invalid":
        raise Invalid("the spec asked to fail: fix the spec")
    if fail == "crash":
        raise ValueError("boom")
    return {"echo": ctx.job.spec}


def spin(fleet: Any, ctx: JobContext) -> dict:
    logging.getLogger("edgefleet.cloud.distill.test").info("spinning up")
    deadline = time.monotonic() + GATE_WAIT_S
    while time.monotonic() < deadline:
        ctx.progress("spin", 0.5)
        time.sleep(0.01)  # the job's own "work"; the test waits on conditions, not on this
    return {"spun": True}


def _block(ctx: JobContext, stage: str) -> None:
    ctx.progress(stage, 0.5)
    gate = Path(ctx.job.spec.get("gate", "/nonexistent"))
    deadline = time.monotonic() + GATE_WAIT_S
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def gate(fleet: Any, ctx: JobContext) -> dict:
    if ctx.attempt == 1:
        _block(ctx, "gated")
    for step in range(3):
        ctx.progress(f"step {step}", (step + 1) / 3)
    return {"attempt": ctx.attempt, "worker": ctx.worker_id}


class _BlockingContext:
    """A JobContext whose first attempt stops for good once training passes a third of the job."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def progress(self, stage: str, fraction: float) -> None:
        self._ctx.progress(stage, fraction)
        if self._ctx.attempt == 1 and fraction > 0.3:
            _block(self._ctx, f"killable: {stage}")


def gated_distill(fleet: Any, ctx: JobContext) -> dict:
    from edgefleet.cloud.services_distill import run_distill_job

    return run_distill_job(fleet, _BlockingContext(ctx))  # type: ignore[arg-type]


def tiny_teacher(n_in: int = 8, n_out: int = 3, seed: int = 0, hidden: int = 256) -> bytes:
    """A random two-layer MLP teacher (Gemm, Relu, Gemm): about 2.8k MACs at the defaults, so the smallest students
    (a few hundred MACs) are cheaper than it and can ship; no student costlier than its teacher ever does."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W1", "B1"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
         helper.make_node("Gemm", ["hr", "W2", "B2"], ["logits"])], "tiny-teacher",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array((rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32), "W1"),
         numpy_helper.from_array(np.zeros(hidden, np.float32), "B1"),
         numpy_helper.from_array((rng.standard_normal((hidden, n_out)) * 4 / np.sqrt(hidden)).astype(np.float32),
                                 "W2"),
         numpy_helper.from_array(np.zeros(n_out, np.float32), "B2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def tiny_transfer(rows: int = 240, n_in: int = 8, seed: int = 1, **extra: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(seed).standard_normal((rows, n_in)).astype(np.float32), **extra)
    return buf.getvalue()


register_kind("test-echo", echo)
register_kind("test-spin", spin)
register_kind("test-gate", gate)


def install_gated_distill() -> None:
    """Replace "distill" in this process (only the worker that is to be killed loads it)."""
    register_kind("distill", gated_distill)


if os.environ.get("EDGEFLEET_TEST_GATED_DISTILL") == "1":
    install_gated_distill()
