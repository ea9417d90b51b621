"""The inference service: the active runtime per model, metered runs, and OIP request <-> numpy conversion.

Theory of operation: `load_active()` runs at start, before any network, and loads every model whose `current`
pointer exists, so apps get answers while the cloud is still unreachable. After that the executor calls
`activate(name, version)` when a pointer switches: the new runtime is loaded completely first and then swapped in
under a lock, so a request sees either the old model or the new one. The old runtime is not closed while requests
may still hold it; dropping the last reference frees it.

`run` times the call with `time.perf_counter`, brackets it with the energy meter and records the result in
telemetry, errors included (a window meter, RAPL or a sampled sensor, answers the bracket with None: its energy
is taken per telemetry window, so the hot path reads no sensor and the app sees `energy_mj` null with its source),
with the request's rows (`batch_rows`: the leading dimension of its first input), so
a batched request counts as that many inferences. `infer` checks an OIP `InferRequest` against the model's input
specs (names, datatype, shape, element count) and raises `InferenceError` with a message an app developer can act
on; no bad request can reach the runtime as a crash. `infer_arrays` is the same for numpy inputs (the binary API,
the SDK's frames, the offload router): `oip_codec.check_inputs` is the rule, behind a precomputed fast test of the
common case, so a request that fits pays no message building.

The bookkeeping around the runtime is the hot path of every local request, budgeted at 5 us: no lock to read the
model table, no datetime per call (`Telemetry.record_at` takes epoch seconds when the clock is the default), the
model's first input and specs worked out at activation, and a NamedTuple for the provenance. `LocalServing` gives
the service the offload router's call shape, for the local API of an agent without a router.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter, time
from typing import Any, NamedTuple

import numpy as np

from edgefleet.common.oip_codec import OipError, check_inputs, check_outputs
from edgefleet.common.runtimes import make_runtime
from edgefleet.common.runtimes.base import Runtime
from edgefleet.edge_agent.errors import InferenceError, ModelNotFound, ModelNotReady, RuntimeLoadError
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.meters.base import EnergyMeter, NullMeter
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.edge_agent.unpack import read_manifest
from edgefleet.protos.messages import Manifest, TensorSpec
from edgefleet.protos.oip import DATATYPES, NUMPY_TO_DATATYPE, InferRequest, InferResponse, InferTensor, ModelMetadata

log = logging.getLogger(__name__)


def _dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # a spec dtype numpy does not know: no array fits it, check_inputs says why
        return None


@dataclass(frozen=True)
class Loaded:
    name: str
    version: int
    manifest: Manifest
    runtime: Runtime
    # Read on every request, so worked out once at activation: the model's first input (batch_rows' rule), the
    # specs as (name, dtype, dims) for the fast input check, the output names, and the variant it serves.
    first_input: str = ""
    input_checks: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = ()
    output_names: frozenset[str] = frozenset()
    variant: str = ""

    @classmethod
    def of(cls, name: str, version: int, manifest: Manifest, runtime: Runtime) -> Loaded:
        specs = runtime.inputs
        checks = tuple((s.name, _dtype(s.dtype), tuple(d if isinstance(d, int) else -1 for d in s.shape))
                       for s in specs)
        return cls(name, version, manifest, runtime, specs[0].name if specs else "", checks,
                   frozenset(s.name for s in runtime.outputs), f"{manifest.device_class}-{manifest.precision}")

    def fits(self, inputs: dict[str, np.ndarray]) -> bool:
        """True when `inputs` certainly pass `check_inputs`: the hot path's test; anything else takes the slow path,
        which gives check_inputs' own message (or passes: this test is stricter, never looser)."""
        if len(inputs) != len(self.input_checks):
            return False
        for name, dtype, dims in self.input_checks:
            array = inputs.get(name)
            # dtype objects compared, not dtype.name: that property is Python code, 3.8 us a call (measured).
            if type(array) is not np.ndarray or (array.dtype is not dtype and array.dtype != dtype):
                return False
            shape = array.shape
            if len(shape) != len(dims):
                return False
            for want, got in zip(dims, shape):
                if want != -1 and want != got:
                    return False
        return True


