"""Inference engines behind the `Runtime` protocol. `make_runtime(manifest.runtime)` picks one.

Engines register here so that importing this package is enough; the engine's own package (onnxruntime,
ai-edge-litert) is imported only when a runtime of that kind is made.
"""

from edgefleet.edge_agent.runtimes.base import Runtime, available_runtimes, make_runtime, register_runtime


def _onnx_factory(**options):
    from edgefleet.edge_agent.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(**options)


register_runtime("onnxruntime", "onnxruntime", "onnxruntime", _onnx_factory)
# LiteRT: named so that a manifest asking for it gets a clear "install ai-edge-litert" / "not supported yet" answer.
register_runtime("litert", "ai_edge_litert", "ai-edge-litert", None)

__all__ = ["Runtime", "available_runtimes", "make_runtime", "register_runtime"]
