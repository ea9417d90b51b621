"""Dynamic batching: concurrent requests of one session run as one `session.run`, each gets its own rows back.

Theory: a small model costs about as much per call as per row (a digits MLP: ~13 us per run at batch 1, not much
more at 16), so under load, gathering the requests that arrive within a short window and running them together
trades a bounded wait for throughput. No thread of its own: the first request of a batch is its *leader*; it waits
up to `max_delay_us` (or until `max_size` rows are in), runs the batch in its own thread, and hands each follower
its slice. A request joins only a batch of the same *key* (input names, dtypes and trailing dimensions), so
concatenating along the first axis is always defined; one with another shape leads a batch of its own and still
runs. Whether a model can batch at all (its inputs' and outputs' first dimension dynamic) is the pool's call.

Answers equal unbatched runs: rows are independent in the models this serves (MLPs, convolutions; not a model
that mixes rows, such as batch statistics), and ONNX Runtime's CPU kernels compute each row alike at any batch
size (tests/cloud/inference/test_batching.py checks it with np.array_equal).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
_Key = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: list[np.ndarray] | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    items: list[_Item] = field(default_factory=list)
    rows: int = 0
    full: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Batches calls of `run(feeds) -> outputs` (outputs in a fixed order, each with the batch as first axis)."""

    def __init__(self, run: RunFn, *, max_delay_us: int, max_size: int) -> None:
        if max_delay_us <= 0 or max_size < 2:
            raise ValueError("a Batcher needs max_delay_us > 0 and max_size >= 2; run unbatched otherwise")
        self._run = run
        self.max_delay_s = max_delay_us / 1e6
        self.max_size = max_size
        self._open: dict[_Key, _Batch] = {}
        self._lock = threading.Lock()
        self.runs = 0  # session runs made (tests and figures read it)
        self.batched_runs = 0  # of which carried more than one request

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run `feeds` (every input with the same first dimension), alone or with concurrent callers."""
        rows = next(iter(feeds.values())).shape[0]
        if rows >= self.max_size:
            self.runs += 1
            return self._run(feeds)  # a full batch by itself: nothing to wait for
        key: _Key = tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))
        item = _Item(feeds, rows)
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None or batch.rows + rows > self.max_size
            if leader:
                batch = self._open[key] = _Batch()
            assert batch is not None
            batch.items.append(item)
            batch.rows += rows
            if batch.rows >= self.max_size:
                del self._open[key]  # the next caller starts a new batch
                batch.full.set()
        if not leader:
            item.done.wait()
            if item.error is not None:
                raise item.error
            assert item.result is not None
            return item.result
        batch.full.wait(self.max_delay_s)
        with self._lock:
            if self._open.get(key) is batch:
                del self._open[key]
        self._execute(batch.items)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _execute(self, items: list[_Item]) -> None:
        try:
            if len(items) == 1:
                self.runs += 1
                items[0].result = self._run(items[0].feeds)
                return
            names = list(items[0].feeds)
            feeds = {n: np.concatenate([it.feeds[n] for it in items], axis=0) for n in names}
            self.runs += 1
            self.batched_runs += 1
            outputs = self._run(feeds)
            total = sum(it.rows for it in items)
            if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
                # The model does not keep rows apart after all (an output without the batch axis): each alone.
                for it in items:
                    self.runs += 1
                    it.result = self._run(it.feeds)
                return
            start = 0
            for it in items:
                it.result = [o[start:start + it.rows] for o in outputs]
                start += it.rows
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch, which re-raises it
            for it in items:
                if it.result is None:
                    it.error = exc
        finally:
            for it in items:
                it.done.set()


__all__ = ["Batcher"]