class Provenance(NamedTuple):
    """Where and how one request ran. A NamedTuple, not a frozen dataclass: built on every request, and a frozen
    dataclass's __init__ (object.__setattr__ per field) cost 1.7 us of the 5 us bookkeeping budget, a tuple 0.3."""

    model_version: int
    latency_ms: float
    energy_mj: float | None
    energy_source: str
    energy_meter: str
    where: str = "local"
    variant: str = ""

    def parameters(self) -> dict[str, Any]:
        """The OIP response `parameters`: the provenance a caller sees. `reason` and `escalated` are the offload
        router's words; the service alone always runs locally, so it says so."""
        return {"where": self.where, "reason": "local", "model_version": self.model_version,
                "variant": self.variant, "latency_ms": round(self.latency_ms, 4),
                "energy_mj": None if self.energy_mj is None else round(self.energy_mj, 6),
                "energy_source": self.energy_source, "energy_meter": self.energy_meter, "escalated": False}


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_tuple_new = tuple.__new__  # Provenance(...) without NamedTuple's Python-level __new__: 0.25 us, not 1


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Runs on the smoke test's input before a model serves. ONNX Runtime's first run of a session allocates its arenas
# and plans its kernels: measured here on the digits MLP, 557 us, then 54, then 25 us steady. An app's first
# request should not pay that, nor should the offload policy's p95 carry it for a window (at an emulated 8x it is a
# 4.5 ms outlier against 0.2 ms runs). Two runs, as the second is still twice the steady time.
WARM_RUNS = 2


def _warm(runtime: Runtime, directory: Path, manifest: Manifest) -> None:
    """Run the model WARM_RUNS times on its bundle's smoke-test input; a failure is logged, never fatal (the smoke
    test passed at install, and the request path reports a model that cannot run)."""
    try:
        with np.load(directory / manifest.smoke_test.input_file, allow_pickle=False) as npz:
            inputs = {key: npz[key] for key in npz.files}
        for _ in range(WARM_RUNS):
            runtime.run(inputs)
    except Exception as exc:  # noqa: BLE001 - warming is an optimisation; serving decides the rest
        log.warning("model %s v%d: warm-up run failed (%s); serving it cold", manifest.name, manifest.version, exc)


