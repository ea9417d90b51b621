"""`Client.standalone(...)`: no agent. The model runs in the app's process; the agent's own offload policy decides
each request; what must go to the cloud goes straight to its Open Inference Protocol server.

    app = Client.standalone("digits.onnx", cloud_url="https://cloud.example:8000", token=device_token,
                            budgets={"p95_ms": 5.0})
    result = app.infer("digits", x, deadline_ms=20)

Theory: this is the agent's router (edge_agent/offload.py) cut down to one model and no telemetry, built from the
same pure parts, so a decision here is the decision the agent would make: `offload_policy.decide` over
`offload_state.OffloadState` (latency window, RTT estimate, circuit breaker, energy window, hysteresis), and
`offload_client.OffloadClient` (binary OIP over a kept-alive connection per thread). A cloud call that fails falls
back to the local model (reason "cloud_failed_fallback") and feeds the breaker; the cascade (`cascade_threshold`)
asks the cloud about a doubtful local answer, as the agent does.

Without `cloud_url` nothing can go anywhere, so the hot path skips the policy (its answer would be
"offload_disabled" every time) and adds to `session.run` only two clock reads, a dict and two tuples (bench:
about 1 us). Inputs are not checked before the run: ONNX Runtime checks names, dtypes and shapes itself, and only
when it refuses does `oip_codec.check_inputs` build the message (InvalidInput) that names the model's signature.
onnxruntime and the agent's modules load when a standalone client is made, not when the SDK is imported.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.common.ort_direct import direct_run
from edgefleet.sdk.client import Provenance, Result
from edgefleet.sdk.errors import InvalidInput, ModelUnknown

_tuple_new = tuple.__new__
_perf = time.perf_counter


class Standalone:
    """One model in this process. `name`: the model's name on the cloud (default: the file's stem); `budgets`: an
    offload_policy.Budgets or a dict of its fields; `active_watts`: a power figure for estimated energy (None: no
    energy figure); `version`: the version reported in provenance."""

    def __init__(self, model_path: str | os.PathLike[str], *, cloud_url: str | None = None, token: str | None = None,
                 name: str | None = None, version: Any = None, budgets: Any = None, timeout_s: float = 2.0,
                 connect_timeout_s: float = 0.5, active_watts: float | None = None, intra_op_threads: int = 0,
                 cascade_threshold: float | None = None, cascade_metric: str = "max_prob",
                 cascade_output: str = "") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise InvalidInput("standalone mode runs the model with ONNX Runtime: pip install onnxruntime") from None
        path = Path(model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own pybind11 types; wrapped here
            raise ModelUnknown(f"cannot load {path} with ONNX Runtime: {str(exc).splitlines()[0] if str(exc) else exc}"
                               "; give the path of a valid .onnx file") from None
        self.name = name or path.stem
        self.version = version
        self.variant = "embedded"
        self._inputs = self.session.get_inputs()
        self._output_names = tuple(o.name for o in self.session.get_outputs())
        self._only = self._inputs[0].name if len(self._inputs) == 1 else None
        self._run = direct_run(self.session)  # common/ort_direct.py: 2 us a call under the wrapper
        self.active_watts = active_watts
        self._energy_source = "estimated" if active_watts is not None else "none"
        self.client = None
        if cloud_url:
            from edgefleet.edge_agent import offload_policy as policy
            from edgefleet.edge_agent.offload_client import OffloadClient
            from edgefleet.edge_agent.offload_state import CircuitBreaker, OffloadState

            self._policy = policy
            self.client = OffloadClient(cloud_url, token=token or "", connect_timeout_s=connect_timeout_s,
                                        timeout_s=timeout_s)
            self.state = OffloadState(breaker=CircuitBreaker(probe_timeout_s=max(2 * timeout_s, 1.0)))
            if budgets is None:
                self.budgets = policy.Budgets()
            elif isinstance(budgets, dict):
                self.budgets = policy.Budgets(**budgets)
            else:
                self.budgets = budgets
            self.cascade_threshold = cascade_threshold
            self.cascade_metric, self.cascade_output = cascade_metric, cascade_output
            self._lock = threading.Lock()

    # -- local ----------------------------------------------------------------------------------------------------

    def _feed(self, model: str, inputs: Any) -> dict[str, np.ndarray]:
        if model != self.name:
            raise ModelUnknown(f"this standalone client serves {self.name!r}, not {model!r}; make one "
                               f"Client.standalone(...) per model")
        if type(inputs) is np.ndarray:
            if self._only is None:
                names = ", ".join(i.name for i in self._inputs)
                raise InvalidInput(f"model {model!r} takes {len(self._inputs)} inputs ({names}); pass them as "
                                   "{name: array}")
            return {self._only: inputs}
        if not isinstance(inputs, dict):
            raise InvalidInput(f"inputs must be a numpy array or a dict of them, got {type(inputs).__name__}")
        return inputs

    def _local(self, feed: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, np.ndarray], float]:
        started = _perf()
        try:
            values = self._run(feed)
        except Exception as exc:  # noqa: BLE001 - ORT's own exception types; a refusal becomes InvalidInput
            raise self._refusal(feed, exc) from None
        latency_ms = (_perf() - started) * 1000.0
        result = dict(zip(self._output_names, values))
        if outputs is not None:
            unknown = [o for o in outputs if o not in result]
            if unknown:
                raise InvalidInput(f"unknown output(s) {unknown}; the model's outputs are "
                                   f"{list(self._output_names)}")
            result = {k: result[k] for k in outputs}
        return result, latency_ms

    def _refusal(self, feed: dict[str, Any], exc: Exception) -> InvalidInput:
        from edgefleet.common.oip_codec import OipError, check_inputs
        from edgefleet.common.runtimes.onnx import _spec

        try:
            check_inputs({k: np.asarray(v) for k, v in feed.items()}, [_spec(i) for i in self._inputs])
        except OipError as err:
            return InvalidInput(str(err), status=400)
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return InvalidInput(f"ONNX Runtime refused the inputs: {first}", status=400)

    def infer(self, model: str, inputs: dict[str, np.ndarray] | np.ndarray, deadline_ms: float | None = None,
              tier: str = "realtime", *, version: str | None = None, outputs: list[str] | None = None) -> Result:
        """As `Client.infer`; the model runs here unless the policy sends the request to the cloud."""
        if self.client is None and outputs is None and model == self.name and type(inputs) is np.ndarray \
                and self._only is not None:
            # The hot path, written out (each call saved is ~0.3 us here): one array, no cloud, every output.
            started = _perf()
            try:
                values = self._run({self._only: inputs})
            except Exception as exc:  # noqa: BLE001 - ORT's own exception types; a refusal becomes InvalidInput
                raise self._refusal({self._only: inputs}, exc) from None
            latency_ms = (_perf() - started) * 1000.0
            watts = self.active_watts
            return _tuple_new(Result, (dict(zip(self._output_names, values)), _tuple_new(Provenance, (
                "local", "offload_disabled", self.version, self.variant, latency_ms,
                None if watts is None else watts * latency_ms, self._energy_source, False, None))))
        feed = self._feed(model, inputs)
        if self.client is None:
            result, latency_ms = self._local(feed, outputs)
            watts = self.active_watts
            return _tuple_new(Result, (result, _tuple_new(Provenance, (
                "local", "offload_disabled", self.version, self.variant, latency_ms,
                None if watts is None else watts * latency_ms, self._energy_source, False, None))))
        return self._routed(feed, deadline_ms, tier, outputs)

    # -- with a cloud -----------------------------------------------------------------------------------------------

    def _routed(self, feed: dict[str, np.ndarray], deadline_ms: float | None, tier: str,
                outputs: list[str] | None) -> Result:
        p = self._policy
        if tier not in p.TIERS:
            raise InvalidInput(f"tier must be one of {', '.join(p.TIERS)}, got {tier!r}")
        request = p.Request(self.name, deadline_ms, tier)
        now = time.monotonic()
        with self._lock:
            obs = self.state.observe(self.name, True, True, now)
            decision = p.decide(request, obs, self.budgets, now)
            if not self.state.note_decision(self.name, decision, now):
                decision = p.Decision(p.LOCAL, p.CLOUD_UNREACHABLE)
        if decision.where == p.CLOUD:
            answer = self._cloud(feed, outputs, decision.reason)
            if answer is not None:
                return answer
            decision = p.Decision(p.LOCAL, p.CLOUD_FAILED_FALLBACK)
        cascade = self.cascade_threshold is not None and decision.reason != p.CLOUD_FAILED_FALLBACK
        with self._lock:
            self.state.local_started()
        try:
            result, latency_ms = self._local(feed, None if cascade else outputs)
        except BaseException:
            with self._lock:
                self.state.local_done(self.name, 0.0, None, None, 1, time.monotonic())
            raise
        energy_mj = None if self.active_watts is None else self.active_watts * latency_ms
        rows = _rows(feed)
        with self._lock:  # waited and busy are the same run here: no queue in front of this process's session
            self.state.local_done(self.name, latency_ms, latency_ms, energy_mj, rows, time.monotonic())
        reason, escalated = decision.reason, False
        if cascade:
            from edgefleet.edge_agent.confidence import confidence

            score = confidence(result, self.cascade_metric, self.cascade_output)
            if score is not None:
                with self._lock:
                    obs = self.state.observe(self.name, True, True, time.monotonic())
                step = p.escalate(request, obs, score < self.cascade_threshold, latency_ms)
                if step is not None and step.reason == p.LOW_CONFIDENCE:
                    answer = self._cloud(feed, outputs, p.LOW_CONFIDENCE, escalated=True, waited_ms=latency_ms,
                                         energy_mj=energy_mj)
                    if answer is not None:
                        return answer
                    reason = p.CLOUD_FAILED_FALLBACK
                elif step is not None:
                    reason = step.reason
            if outputs is not None:
                result = {k: result[k] for k in outputs}
        return _tuple_new(Result, (result, _tuple_new(Provenance, (
            "local", reason, self.version, self.variant, latency_ms, energy_mj, self._energy_source, escalated,
            None))))

    def _cloud(self, feed: dict[str, np.ndarray], outputs: list[str] | None, reason: str, *, escalated: bool = False,
               waited_ms: float = 0.0, energy_mj: float | None = None) -> Result | None:
        """The cloud's answer, or None to answer locally (the failure is fed to the breaker)."""
        from edgefleet.edge_agent.errors import CloudUnavailable, InferenceError, ModelNotFound

        assert self.client is not None
        started = _perf()
        try:
            reply = self.client.infer(self.name, {k: np.asarray(v) for k, v in feed.items()}, outputs=outputs)
        except ModelNotFound:
            with self._lock:
                self.state.cloud_lacks(self.name, time.monotonic())
            return None
        except CloudUnavailable:
            with self._lock:
                self.state.cloud_failed(time.monotonic())
            return None
        except InferenceError as exc:
            raise InvalidInput(str(exc), status=400) from None
        rtt_ms = (_perf() - started) * 1000.0
        params = reply.parameters
        service_ms = params.get("latency_ms") if isinstance(params.get("latency_ms"), (int, float)) else None
        with self._lock:
            self.state.cloud_done(self.name, rtt_ms, service_ms, time.monotonic())
        return _tuple_new(Result, (reply.outputs, _tuple_new(Provenance, (
            "cloud", reason, reply.model_version, str(params.get("variant", "cloud")), waited_ms + rtt_ms,
            energy_mj, self._energy_source if escalated else "none", escalated, params))))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> Standalone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(feed: dict[str, Any]) -> int:
    first = next(iter(feed.values()), None)
    shape = getattr(first, "shape", ())
    return max(1, int(shape[0])) if shape else 1


__all__ = ["Standalone"]
