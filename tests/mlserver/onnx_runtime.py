"""An MLServer custom runtime that serves one ONNX file with ONNX Runtime: MLServer's side of the offload tests.

Theory: MLServer 1.7.1 ships no ONNX runtime of its own (mlserver-onnx was dropped), and the point of the tests is
that an OIP server *we did not write* answers our agent, so this class does as little as a custom runtime can and
leaves the protocol to MLServer: MLServer parses the REST or gRPC request into its `InferenceRequest`, this class
decodes each input with MLServer's own `NumpyCodec`, runs the session, and encodes every output (or the requested
ones) with `NumpyCodec` again. Nothing of edgefleet is imported: the file runs inside MLServer's venv (see
tests/mlserver/env.py), copied into the model repository root that `mlserver start` puts on `sys.path`.

Bad input becomes MLServer's own `InferenceError` (HTTP 400), naming the model's signature, as a real runtime would;
an exception from ONNX Runtime would otherwise surface as a 500 that a client cannot tell from a broken server.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

# ONNX Runtime's type strings -> numpy, for the input checks (the OIP datatype check is MLServer's codec's).
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


class ONNXRuntime(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        # One thread: MLServer's event loop and the clients share the cores; intra-op threads would fight them.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._signature = ", ".join(f"{i.name} {i.type} {i.shape}" for i in self._inputs.values())
        return True

    def _decode(self, payload: InferenceRequest) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            spec = self._inputs.get(request_input.name)
            if spec is None:
                raise InferenceError(f"unknown input {request_input.name!r}; model {self.name} takes "
                                     f"{self._signature}")
            try:
                array = NumpyCodec.decode_input(request_input)
            except (ValueError, TypeError) as exc:
                raise InferenceError(f"input {request_input.name!r} cannot be decoded ({exc}); model {self.name} "
                                     f"takes {self._signature}") from None
            want = _ORT_TYPES.get(spec.type)
            if want is not None and array.dtype != want:
                raise InferenceError(f"input {request_input.name!r} is {request_input.datatype}; model "
                                     f"{self.name} takes {self._signature}")
            feeds[request_input.name] = array
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise InferenceError(f"missing input(s) {missing}; model {self.name} takes {self._signature}")
        return feeds

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = self._decode(payload)
        wanted = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        unknown = [name for name in wanted if name not in self._outputs]
        if unknown:
            raise InferenceError(f"unknown output(s) {unknown}; model {self.name} has {self._outputs}")
        try:
            results = self._session.run(wanted, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise InferenceError(f"model {self.name} refused the inputs ({exc}); it takes {self._signature}") from None
        outputs = [NumpyCodec.encode_output(name, value) for name, value in zip(wanted, results)]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
