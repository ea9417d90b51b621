"""Inference engines behind the `Runtime` protocol. `make_runtime(manifest.runtime)` picks one.

Engines register here so that importing this package is enough; the engine's own package (onnxruntime,
ai-edge-litert) is imported only when a runtime of that kind is made.
"""

import importlib.util

from edgefleet.common.runtimes.base import Runtime, available_runtimes, make_runtime, register_runtime


def _onnx_factory(**options):
    from edgefleet.common.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(**options)


register_runtime("onnxruntime", "onnxruntime", "onnxruntime", _onnx_factory)


def _litert_factory(**options):
    from edgefleet.common.runtimes.litert import LiteRtRuntime

    return LiteRtRuntime(**options)


# LiteRT: ai-edge-litert, or tflite-runtime on older devices where only that is installed (find_spec imports nothing).
_LITERT_MODULE = ("tflite_runtime" if importlib.util.find_spec("ai_edge_litert") is None
                  and importlib.util.find_spec("tflite_runtime") is not None else "ai_edge_litert")
register_runtime("litert", _LITERT_MODULE, "'edgefleet[litert]' (ai-edge-litert)", _litert_factory)

__all__ = ["Runtime", "available_runtimes", "make_runtime", "register_runtime"]
