"""`ModelPool`: the ONNX Runtime sessions that answer offloaded inference, one per model file, loaded on first use.

Theory: every transport (REST in rest.py, gRPC in grpc_server.py) calls `infer(name, version, inputs)` and gets
named numpy arrays back; what answers is the resolver's business (variants.py), how it runs is the pool's. A
session is made lazily, once per model file (keyed by the blob's sha256: the teacher of several students is one
session), and kept in an LRU of `max_loaded`. `InferenceSession.run` is thread-safe and releases the GIL, so
one session serves every thread at once.

Threads: each session gets `intra_op_num_threads=1` by default (`intra_op_threads=0`), and concurrency comes from
the callers' threads. Measured on the 2-core box this ships for (bench/offload_cloud.py's digits MLP, 64->128->10,
and MLPs up to 1024->2048->10 at batch 64): one thread per run and several runs at once was as fast or faster than
an intra-op pool of 2 in every case (digits: 74k runs/s either way; batch 8 of a 1024-wide MLP from 4 threads: 48k/s
against 34k/s), because a small run is over before a pool's threads wake, and a spinning pool takes the core the
event loop needs. A host with many cores and few, large models sets `infer_intra_op_threads`.

Errors are the cloud's own (cloud/errors.py): `NotFound` for an unknown model or version, `Invalid` for a tensor
that does not fit, naming the model's signature (the codec's `check_inputs`), `TooLarge` for inputs over
`max_input_bytes`. ONNX Runtime's own exceptions never leave this module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.cloud.errors import CloudError, Invalid, ModelInvalid, NotFound, TooLarge
from edgefleet.cloud.inference.batching import Batcher
from edgefleet.cloud.inference.variants import Resolution, Variant, VariantResolver
from edgefleet.common.oip_codec import OipError, check_inputs, check_outputs, signature
from edgefleet.protos.messages import TensorSpec
from edgefleet.protos.oip import NUMPY_TO_DATATYPE

log = logging.getLogger(__name__)

# ONNX Runtime's element type names -> numpy's (the dtype names TensorSpec carries).
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
               "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
               "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "str"}
# EWMA weight of the newest run time: about the last 20 runs.
_RUN_EWMA = 0.05
# Accepted input signatures remembered per session: batch sizes a client uses, bounded against one that varies it.
_MAX_ACCEPTED = 256


@dataclass(slots=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    variant: Variant  # "teacher" | "version": which file answered (variants.py)


class _Loaded:
    """One session and what the hot path needs of it, computed once."""

    def __init__(self, session: Any, batcher_args: tuple[int, int]) -> None:
        self.session = session
        self.inputs = [_spec(i) for i in session.get_inputs()]
        self.outputs = [_spec(o) for o in session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]
        self.run_us: float | None = None  # moving estimate of one run, for transports deciding where to run
        self.accepted: set[Any] = set()  # input signatures that passed the checks (see ModelPool.infer)
        delay_us, size = batcher_args
        batchable = delay_us > 0 and size >= 2 and all(_dynamic_first(s) for s in self.inputs + self.outputs)
        self.batcher = Batcher(self._run_all, max_delay_us=delay_us, max_size=size) if batchable else None

    def _run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


class ModelPool:
    """See the module docstring. Thread-safe; `close()` drops every session."""

    def __init__(self, resolver: VariantResolver, *, intra_op_threads: int = 0, batch_max_delay_us: int = 0,
                 batch_max_size: int = 32, max_loaded: int = 16, max_input_bytes: int | None = None) -> None:
        self.resolver = resolver
        self.intra_op_threads = intra_op_threads if intra_op_threads > 0 else 1  # 0: one (see the docstring)
        self.batch_max_delay_us = batch_max_delay_us
        self.batch_max_size = batch_max_size
        self.max_loaded = max(1, max_loaded)
        self.max_input_bytes = max_input_bytes
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------------------------------------ OIP calls

    def infer(self, name: str, version: str | None, inputs: dict[str, np.ndarray],
              outputs: list[str] | None = None) -> InferResult:
        res = self.resolver.resolve(name, version)
        loaded = self._loaded.get(res.sha256)
        if loaded is None:
            loaded = self._session(res)
        else:
            try:
                self._loaded.move_to_end(res.sha256)  # one C call, atomic under the GIL: the LRU needs no lock here
            except KeyError:
                pass  # evicted meanwhile; `loaded` still runs
        # The checks depend only on names, dtypes and shapes: a signature accepted once is accepted again without
        # walking the specs (the full check costs about as much as a small model's run).
        key = (tuple((n, a.dtype, a.shape) for n, a in inputs.items()), tuple(outputs) if outputs else None)
        if key not in loaded.accepted:
            self._check(res, loaded, inputs, outputs)
            if len(loaded.accepted) >= _MAX_ACCEPTED:
                loaded.accepted.clear()
            loaded.accepted.add(key)
        start = time.perf_counter()
        try:
            arrays = self._run(loaded, inputs)
        except CloudError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types (InvalidArgument, Fail)
            raise Invalid(f"{name} v{res.version}: ONNX Runtime refused the inputs ({_one_line(exc)}); the model "
                          f"takes {signature(loaded.inputs)}") from None
        took_us = (time.perf_counter() - start) * 1e6
        run_us = loaded.run_us
        loaded.run_us = took_us if run_us is None else run_us + _RUN_EWMA * (took_us - run_us)
        result = dict(zip(loaded.output_names, arrays))
        if outputs is not None:
            result = {n: result[n] for n in outputs}
        return InferResult(name, res.version, result, res.variant)

    def _check(self, res: Resolution, loaded: _Loaded, inputs: dict[str, np.ndarray],
               outputs: list[str] | None) -> None:
        try:
            check_inputs(inputs, loaded.inputs)
            check_outputs(outputs, loaded.outputs)
        except OipError as exc:
            raise Invalid(f"{res.name} v{res.version}: {exc}") from None
        if self.max_input_bytes is not None:
            size = sum(a.nbytes for a in inputs.values())
            if size > self.max_input_bytes:
                raise TooLarge(f"the inputs are {size} bytes, over the server's limit of {self.max_input_bytes}; "
                               "send fewer rows per request")

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        res = self.resolver.resolve(name, version)
        loaded = self._session(res)
        meta: dict[str, Any] = {
            "name": name, "versions": list(res.versions), "platform": "onnxruntime_onnx",
            "inputs": [_tensor_meta(s) for s in loaded.inputs], "outputs": [_tensor_meta(s) for s in loaded.outputs],
        }
        if version is not None:
            meta["versions"] = [res.version]
        return meta

    def ready(self, name: str, version: str | None) -> bool:
        """True when the model resolves and its session loads (loading it if needed); False for an unknown one."""
        try:
            self._session(self.resolver.resolve(name, version))
        except NotFound:
            return False
        return True

    def run_us(self, name: str, version: str | None) -> float | None:
        """A moving estimate of one run of what answers (name, version); None before its first run, or when
        answering would read the database or load a session first. Never blocks: an event loop asks it to choose
        between running `infer` inline (cheaper for a small model) and in a worker thread."""
        res = self.resolver.cached(name, version)
        loaded = self._loaded.get(res.sha256) if res is not None else None
        if loaded is None or (self.batch_max_delay_us > 0 and loaded.batcher is not None):
            return None  # a batched request waits for its batch: never on the loop
        return loaded.run_us

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()

    # ------------------------------------------------------------------------------------------------ sessions

    def _run(self, loaded: _Loaded, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if loaded.batcher is not None:
            rows = {a.shape[0] for a in inputs.values()}
            if len(rows) == 1:
                return loaded.batcher.run(inputs)
        return loaded.session.run(loaded.output_names, inputs)

    def _session(self, res: Resolution) -> _Loaded:
        loaded = self._loaded.get(res.sha256)
        if loaded is not None:
            if next(reversed(self._loaded), None) != res.sha256:
                with self._lock:
                    if res.sha256 in self._loaded:
                        self._loaded.move_to_end(res.sha256)
            return loaded
        with self._lock:
            gate = self._loading.setdefault(res.sha256, threading.Lock())
        try:
            with gate:  # one load per file, however many requests arrive for it at once
                loaded = self._loaded.get(res.sha256)
                if loaded is None:
                    loaded = _Loaded(self._new_session(res), (self.batch_max_delay_us, self.batch_max_size))
                    with self._lock:
                        self._loaded[res.sha256] = loaded
                        while len(self._loaded) > self.max_loaded:
                            evicted, _ = self._loaded.popitem(last=False)
                            log.info("model file %s unloaded (max_loaded %d)", evicted[:12], self.max_loaded)
        finally:
            with self._lock:
                self._loading.pop(res.sha256, None)
        return loaded

    def _new_session(self, res: Resolution) -> Any:
        import onnxruntime as ort

        data = self.resolver.onnx(res)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: failures reach the client as CloudErrors, not log noise
        if self.intra_op_threads > 1:
            # A spinning pool keeps its cores busy between runs, taking them from the event loop and other sessions.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind exception types
            raise ModelInvalid(f"ONNX Runtime cannot load the {res.variant} file of {res.name} v{res.version}: "
                               f"{_one_line(exc)}; push a model that loads (`fleet models push`)") from None
        log.info("loaded %s v%s (%s, %d bytes)", res.name, res.version, res.variant, len(data))
        return session


def _spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=_ORT_DTYPES.get(arg.type, arg.type), shape=shape)


def _dynamic_first(spec: TensorSpec) -> bool:
    return bool(spec.shape) and not isinstance(spec.shape[0], int)


def _tensor_meta(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": NUMPY_TO_DATATYPE.get(spec.dtype, spec.dtype.upper()),
            "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


__all__ = ["InferResult", "ModelPool"]
