"""cloud/inference/batching.py: concurrent requests batched answer exactly as unbatched runs; others still run."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgefleet.cloud.inference.batching import Batcher
from edgefleet.cloud.inference.pool import ModelPool
from edgefleet.cloud.inference.variants import VariantResolver
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from tests.cloud.inference import bare_run, mlp_onnx


@pytest.fixture
def fleet(tmp_path):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data"))
    try:
        yield f
    finally:
        f.close()


def _together(calls: list, timeout_s: float = 30) -> list:
    """Run the callables in threads released at once; their results in order (re-raising the first error)."""
    start = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        start.wait(timeout_s)
        try:
            results[i] = ("ok", calls[i]())
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            results[i] = ("error", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    for kind, value in results:
        if kind == "error":
            raise value
    return [value for _, value in results]


def test_concurrent_requests_batched_equal_unbatched_runs(fleet):
    model = mlp_onnx(1)
    fleet.push_model("digits", model)
    # 1 s: long enough that every thread released by the barrier joins the first batch on a loaded machine.
    pool = ModelPool(VariantResolver(fleet), batch_max_delay_us=1_000_000, batch_max_size=8)
    rows = [np.random.default_rng(i).standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(8)]
    pool.infer("digits", None, {"x": rows[0]})  # load the session before the race
    batcher = next(iter(pool._loaded.values())).batcher
    assert batcher is not None
    before = batcher.batched_runs
    got = _together([lambda x=x: pool.infer("digits", None, {"x": x}) for x in rows])
    assert batcher.batched_runs > before  # some of them really ran together
    for x, result in zip(rows, got, strict=True):
        assert result.outputs["probs"].shape == (x.shape[0], 10)
        assert np.array_equal(result.outputs["probs"], bare_run(model, {"x": x})["probs"])


def test_a_request_that_cannot_batch_still_runs():
    calls: list[dict[str, tuple]] = []

    def run(feeds):
        calls.append({k: v.shape for k, v in feeds.items()})
        return [feeds["x"].sum(axis=tuple(range(1, feeds["x"].ndim)))]

    batcher = Batcher(run, max_delay_us=200_000, max_size=16)
    a = np.ones((2, 3), np.float32)
    b = np.ones((1, 3), np.float32) * 2
    odd = np.ones((1, 5), np.float32)  # other trailing shape: a batch of its own
    got = _together([lambda: batcher.run({"x": a}), lambda: batcher.run({"x": b}), lambda: batcher.run({"x": odd})])
    assert [g[0].tolist() for g in got] == [[3.0, 3.0], [6.0], [5.0]]
    assert sorted(c["x"] for c in calls) == [(1, 5), (3, 3)]  # two runs: the batch of a and b, and odd alone


def test_an_error_reaches_every_caller_of_the_batch():
    def run(feeds):
        raise RuntimeError("session broke")

    batcher = Batcher(run, max_delay_us=200_000, max_size=4)
    x = np.ones((1, 2), np.float32)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="session broke"):
            _together([lambda: batcher.run({"x": x})] * 3)


def test_a_model_with_a_fixed_batch_dimension_is_not_batched(fleet):
    fleet.push_model("fixed", mlp_onnx(1, batch=1))
    pool = ModelPool(VariantResolver(fleet), batch_max_delay_us=1000)
    x = np.zeros((1, 64), np.float32)
    assert np.array_equal(pool.infer("fixed", None, {"x": x}).outputs["probs"],
                          bare_run(mlp_onnx(1, batch=1), {"x": x})["probs"])
    assert next(iter(pool._loaded.values())).batcher is None
    assert pool.run_us("fixed", None) is not None  # not batched: a loop may run it inline