class InferenceService:
    def __init__(self, installer: Installer, *, runtime_factory: Callable[[str], Runtime] = make_runtime,
                 meter: EnergyMeter | None = None, telemetry: Telemetry | None = None,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.installer = installer
        self.runtime_factory = runtime_factory
        self.meter = meter or NullMeter()
        self.telemetry = telemetry
        self.clock = clock
        self._wall = clock is _utcnow
        self._models: dict[str, Loaded] = {}
        self._lock = threading.Lock()  # guards the dict swap only; runs happen outside it

    # -- which model serves -------------------------------------------------------------------------------------------

    def load_active(self) -> dict[str, int]:
        """Load every active model on disk; a model that fails to load is logged and left out, not fatal."""
        for name, version in self.installer.active().items():
            try:
                self.activate(name, version)
            except RuntimeLoadError as exc:
                log.error("model %s v%d is active on disk but cannot load: %s", name, version, exc)
        return self.models()

    def activate(self, name: str, version: int | None) -> None:
        """Serve `version` of `name` (loaded from its directory); None stops serving it. Raises RuntimeLoadError."""
        if version is None:
            with self._lock:
                self._models.pop(name, None)
            return
        directory = self.installer.version_dir(name, version)
        try:
            manifest = read_manifest(directory)
        except Exception as exc:  # noqa: BLE001 - a BundleError or a disk error both mean "cannot serve"
            raise RuntimeLoadError(f"model {name} v{version}: {exc}") from None
        runtime = self.runtime_factory(manifest.runtime)
        runtime.load(directory, manifest)  # loaded completely BEFORE the swap
        _warm(runtime, directory, manifest)
        loaded = Loaded.of(name, version, manifest, runtime)
        with self._lock:
            self._models[name] = loaded
        log.info("serving %s v%d", name, version)

    def models(self) -> dict[str, int]:
        with self._lock:
            return {name: loaded.version for name, loaded in self._models.items()}

    @property
    def ready(self) -> bool:
        with self._lock:
            return bool(self._models)

    def get(self, name: str) -> Loaded:
        with self._lock:
            loaded = self._models.get(name)
        if loaded is not None:
            return loaded
        try:
            installed = name in self.installer.installed()
        except (OSError, ValueError):
            installed = False
        if installed:
            raise ModelNotReady(f"model {name!r} is installed but not active yet; retry shortly")
        have = ", ".join(sorted(self.models())) or "none"
        raise ModelNotFound(f"model {name!r} is not on this device; models: {have}")

    def metadata(self, name: str) -> ModelMetadata:
        loaded = self.get(name)

        def spec(s: TensorSpec) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in s.shape]
            return {"name": s.name, "datatype": NUMPY_TO_DATATYPE.get(s.dtype, s.dtype.upper()), "shape": shape}

        return ModelMetadata(name=name, versions=[str(loaded.version)],
                             platform="onnxruntime_onnx" if loaded.manifest.runtime == "onnxruntime" else "litert",
                             inputs=[spec(s) for s in loaded.runtime.inputs],
                             outputs=[spec(s) for s in loaded.runtime.outputs])

    # -- running ------------------------------------------------------------------------------------------------------

    def run(self, name: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Provenance]:
        # No lock to read: a dict lookup is atomic, and `activate` swaps whole entries (bench: the lock, the
        # datetime per call and the window key tuples were 20 of the 21 us this path added over the runtime).
        return self._run(self._models.get(name) or self.get(name), inputs)

    def _run(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Provenance]:
        name = loaded.name
        first = inputs.get(loaded.first_input)
        if type(first) is np.ndarray and first.ndim:
            rows = first.shape[0] or 1
        else:
            rows = batch_rows(inputs, [s.name for s in loaded.runtime.inputs])
        meter = self.meter
        token = meter.start()
        started = perf_counter()
        ok = False
        try:
            outputs = loaded.runtime.run(inputs)
            ok = True
        finally:
            busy_s = perf_counter() - started
            latency_ms = busy_s * 1000.0
            joules = meter.stop(token, busy_s)
            energy_mj = joules * 1000.0 if joules is not None else None
            source, meter_name = meter.source, meter.name
            telemetry = self.telemetry
            if telemetry is not None:
                # By position: keywords cost on every request. The default clock is read as epoch seconds.
                telemetry.record_at(name, loaded.version, latency_ms,
                                    time() if self._wall else (self.clock() - _EPOCH).total_seconds(), ok,
                                    energy_mj if ok else None, source, meter_name, "local", rows)
        return outputs, _tuple_new(Provenance, (loaded.version, latency_ms, energy_mj, source, meter_name, "local",
                                                loaded.variant))

    def infer_arrays(self, name: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                     outputs: list[str] | None = None) -> tuple[dict[str, np.ndarray], Provenance]:
        """Named numpy inputs, checked against the model (`oip_codec.check_inputs`: names, dtype, rank, fixed
        dimensions), run and metered; only the `outputs` asked for (None: all). InferenceError names the expected
        signature; ModelNotFound for a version that is not the active one."""
        loaded = self._models.get(name) or self.get(name)
        if version is not None and version != str(loaded.version):
            raise ModelNotFound(f"model {name!r} version {version} is not active; active is {loaded.version}")
        if not loaded.fits(inputs):
            inputs = {k: np.asarray(v) for k, v in inputs.items()}
            try:
                check_inputs(inputs, loaded.runtime.inputs)
            except OipError as exc:
                raise InferenceError(str(exc)) from None
        if outputs is not None and not loaded.output_names.issuperset(outputs):
            try:
                check_outputs(outputs, loaded.runtime.outputs)
            except OipError as exc:
                raise InferenceError(str(exc)) from None
        result, prov = self._run(loaded, inputs)
        if outputs is not None:
            result = {k: result[k] for k in outputs}
        return result, prov

    def infer(self, name: str, request: InferRequest, version: str | None = None) -> InferResponse:
        loaded = self.get(name)
        if version is not None and version != str(loaded.version):
            raise ModelNotFound(f"model {name!r} version {version} is not active; active is {loaded.version}")
        inputs = request_to_numpy(request, loaded.runtime.inputs)
        wanted = [o.name for o in request.outputs] if request.outputs else None
        if wanted is not None:
            known = {s.name for s in loaded.runtime.outputs}
            for out_name in wanted:
                if out_name not in known:
                    raise InferenceError(f"unknown output {out_name!r}; the model has {sorted(known)}")
        outputs, prov = self.run(name, inputs)
        tensors = [numpy_to_tensor(k, v) for k, v in outputs.items() if wanted is None or k in wanted]
        return InferResponse(model_name=name, model_version=str(loaded.version), id=request.id, outputs=tensors,
                             parameters=prov.parameters())


