"""The offload router: for each request, observe, `decide`, run local or cloud, update the state, answer.

Theory: offload_policy.decide is the brain and offload_state the memory, both pure; this is the I/O shell around
them, with the same call as the local service (`infer_arrays(name, inputs, *, version, outputs, deadline_ms,
tier) -> (outputs, parameters)`) so the local API and the SDK server call either. One lock guards the state for
the few microseconds of observe + decide + note; runs happen outside it, the local one on the InferenceService
(metered, recorded in telemetry as "local" by the service), the cloud one through `OffloadClient` (recorded here
as "cloud": round trip, ok or failed).

Every request gets an answer or a typed error: a cloud call that fails (CloudUnavailable, or 404 there) falls back
to the local model when the device has it (reason CLOUD_FAILED_FALLBACK) and feeds the breaker; a model only the
cloud has, with the breaker open, is refused at once with CloudUnavailable rather than after a timeout. The
cascade (offload.cascade_metric): a locally served request whose confidence (edge_agent/confidence.py) is below
the threshold goes to the cloud (`escalate`) and the reply says so (`escalated`, `confidence`).

`parameters` (the OIP response provenance): where, reason (offload_policy's closed set), model_version, variant,
latency_ms (what the caller waited: local run, or round trip, or both when escalated), energy_mj and
energy_source (the device's energy for this request: its local run; null/"none" for a cloud-only answer, whose
server's own figure, when it reports one, is cloud_energy_mj), escalated, confidence, and emulated_slowdown when
emulation is on (edge_agent/emulate.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgefleet.common.oip_codec import OipError, check_inputs
from edgefleet.edge_agent.confidence import confidence
from edgefleet.edge_agent.config import AgentConfig, OffloadConfig
from edgefleet.edge_agent.errors import CloudUnavailable, InferenceError, ModelNotFound
from edgefleet.edge_agent.inference import InferenceService, Loaded, batch_rows
from edgefleet.edge_agent.offload_client import OffloadClient
from edgefleet.edge_agent.offload_policy import (
    CLOSED,
    CLOUD_BREAKER_OPEN,
    CLOUD_FAILED_FALLBACK,
    CLOUD_UNREACHABLE,
    LOCAL,
    LOW_CONFIDENCE,
    LOW_CONFIDENCE_KEPT_LOCAL,
    OFFLOAD_DISABLED,
    TIERS,
    Budgets,
    Decision,
    Request,
    decide,
    escalate,
)
from edgefleet.edge_agent.offload_state import CircuitBreaker, OffloadState

log = logging.getLogger(__name__)
_UNREACHABLE = Decision(LOCAL, CLOUD_UNREACHABLE)
_DISABLED = Decision(LOCAL, OFFLOAD_DISABLED)
_FALLBACK = Decision(LOCAL, CLOUD_FAILED_FALLBACK)
_KEPT_LOCAL = Decision(LOCAL, LOW_CONFIDENCE_KEPT_LOCAL)


class Router:
    def __init__(self, service: InferenceService, client: OffloadClient | None,
                 config: OffloadConfig | None = None, *, telemetry: Any = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        config = config or OffloadConfig()
        self.service = service
        self.client = client
        self.config = config
        self.telemetry = telemetry
        self.monotonic = monotonic
        self.state = OffloadState(
            breaker=CircuitBreaker(config.breaker_failures, config.breaker_open_s, config.breaker_max_open_s,
                                   probe_timeout_s=max(config.timeout_ms / 1000.0 * 2, 1.0)),
            window=config.latency_window, window_s=config.latency_window_s)
        self.cascade = bool(config.cascade_metric) and config.cascade_threshold is not None
        self.slowdown = config.slowdown_factor
        self.emulate_class = config.emulate_class
        self.counts: dict[tuple[str, str], int] = {}  # (model, reason) -> requests, since start
        self._lock = threading.Lock()
        self._budgets: dict[tuple[str, int], Budgets] = {}
        self._deployed: dict[str, tuple[float | None, float | None]] = {}  # model -> deployment's (p95, mJ)
        self._token_from_config = bool(config.token)

    @classmethod
    def from_config(cls, config: AgentConfig, service: InferenceService, *, telemetry: Any = None,
                    device_token: str = "") -> Router:
        off = config.offload
        client = None
        if off.enabled:
            client = OffloadClient(off.url or config.cloud_url, token=off.token or device_token,
                                   connect_timeout_s=off.connect_timeout_ms / 1000.0,
                                   timeout_s=off.timeout_ms / 1000.0, binary=off.binary)
            log.info("offload to %s (%s bodies)%s", client.url, "binary" if off.binary else "JSON",
                     f", cascade on {off.cascade_metric} < {off.cascade_threshold:g}" if off.cascade_metric else "")
        return cls(service, client, off, telemetry=telemetry)

    def set_token(self, token: str) -> None:
        """The device token from enrollment; a token set in the config wins."""
        if self.client is not None and not self._token_from_config:
            self.client.set_token(token)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def set_deployment_budgets(self, budgets: dict[str, tuple[float | None, float | None]]) -> None:
        """Per model, the (p95 ms, mJ per inference) the accepted desired state's deployment sets (`fleet deploy
        --p95-ms --mj-per-inference`), over the manifest's class defaults; the config's own overrides still win."""
        with self._lock:
            if budgets != self._deployed:
                self._deployed = dict(budgets)
                self._budgets = {}  # worked out again on the next request

    # -- the request path ---------------------------------------------------------------------------------------------

    def budgets(self, name: str, loaded: Loaded | None) -> Budgets:
        """The config's overrides, over the deployment's, over the manifest's (the class's defaults); worked out
        once per model version and deployment."""
        key = (name, loaded.version if loaded is not None else -1)
        cached = self._budgets.get(key)
        if cached is not None:
            return cached
        c = self.config
        manifest = loaded.manifest.budgets if loaded is not None else None
        dep_p95, dep_mj = self._deployed.get(name, (None, None))
        budgets = Budgets(
            p95_ms=_first(c.p95_ms, dep_p95, manifest.p95_latency_ms if manifest else None),
            mj_per_inference=_first(c.mj_per_inference, dep_mj, manifest.mj_per_inference if manifest else None),
            energy_j_per_min=c.energy_j_per_min, hysteresis=c.hysteresis, min_dwell_s=c.min_dwell_s,
            local_probe_s=c.local_probe_s, local_parallel=c.local_parallel,
            cloud_recheck_s=c.cloud_recheck_s)
        self._budgets[key] = budgets
        return budgets

    def _count(self, name: str, reason: str) -> None:
        key = (name, reason)
        self.counts[key] = self.counts.get(key, 0) + 1

    def infer_arrays(self, name: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                     outputs: list[str] | None = None, deadline_ms: float | None = None,
                     tier: str = "realtime") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if tier not in TIERS:
            raise InferenceError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        if deadline_ms is not None and not (isinstance(deadline_ms, (int, float)) and deadline_ms > 0):
            raise InferenceError(f"deadline_ms must be a number of milliseconds > 0, got {deadline_ms!r}")
        # The service's own hot-path read (a dict lookup is atomic; activate swaps whole entries).
        loaded = self.service._models.get(name)
        local_ok = loaded is not None and (version is None or version == str(loaded.version))
        request = Request(name, deadline_ms, tier)
        if self.client is None:
            decision = _DISABLED  # decide's first rule, without observing anything
        else:
            now = self.monotonic()
            budgets = self._budgets.get((name, loaded.version if loaded is not None else -1)) or \
                self.budgets(name, loaded)
            with self._lock:
                obs = self.state.observe(name, local_ok, True, now, energy=budgets.energy_j_per_min is not None)
                decision = decide(request, obs, budgets, now)
                if not self.state.note_decision(name, decision, now):  # the probe slot went to another request
                    decision = _UNREACHABLE if local_ok else Decision("cloud", CLOUD_BREAKER_OPEN)
                if decision.where == LOCAL:  # counted before the lock goes: the next decision sees this run
                    self.state.local_started()
        try:
            if decision.reason == CLOUD_BREAKER_OPEN:
                raise CloudUnavailable(f"model {name!r}{_v(version)} is not on this device and the offload server "
                                       "is unreachable (circuit breaker open); retry in a few seconds")
            if decision.where == LOCAL:
                result, params = self._local(name, inputs, version, outputs, request, decision,
                                             counted=self.client is not None)
            else:
                if loaded is not None and local_ok and not loaded.fits(inputs):
                    _check(inputs, loaded)  # the device's own message, not a round trip's
                result, params = self._cloud(name, inputs, version, outputs, decision, loaded if local_ok else None)
        except Exception:
            with self._lock:
                self._count(name, decision.reason)
            raise
        with self._lock:  # the reason the reply carries, once per request
            self._count(name, params["reason"])
        if self.client is not None and self.telemetry is not None:  # and in the window that holds the request
            version_no = params.get("model_version")
            if params["where"] != LOCAL:
                version_no = self._telemetry_version(name, version, version_no)
            self.telemetry.count_reason(name, params["where"], params["reason"],
                                        version_no if isinstance(version_no, int) else None)
        return result, params

    def _local(self, name: str, inputs: dict[str, np.ndarray], version: str | None, outputs: list[str] | None,
               request: Request, decision: Decision, *,
               counted: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run on the device; `counted`: the run is already in the state's in-flight count."""
        cascade = self.cascade and decision.reason != CLOUD_FAILED_FALLBACK
        if not counted:
            with self._lock:
                self.state.local_started()
        started = time.perf_counter()
        try:
            result, prov = self.service.infer_arrays(name, inputs, version=version,
                                                     outputs=None if cascade else outputs)
        except BaseException:
            with self._lock:
                self.state.local_done(name, 0.0, None, None, 1, self.monotonic())
            raise
        waited_ms = (time.perf_counter() - started) * 1000.0
        rows = _rows(inputs, self.service._models.get(name))
        now = self.monotonic()
        with self._lock:
            self.state.local_done(name, waited_ms, prov.latency_ms, prov.energy_mj, rows, now,
                                  track_energy=self.config.energy_j_per_min is not None)
        params = {"where": LOCAL, "reason": decision.reason, "model_version": prov.model_version,
                  "variant": prov.variant, "latency_ms": round(waited_ms, 4),
                  "energy_mj": None if prov.energy_mj is None else round(prov.energy_mj, 6),
                  "energy_source": prov.energy_source, "escalated": False, "confidence": None}
        slowdown = self._emulated(name)
        if slowdown != 1.0:
            params["emulated_slowdown"] = slowdown
        if cascade:
            score = confidence(result, self.config.cascade_metric, self.config.cascade_output)
            params["confidence"] = None if score is None else round(score, 6)
            if score is not None:
                answer = self._escalate(name, inputs, version, outputs, request, score, waited_ms, params, now)
                if answer is not None:
                    return answer
            if outputs is not None:
                result = {k: result[k] for k in outputs}
        return result, params

    def _escalate(self, name: str, inputs: dict[str, np.ndarray], version: str | None, outputs: list[str] | None,
                  request: Request, score: float, waited_ms: float, params: dict[str, Any],
                  now: float) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The cascade: the cloud's answer for a doubtful local one, or None to keep the local answer (its
        `params` then say why when it was doubtful)."""
        threshold = self.config.cascade_threshold
        assert threshold is not None
        with self._lock:
            obs = self.state.observe(name, True, self.client is not None, now)
            step = escalate(request, obs, score < threshold, waited_ms)
            if step is not None and step.reason == LOW_CONFIDENCE and obs.breaker != CLOSED and \
                    not self.state.breaker.begin_probe(now):
                step = _KEPT_LOCAL
        if step is None:
            return None
        if step.reason != LOW_CONFIDENCE:
            params["reason"] = step.reason
            return None
        try:
            result, cloud = self._cloud_call(name, inputs, version, outputs)
        except (CloudUnavailable, ModelNotFound):
            params["reason"] = CLOUD_FAILED_FALLBACK
            return None
        cloud.update({"reason": LOW_CONFIDENCE, "escalated": True, "confidence": params["confidence"],
                      "latency_ms": round(waited_ms + cloud["latency_ms"], 4), "energy_mj": params["energy_mj"],
                      "energy_source": params["energy_source"]})
        slowdown = self._emulated(name)
        if slowdown != 1.0:
            cloud["emulated_slowdown"] = slowdown
        return result, cloud

    def _cloud(self, name: str, inputs: dict[str, np.ndarray], version: str | None, outputs: list[str] | None,
               decision: Decision, local: Loaded | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        try:
            result, params = self._cloud_call(name, inputs, version, outputs)
        except (CloudUnavailable, ModelNotFound) as exc:
            if local is None:
                raise
            log.debug("cloud inference of %s failed (%s); answering locally", name, exc)
            return self._local(name, inputs, version, outputs, Request(name), _FALLBACK)
        params["reason"] = decision.reason
        slowdown = self._emulated(name)
        if slowdown != 1.0:
            params["emulated_slowdown"] = slowdown
        return result, params

    def _emulated(self, name: str) -> float:
        """The slowdown this device emulates for `name`: the config's, or (emulate_class) the loaded model's own."""
        if not self.emulate_class:
            return self.slowdown
        loaded = self.service._models.get(name)
        return float(getattr(loaded.runtime, "factor", 1.0)) if loaded is not None else 1.0

    def _cloud_call(self, name: str, inputs: dict[str, np.ndarray], version: str | None,
                    outputs: list[str] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One request to the offload server, the state and telemetry updated whatever happens."""
        assert self.client is not None
        started = time.perf_counter()
        try:
            response = self.client.infer(name, inputs, version=version, outputs=outputs)
        except CloudUnavailable:
            self._cloud_record(name, (time.perf_counter() - started) * 1000.0, inputs, ok=False,
                               version=self._telemetry_version(name, version, None))
            with self._lock:
                self.state.cloud_failed(self.monotonic())
            raise
        except ModelNotFound:
            with self._lock:
                self.state.cloud_lacks(name, self.monotonic())
            raise
        except InferenceError:
            with self._lock:
                self.state.breaker.success(self.monotonic())  # it answered: the server is up
            raise
        rtt_ms = (time.perf_counter() - started) * 1000.0
        server = response.parameters
        service_ms = server.get("latency_ms")
        service_ms = float(service_ms) if isinstance(service_ms, (int, float)) else None
        with self._lock:
            self.state.cloud_done(name, rtt_ms, service_ms, self.monotonic())
        version_text = response.model_version
        self._cloud_record(name, rtt_ms, inputs, ok=True,
                           version=self._telemetry_version(name, version, version_text))
        params: dict[str, Any] = {
            "where": "cloud", "reason": "", "model_version": int(version_text) if version_text and
            version_text.isdigit() else version_text, "variant": server.get("variant") or "cloud",
            "latency_ms": round(rtt_ms, 4), "energy_mj": None, "energy_source": "none", "escalated": False,
            "confidence": None}
        if isinstance(server.get("energy_mj"), (int, float)):
            params["cloud_energy_mj"] = server["energy_mj"]
            params["cloud_energy_source"] = server.get("energy_source", "none")
        return response.outputs, params

    def _telemetry_version(self, name: str, asked: str | None, served: object) -> int:
        """The version a cloud answer is counted under: the one the app asked for; else the one this device runs,
        whatever version the cloud answered with (an offload is this device's model served elsewhere: a version's
        offload share, energy and a rollout's gates must see it); else the cloud's; else 0."""
        if asked is not None and asked.isdigit():
            return int(asked)
        loaded = self.service._models.get(name)
        if loaded is not None:
            return loaded.version
        if isinstance(served, int):
            return served
        if isinstance(served, str) and served.isdigit():
            return int(served)
        return 0

    def _cloud_record(self, name: str, latency_ms: float, inputs: dict[str, np.ndarray], *, ok: bool,
                      version: int) -> None:
        if self.telemetry is None:
            return
        self.telemetry.record(name, version, latency_ms, self.service.clock(), ok=ok, where="cloud",
                              rows=batch_rows(inputs))

    # -- what a person looks at ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """For `edgefleet-agent status`: the breaker, each model's estimates and mode, the reasons counted."""
        now = self.monotonic()
        with self._lock:
            models = {}
            for name, m in self.state.models.items():
                models[name] = {"offloaded": m.offloaded, "local_p95_ms": m.latency.p95(now),
                                "local_service_p95_ms": m.busy.p95(now),
                                "local_mj": m.local_mj.value, "cloud_ms": m.rtt.estimate,
                                "cloud_service_ms": m.service_ms.value}
            reasons: dict[str, dict[str, int]] = {}
            for (name, reason), n in sorted(self.counts.items()):
                reasons.setdefault(name, {})[reason] = n
            return {"enabled": self.client is not None, "url": self.client.url if self.client else None,
                    "breaker": self.state.breaker.state(now), "local_inflight": self.state.inflight,
                    "energy_j_last_min": self.state.energy.total(now),
                    "emulated_slowdown": "class" if self.emulate_class else self.slowdown, "models": models,
                    "reasons": reasons}


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _rows(inputs: dict[str, np.ndarray], loaded: Loaded | None) -> int:
    """batch_rows, by the model's first input when it is a plain array (the hot path's shortcut)."""
    first = inputs.get(loaded.first_input) if loaded is not None else None
    if type(first) is np.ndarray and first.ndim:
        return first.shape[0] or 1
    return batch_rows(inputs)


def _v(version: str | None) -> str:
    return f" version {version}" if version is not None else ""


def _check(inputs: dict[str, np.ndarray], loaded: Loaded) -> None:
    try:
        check_inputs({k: np.asarray(v) for k, v in inputs.items()}, loaded.runtime.inputs)
    except OipError as exc:
        raise InferenceError(str(exc)) from None


__all__ = ["Router"]
