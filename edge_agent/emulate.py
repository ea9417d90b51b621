"""Slow-class emulation: a `Runtime` whose every run takes `factor` times its real time, so an agent on a fast x86
box behaves, to its apps and its offload policy, like one on a slower device class (an rpi4 is about 8-10x slower
than this build machine on the digits models).

Theory: the wrapper sits at the `Runtime` seam (common/runtimes/base.py), under InferenceService, so everything
above it sees the slower device for real: the latency the service measures, the modelled energy (active watts x
that busy time), telemetry, the offload policy's p95 and the app's wait. The extra time is real wall time: the
run's thread waits until `start + factor x real`, sleeping for most of it and spinning the last
`SPIN_S` (time.sleep overshoots by 50-100 us on Linux, which at a 0.1 ms real run would be the whole slowdown).
The factor comes from the config (`offload.slowdown_factor`), or with `offload.emulate_class` from each bundle:
the cloud writes `emulation_factor` into the manifest when it builds the bundle for a class, the cost model's
predicted time there over the same on the build machine (cloud/distill/costmodel.py `emulation_factor`; e.g. 7.3
for the digits MLP on rpi4, 3.6 on rpi5), so each model is slowed as much as its class would slow it.
Sleeping, not burning CPU, for the rest: a 2-core test box emulating a slow device must not also become one for
the agent's other threads. What it does not emulate: the slower device's memory and its cores (parallel runs on
this box still run in parallel). Every figure taken under emulation is labelled: the router adds
`emulated_slowdown` to each answer's provenance and the agent logs the factor at start (`slowed_factory`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.common.runtimes.base import Runtime
from edgefleet.protos.messages import Manifest, TensorSpec

log = logging.getLogger(__name__)
SPIN_S = 0.0002  # the last 200 us are spun: sleep's overshoot on Linux is 50-100 us


def wait_until(deadline: float) -> None:
    """Return at `deadline` (perf_counter seconds), sleeping all but the last SPIN_S."""
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.perf_counter() < deadline:
        pass


class SlowedRuntime:
    """`inner`, with every `run` stretched to `factor` x its real duration (factor >= 1). `factor` None: the loaded
    bundle's `manifest.emulation_factor` (the class's cost model against the build machine), 1 when it has none."""

    def __init__(self, inner: Runtime, factor: float | None) -> None:
        if factor is not None and not factor >= 1.0:
            raise ValueError(f"slowdown factor must be >= 1 (1: no emulation), got {factor!r}")
        self.inner = inner
        self.from_manifest = factor is None
        self.factor = 1.0 if factor is None else float(factor)
        self.name = inner.name

    def load(self, model_dir: Path, manifest: Manifest) -> None:
        self.inner.load(model_dir, manifest)
        if self.from_manifest:
            if manifest.emulation_factor is None:
                log.warning("model %s v%d: its bundle carries no emulation_factor (a TFLite file, or a model the "
                            "cost model cannot count): it runs at this machine's speed", manifest.name,
                            manifest.version)
            self.factor = manifest.emulation_factor or 1.0
            log.info("model %s v%d: emulating %s at %gx this machine's time (the class's cost model)",
                     manifest.name, manifest.version, manifest.device_class, self.factor)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = self.inner.run(inputs)
        wait_until(started + (time.perf_counter() - started) * self.factor)
        return outputs

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.inner.outputs

    def close(self) -> None:
        self.inner.close()


def slowed_factory(factory: Callable[..., Runtime], factor: float | None) -> Callable[..., Runtime]:
    """`factory` (e.g. make_runtime) whose runtimes are slowed by `factor`, or with None by each bundle's own
    `emulation_factor` (`offload.emulate_class`); `factory` itself when factor is 1."""
    if factor == 1.0:
        return factory
    if factor is None:
        log.warning("EMULATING this device's class: every local inference takes the class's cost-model time, each "
                    "model's emulation_factor x its real time (offload.emulate_class); latency, energy and offload "
                    "figures of this agent are emulated")
    elif not factor > 1.0:
        raise ValueError(f"slowdown factor must be >= 1 (1: no emulation), got {factor!r}")
    else:
        log.warning("EMULATING a slower device: every local inference takes %g x its real time "
                    "(offload.slowdown_factor); latency, energy and offload figures of this agent are emulated", factor)

    def make(name: str, **options: Any) -> Runtime:
        return SlowedRuntime(factory(name, **options), factor)

    return make


__all__ = ["SPIN_S", "SlowedRuntime", "slowed_factory", "wait_until"]