def batch_rows(inputs: dict[str, np.ndarray], order: list[str] | None = None) -> int:
    """The rows (inferences) in one request: the leading dimension of the model's first input (in `order`, the
    model's input order; else the first given), at least 1. A scalar input, or a request of zero rows, is one: it
    still paid for a call."""
    names = [n for n in (order or []) if n in inputs] or list(inputs)
    if not names:
        return 1
    shape = np.shape(inputs[names[0]])
    return max(1, int(shape[0])) if len(shape) >= 1 else 1


def request_to_numpy(request: InferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """OIP tensors -> the model's named numpy inputs, checked against `specs`; InferenceError on any mismatch."""
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InferenceError(f"unknown input {tensor.name!r}; the model takes {sorted(by_name)}")
        if tensor.name in out:
            raise InferenceError(f"input {tensor.name!r} is given twice")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InferenceError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}; "
                                 f"use one of {', '.join(DATATYPES)}")
        if dtype != spec.dtype:
            want = NUMPY_TO_DATATYPE.get(spec.dtype, spec.dtype)
            raise InferenceError(f"input {tensor.name!r}: datatype {tensor.datatype} but the model wants {want}")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InferenceError(f"input {tensor.name!r}: shape {shape} has a negative dimension")
        if len(shape) != len(spec.shape) or any(
                isinstance(want, int) and want != got for want, got in zip(spec.shape, shape)):
            model_shape = [d if isinstance(d, int) else -1 for d in spec.shape]
            raise InferenceError(f"input {tensor.name!r}: shape {shape} does not fit the model's {model_shape} "
                                 "(-1 is any size)")
        try:
            array = np.asarray(tensor.data, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InferenceError(f"input {tensor.name!r}: data is not a list of {tensor.datatype} values "
                                 f"({exc})") from None
        # Python ints: exact. np.prod works in int64 and wraps ([2**58, 64] gave 0, which "matched" no data and
        # crashed the reshape into a 500).
        expected = math.prod(shape)
        if array.size != expected:
            hint = "; the shape is too large for the data" if expected > array.size else ""
            raise InferenceError(f"input {tensor.name!r}: {array.size} values for shape {shape} "
                                 f"(needs {expected}){hint}")
        try:
            out[tensor.name] = array.reshape(shape)
        except ValueError as exc:  # a zero-size shape with a dimension numpy cannot index, e.g. [0, 2**70]
            raise InferenceError(f"input {tensor.name!r}: shape {shape} is too large ({exc})") from None
    missing = sorted(set(by_name) - set(out))
    if missing:
        raise InferenceError(f"missing input(s) {missing}")
    return out


def numpy_to_tensor(name: str, array: np.ndarray) -> InferTensor:
    array = np.asarray(array)
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.name)
    if datatype is None:
        raise InferenceError(f"output {name!r} has dtype {array.dtype.name}, which OIP cannot carry")
    return InferTensor(name=name, shape=list(array.shape), datatype=datatype, data=array.ravel().tolist())


class LocalServing:
    """The offload router's call shape over the service alone, for an agent without a router: every request runs
    here (where "local", reason "local"); a deadline or tier is accepted and changes nothing."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def infer_arrays(self, name: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                     outputs: list[str] | None = None, deadline_ms: float | None = None,
                     tier: str = "realtime") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result, prov = self.service.infer_arrays(name, inputs, version=version, outputs=outputs)
        return result, prov.parameters()
