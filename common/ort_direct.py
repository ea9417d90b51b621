"""ONNX Runtime's C session called directly: the hot path of every local inference (the agent's OnnxRuntime and the
SDK's embedded client). Imports nothing but onnxruntime, and that only when a run function is made, so the SDK
loads no pydantic through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def direct_run(session: Any) -> Callable[[dict[str, Any]], list[Any]]:
    """`session.run(None, feed)` without the Python wrapper's per-call checks: its C session's own `run`.

    The wrapper (onnxruntime_inference_collection.py) validates graph capture, the feed's names and OrtValue
    ownership in Python on every call, then calls `session._sess.run(output_names, feed, run_options)`; on the
    digits MLP that is 7.5 us a call against 5.3 direct, on a model whose own run is ~15 us. The C session checks
    names, dtypes and shapes itself (INVALID_ARGUMENT, as through the wrapper). What it does not check well is a
    missing input (a kernel's "Missing Input", logged at error level): a feed without every input goes through the
    wrapper and gets its message. An execution provider failing (EPFail, e.g. CUDA out of memory) goes through the
    wrapper too, which falls back to its fallback providers and builds a new C session, which is taken from then
    on. Any onnxruntime without `_sess` (a private attribute, stable since 1.0) gets the wrapper every time."""
    if not callable(getattr(getattr(session, "_sess", None), "run", None)):
        return lambda feed: session.run(None, feed)
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    names = [o.name for o in session.get_outputs()]
    required = frozenset(i.name for i in session.get_inputs())
    c_run = session._sess.run

    def run(feed: dict[str, Any]) -> list[Any]:
        nonlocal c_run
        if not required.issubset(feed):
            return session.run(None, feed)  # ValueError naming the missing inputs
        try:
            return c_run(names, feed, None)
        except EPFail:
            result = session.run(None, feed)
            c_run = session._sess.run  # set_providers made a new C session
            return result

    return run


__all__ = ["direct_run"]
