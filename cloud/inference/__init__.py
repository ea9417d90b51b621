"""Offload inference: the cloud's Open Inference Protocol (KServe v2) server.

    variants.py    which model file answers (name, version): the distillation's teacher or the version itself
    pool.py        ModelPool: ONNX Runtime sessions, loaded lazily, kept in an LRU; infer / metadata / ready
    batching.py    dynamic batching of concurrent requests to one session (off unless infer_batch_max_delay_us > 0)
    auth.py        bearer tokens resolved through a short-lived cache, off the database on the hot path
    rest.py        the /v2 REST data plane: a plain ASGI app (JSON and the binary tensor extension)
    grpc_server.py inference.GRPCInferenceService over the same pool
    standalone.py  the data plane as its own process (`edgefleet-cloud infer`)

Theory: the transports share one pool, so REST and gRPC answer alike and a model file is loaded once per process.
"""

from edgefleet.cloud.inference.pool import InferResult, ModelPool
from edgefleet.cloud.inference.variants import Resolution, VariantResolver

__all__ = ["InferResult", "ModelPool", "Resolution", "VariantResolver"]
