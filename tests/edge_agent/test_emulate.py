"""edge_agent/emulate.py: a slowed runtime under a real InferenceService makes the caller wait factor x the real run,
and that time is what latency, modelled energy and telemetry count. Lower bounds only: they hold by construction
whatever the machine's load (no timed assertion can fail on a busy box)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from edgefleet.common.runtimes import make_runtime
from edgefleet.edge_agent.emulate import SlowedRuntime, slowed_factory
from tests.edge_agent import agent_testkit as kit
from tests.edge_agent.test_offload_client import X, expected, serve_models


class Timed:
    """The real runtime, recording how long each of its own runs took."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.runs = inner, inner.name, []

    def load(self, model_dir, manifest) -> None:
        self.inner.load(model_dir, manifest)

    def run(self, inputs):
        started = time.perf_counter()
        try:
            return self.inner.run(inputs)
        finally:
            self.runs.append(time.perf_counter() - started)

    @property
    def inputs(self):
        return self.inner.inputs

    @property
    def outputs(self):
        return self.inner.outputs

    def close(self) -> None:
        self.inner.close()


def test_the_caller_waits_factor_times_the_real_run_and_energy_counts_it(tmp_path, caplog):
    timed: list[Timed] = []

    def real(name: str, **options) -> Timed:
        timed.append(Timed(make_runtime(name, **options)))
        return timed[-1]

    with caplog.at_level(logging.WARNING, logger="edgefleet.edge_agent.emulate"):
        factory = slowed_factory(real, 25.0)
    assert "EMULATING a slower device: every local inference takes 25 x its real time" in caplog.text
    service = serve_models(tmp_path, {"digits": (1, 1.0)}, runtime_factory=factory)
    for _ in range(5):
        started = time.perf_counter()
        out, prov = service.infer_arrays("digits", {"x": X})
        waited_s = time.perf_counter() - started
        np.testing.assert_array_equal(out["y"], expected(1.0))
        real_s = timed[0].runs[-1]
        assert waited_s >= 25.0 * real_s and prov.latency_ms >= 25.0 * real_s * 1000.0
        assert prov.energy_mj == pytest.approx(4.0 * prov.latency_ms)  # modelled: active watts x emulated busy
    windows = [w for b in service.telemetry.flush(kit.T0, force=True) for w in b.windows]
    assert [w.count for w in windows] == [5] and windows[0].p50_ms >= 25.0 * min(timed[0].runs) * 1000.0


def test_factor_one_is_the_factory_itself_and_below_one_is_refused():
    assert slowed_factory(make_runtime, 1.0) is make_runtime
    with pytest.raises(ValueError, match="must be >= 1"):
        slowed_factory(make_runtime, 0.5)
    with pytest.raises(ValueError, match="must be >= 1"):
        SlowedRuntime(make_runtime("onnxruntime"), 0.0)


def test_emulate_class_takes_each_models_factor_from_its_bundle(tmp_path, caplog):
    """`offload.emulate_class`: the factor is the one the cloud's cost model wrote into each bundle's manifest; a
    bundle without one runs at full speed, said in the log. The router labels each answer with its model's factor."""
    from edgefleet.edge_agent.config import OffloadConfig
    from edgefleet.edge_agent.offload import Router

    timed: list[Timed] = []

    def real(name: str, **options) -> Timed:
        timed.append(Timed(make_runtime(name, **options)))
        return timed[-1]

    with caplog.at_level(logging.INFO, logger="edgefleet.edge_agent.emulate"):
        factory = slowed_factory(real, None)
        service = serve_models(tmp_path, {"slow": (1, 1.0), "plain": (1, 1.0)}, runtime_factory=factory,
                               emulation={"slow": 30.0})
    assert "EMULATING this device's class" in caplog.text
    assert "model plain v1: its bundle carries no emulation_factor" in caplog.text
    factors = {name: loaded.runtime.factor for name, loaded in service._models.items()}
    assert factors == {"slow": 30.0, "plain": 1.0}
    router = Router(service, None, OffloadConfig(emulate_class=True))
    for name, factor in factors.items():
        started = time.perf_counter()
        out, params = router.infer_arrays(name, {"x": X})
        waited_s = time.perf_counter() - started
        np.testing.assert_array_equal(out["y"], expected(1.0))
        runtime = service._models[name].runtime.inner
        assert waited_s >= factor * runtime.runs[-1]
        assert params.get("emulated_slowdown") == (factor if factor != 1.0 else None)
    assert router.snapshot()["emulated_slowdown"] == "class"
