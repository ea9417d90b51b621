"""The telemetry outbox: batches on disk until the cloud confirms it stored them, bounded by merging, never silent.

Theory of operation:
- Identity. Every batch carries (epoch, seq); the cloud stores a batch once per (device_id, epoch, seq). `epoch` is
  this outbox's incarnation, milliseconds since the Unix epoch when its state (`outbox.json`) was first created and
  kept there; a lost or unreadable `outbox.json` starts a new epoch (above every epoch still on disk), so seqs
  counted again are not taken for replays. Left-over batch files keep the epoch written inside them and are resent
  as they are. seq rises across the directory (the files are the truth for it), so names never collide.
- Files. One file per batch, `{seq:012d}-{windows}-e{epoch}[-m{gen}][-a].json` (the older `{seq:012d}-{windows}.json`
  is still read). A plain batch file holds the wire bytes; a merged one (`-m{gen}`) holds `{"gen", "replaces",
  "batch"}`. `-a` marks a batch `mark_attempted`: handed to a transport in a way that may have reached the cloud.
  The mark is a rename, so a crash cannot forget it. Every write goes through common/fsutil (temp, fsync, rename,
  fsync dir); an in-memory index built at open (one reader per directory) answers sizes and lookups.
- Leaving. `ack(seq, epoch)` and `ack_many(epoch, seqs)` (a `TelemetryAck`: pass both `seqs` and `refused`) delete
  batches the cloud committed or will never store; an ack naming another epoch is ignored.
- The bound (`max_bytes`, the sum of file sizes). Past it, the oldest never-attempted batches are merged into ONE
  batch of coarser windows that takes the (epoch, seq) of the newest batch it replaces: none of them ever left, so
  the cloud has never seen that identity. `merged_windows` on it counts the original windows it stands for. An
  attempted batch is never merged (the cloud may hold it; merging would count its windows twice). Merging repeats,
  coarser each time, up to windows of `MAX_WINDOW_S`. Only when merging frees nothing (everything attempted, or
  batches of maximal windows) is the oldest batch dropped: never-attempted ones first, attempted ones last (those
  may have been stored, so `dropped_attempted_total` says how many of the dropped windows perhaps were not lost);
  the newest batch is always kept. Dropped windows (and any drop counts the dropped batch was still carrying) go
  into the next batch's `dropped_windows`. `merged_total`, `dropped_total` and `dropped_detail` (requests, errors,
  rows) persist in `outbox.json`.
- Merging windows (`merge_windows`, a pure function). Same (model, version, where), in arrival order, contiguous or
  not, spanning at most `MAX_WINDOW_S`. Counts, errors and rows add exactly. Means are weighted by what they are
  means over (edge_agent/telemetry.py `_Window.close`): `mean_ms` by successful requests (count - errors), `row_ms`
  by the successful requests' rows, recovered as busy time / `row_ms` (exactly `rows` when nothing failed);
  `mean_mj` by successful requests and `row_mj`, `row_net_mj` by their rows (mean_mj x ok / row_mj), assuming a
  window's successful requests were all metered or none: windows with and without energy are never merged, so the
  assumption holds for merged windows too. Percentiles cannot be merged exactly (cloud/store_telemetry.py
  `telemetry_summary` says the same): p50 and p95 are means weighted by successful requests, p99 the worst window's.
  `energy_source` is the weaker label ("estimated" over "measured"); meter, method, sample rate and idle power are
  kept when all agree, else unknown ("" / None: naming one meter for a mix would be a mislabel). Every merged window
  is built through `TelemetryWindow`, so one the contract would refuse is never made: that window is left unmerged.
- Crash safety. Each merge or drop first records its intent in `outbox.json` (and the merged file lists the
  batches it replaces), then writes the merged batch, then deletes the originals. On open: a merged file whose
  originals are still there wins and they are deleted (never counted twice); an intent whose merged file never got
  written is rolled back (its originals are intact); a drop intent's files are deleted. A batch written just before
  a crash that kept `outbox.json` from being saved still consumed the saved `dropped_pending`.
- Threads: one lock; inference threads `add`, the link thread `pending`, `mark_attempted`, `ack`. The link calls
  `mark_attempted` BEFORE handing a batch to a transport and sends the batch it returns: None means the batch left
  (acked, merged into another, dropped) and must not be sent, since a merge may have replaced what `pending` gave.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.common.fsutil import atomic_write_bytes, atomic_write_json, collect_trash, fsync_dir, read_json
from edgefleet.edge_agent.errors import AgentError
from edgefleet.protos.limits import INT32_MAX, MAX_ENERGY_MJ, MAX_LATENCY_MS, MAX_WINDOW_S, MAX_WINDOWS_PER_BATCH
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{12})-(\d+)(?:-e(\d+))?(?:-m(\d+))?(-a)?\.json$")


# -- merging windows: the pure core ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Coarse:
    """Sums of one coarse window in the making; `window` is what they give, already validated."""

    first: TelemetryWindow
    window: TelemetryWindow
    n: int
    count: int
    errors: int
    rows: int
    busy_ms: float  # sum of latency of the successful requests
    ok_lat: int  # successful requests of the windows with latency figures
    ok_rows: float  # their rows
    p50: tuple[float, int]  # (weighted sum, weight) of p50; same for p95
    p95: tuple[float, int]
    p99: float | None
    energy_mj: float
    ok_e: int  # successful (metered) requests of the windows with energy figures
    e_rows: float  # their rows
    net_mj: float  # row_net_mj x e_rows summed
    net: bool  # the energy windows give row_net_mj (all of them, or none: see _compatible)
    sources: frozenset[str]
    labels: tuple[frozenset[Any], ...]  # energy_meter, energy_method, energy_hz, idle_w seen on energy windows


def _weights(w: TelemetryWindow) -> tuple[int, float, float, float]:
    """(ok, busy_ms, ok_rows, metered rows) of a window, recovered from its figures; see the module docstring."""
    ok = w.count - w.errors
    most = w.rows - w.errors  # every failed request carried at least one row
    if ok <= 0:
        return 0, 0.0, 0.0, 0.0
    busy = w.mean_ms * ok if w.mean_ms is not None else 0.0
    if w.errors == 0:
        ok_rows = float(w.rows)
    elif w.row_ms:
        ok_rows = busy / w.row_ms
    elif w.mean_mj and w.row_mj:
        ok_rows = ok * w.mean_mj / w.row_mj
    else:  # every figure zero: the rows cannot be told apart; failed requests taken as one row each
        ok_rows = float(most)
    ok_rows = min(max(ok_rows, float(ok)), float(most))
    e_rows = ok_rows
    if w.errors and w.mean_mj and w.row_mj:
        e_rows = min(max(ok * w.mean_mj / w.row_mj, float(ok)), float(most))
    return ok, busy, ok_rows, e_rows


def _start(w: TelemetryWindow) -> _Coarse:
    ok, busy, ok_rows, e_rows = _weights(w)
    lat = ok if (w.mean_ms is not None and ok) else 0
    energy = ok if (w.mean_mj is not None and ok) else 0
    labels = (frozenset({w.energy_meter}), frozenset({w.energy_method}), frozenset({w.energy_hz}),
              frozenset({w.idle_w})) if energy else (frozenset(),) * 4
    return _Coarse(
        first=w, window=w, n=1, count=w.count, errors=w.errors, rows=w.rows, busy_ms=busy, ok_lat=lat,
        ok_rows=ok_rows if lat else 0.0,
        p50=(w.p50_ms * ok, ok) if w.p50_ms is not None and ok else (0.0, 0),
        p95=(w.p95_ms * ok, ok) if w.p95_ms is not None and ok else (0.0, 0), p99=w.p99_ms,
        energy_mj=w.mean_mj * ok if energy else 0.0, ok_e=energy, e_rows=e_rows if energy else 0.0,
        net_mj=w.row_net_mj * e_rows if energy and w.row_net_mj is not None else 0.0,
        net=bool(energy and w.row_net_mj is not None),
        sources=frozenset({w.energy_source}) if energy else frozenset(), labels=labels)


def _compatible(acc: _Coarse, w: TelemetryWindow) -> bool:
    f = acc.first
    if (f.model, f.version, f.where) != (w.model, w.version, w.where):
        return False
    if (max(acc.window.end, w.end) - min(acc.window.start, w.start)).total_seconds() > MAX_WINDOW_S:
        return False
    if acc.count + w.count > INT32_MAX:
        return False
    if acc.count > acc.errors and w.count > w.errors:
        # A window with energy figures next to one without: the merged mean_mj would need how many requests were
        # metered, which no window says. Kept apart, every merged window stays "all metered or none".
        if (acc.ok_e > 0) != (w.mean_mj is not None):
            return False
        if acc.ok_e and acc.net != (w.row_net_mj is not None):
            return False
    return True


def _label(seen: frozenset[Any], unknown: Any) -> Any:
    return next(iter(seen)) if len(seen) == 1 else unknown


def _build(c: _Coarse) -> TelemetryWindow:
    f = c.first
    mean_ms = min(c.busy_ms / c.ok_lat, MAX_LATENCY_MS) if c.ok_lat else None
    row_ms = min(c.busy_ms / c.ok_rows, MAX_LATENCY_MS) if c.ok_lat else None
    p50 = c.p50[0] / c.p50[1] if c.p50[1] else None
    p95 = c.p95[0] / c.p95[1] if c.p95[1] else None
    # Weighted means of ordered figures are ordered; max() only absorbs a last-bit rounding of the division.
    if p50 is not None and p95 is not None:
        p95 = max(p95, p50)
    p99 = max((p for p in (c.p99, p95, p50) if p is not None), default=None)
    if p99 is not None:
        p99 = min(p99, MAX_LATENCY_MS)
    mean_mj = row_mj = net = None
    if c.ok_e:
        mean_mj = min(c.energy_mj / c.ok_e, MAX_ENERGY_MJ)
        row_mj = min(c.energy_mj / c.e_rows, mean_mj)
        net = min(c.net_mj / c.e_rows, row_mj) if c.net else None
        source = "estimated" if c.sources - {"measured"} else "measured"
        meter, method, hz, idle = (_label(c.labels[0], ""), _label(c.labels[1], ""), _label(c.labels[2], None),
                                   _label(c.labels[3], None))
    else:
        source, meter, method, hz, idle = f.energy_source, f.energy_meter, f.energy_method, f.energy_hz, f.idle_w
    return TelemetryWindow(
        model=f.model, version=f.version, where=f.where, start=c.window.start, end=c.window.end, count=c.count,
        errors=c.errors, rows=c.rows, p50_ms=p50, p95_ms=p95, p99_ms=p99, mean_ms=mean_ms, row_ms=row_ms,
        mean_mj=mean_mj, row_mj=row_mj, row_net_mj=net, energy_source=source, energy_meter=meter,
        energy_method=method, energy_hz=hz, idle_w=idle)


def _absorb(acc: _Coarse, w: TelemetryWindow) -> _Coarse | None:
    """`acc` with `w` added, or None when the result would break the contract or lose what a figure means."""
    if not _compatible(acc, w):
        return None
    o = _start(w)
    win = acc.window
    # `window` is refreshed by _build below; these give it its span.
    span = win.model_copy(update={"start": min(win.start, w.start), "end": max(win.end, w.end)})
    merged = replace(
        acc, window=span, n=acc.n + 1, count=acc.count + o.count, errors=acc.errors + o.errors,
        rows=acc.rows + o.rows, busy_ms=acc.busy_ms + o.busy_ms, ok_lat=acc.ok_lat + o.ok_lat,
        ok_rows=acc.ok_rows + o.ok_rows, p50=(acc.p50[0] + o.p50[0], acc.p50[1] + o.p50[1]),
        p95=(acc.p95[0] + o.p95[0], acc.p95[1] + o.p95[1]),
        p99=max((p for p in (acc.p99, o.p99) if p is not None), default=None),
        energy_mj=acc.energy_mj + o.energy_mj, ok_e=acc.ok_e + o.ok_e, e_rows=acc.e_rows + o.e_rows,
        net_mj=acc.net_mj + o.net_mj, net=acc.net or o.net, sources=acc.sources | o.sources,
        labels=tuple(a | b for a, b in zip(acc.labels, o.labels)))
    try:
        return replace(merged, window=_build(merged))
    except ValidationError:  # e.g. overlapping windows holding more than their span admits: keep them apart
        return None


@dataclass
class _Merger:
    """Greedy per (model, version, where): each window joins its key's open coarse window or starts the next."""

    closed: list[TelemetryWindow] = field(default_factory=list)
    open: dict[tuple[str, int, str], _Coarse] = field(default_factory=dict)

    def feed(self, windows: Iterable[TelemetryWindow]) -> None:
        for w in windows:
            key = (w.model, w.version, w.where)
            acc = self.open.get(key)
            grown = _absorb(acc, w) if acc is not None else None
            if grown is None:
                if acc is not None:
                    self.closed.append(acc.window)
                grown = _start(w)
            self.open[key] = grown

    def size(self) -> int:
        return len(self.closed) + len(self.open)

    def windows(self) -> list[TelemetryWindow]:
        out = self.closed + [acc.window for acc in self.open.values()]
        return sorted(out, key=lambda w: (w.start, w.model, w.version, w.where))


def merge_windows(windows: Iterable[TelemetryWindow]) -> list[TelemetryWindow]:
    """Coarser windows with the same sums (see the module docstring); a window that joins none comes back as is."""
    merger = _Merger()
    merger.feed(windows)
    return merger.windows()


# -- the outbox: the edge that acts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What a set of windows counted: requests (failed ones included), errors, rows (inferences)."""

    requests: int = 0
    errors: int = 0
    rows: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.requests + other.requests, self.errors + other.errors, self.rows + other.rows)

    @classmethod
    def of(cls, windows: Iterable[TelemetryWindow]) -> Tally:
        windows = list(windows)
        return cls(sum(w.count for w in windows), sum(w.errors for w in windows), sum(w.rows for w in windows))


@dataclass
class _Entry:
    """One batch file as the index knows it."""

    path: Path
    device_id: str
    epoch: int
    seq: int
    gen: int  # 0: as added; n: merged, one more than the newest generation it replaced
    attempted: bool
    size: int
    windows: int  # on the wire
    originals: int  # original windows it stands for: `merged_windows` of a merged batch, else `windows`
    dropped: int  # the dropped_windows it carries (reported only if it is sent)
    tally: Tally
    replaces: tuple[tuple[int, int], ...] = ()


def _name(seq: int, windows: int, epoch: int, gen: int, attempted: bool) -> str:
    return f"{seq:012d}-{windows}-e{epoch}" + (f"-m{gen}" if gen else "") + ("-a" if attempted else "") + ".json"


def _remove(path: Path) -> None:
    """Delete one batch file (one place, so a test can crash the outbox between two deletions)."""
    path.unlink(missing_ok=True)


class Outbox:
    """Batches on disk until acknowledged; see the module docstring. Thread-safe."""

    STATE_FILE = "outbox.json"

    def __init__(self, directory: str | Path, max_bytes: int, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._clock = clock  # read once, when a new epoch is made
        self._lock = threading.RLock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._open()
        except OSError as exc:
            raise AgentError(f"telemetry outbox {self.dir} cannot be used: {exc}; make it writable by the agent "
                             "or point data_dir elsewhere") from None

    # -- open and recover ----------------------------------------------------------------------------------------

    def _open(self) -> None:
        collect_trash(self.dir)  # temp files of writes a crash interrupted
        state_path = self.dir / self.STATE_FILE
        state: dict[str, Any] = {}
        if state_path.exists():
            try:
                state = dict(read_json(state_path))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("outbox state %s is unreadable (%s): starting a new epoch", state_path, exc)
        self._dropped_pending = int(state.get("dropped_pending", 0))
        self._dropped_total = int(state.get("dropped_total", 0))
        self._dropped_attempted = int(state.get("dropped_attempted_total", 0))
        self._merged_total = int(state.get("merged_total", 0))
        d = state.get("dropped_detail") or {}
        self._dropped_detail = Tally(int(d.get("requests", 0)), int(d.get("errors", 0)), int(d.get("rows", 0)))
        self._entries: dict[int, _Entry] = {}
        self._settled: set[int] = set()
        found = self._scan()
        intent = state.get("intent")
        if isinstance(intent, dict):
            self._recover(intent, found)
        # Originals left by a merge that a crash interrupted: the merged file stands for them.
        for m in [e for e in found if e.gen]:
            replaced = set(m.replaces)
            for e in [e for e in found if e is not m and e.gen < m.gen and (e.epoch, e.seq) in replaced]:
                log.info("outbox: deleting %s, already merged into %s", e.path.name, m.path.name)
                _remove(e.path)
                found.remove(e)
        for e in found:
            self._entries[e.seq] = e
        saved_next = int(state.get("next_seq", 0))
        highest = max(self._entries, default=-1)
        if highest >= saved_next and "next_seq" in state:
            self._dropped_pending = 0  # the batch written just before a crash carried it already
        self._next_seq = max(saved_next, highest + 1)
        epoch = state.get("epoch")
        if not isinstance(epoch, int) or epoch <= 0:
            newest = max((e.epoch for e in self._entries.values()), default=0)
            epoch = max(int(self._clock() * 1000), newest + 1, 1)
        self._epoch = epoch
        fsync_dir(self.dir)
        self._save_state()
        self._enforce_bound()

    def _scan(self) -> list[_Entry]:
        found = []
        for path in sorted(self.dir.glob("*.json")):
            m = _NAME.match(path.name)
            if m is None:
                continue
            try:
                found.append(self._index(path, int(m.group(4) or 0), bool(m.group(5))))
            except (OSError, ValueError) as exc:
                n = int(m.group(2))
                log.warning("outbox: batch file %s is unreadable (%s); its %d windows are counted as dropped",
                            path.name, exc, n)
                _remove(path)
                self._count_drop(n, Tally(), attempted=False)
        return found

    def _index(self, path: Path, gen: int, attempted: bool) -> _Entry:
        batch, replaces = self._parse(path.read_bytes(), gen)
        return _Entry(path=path, device_id=batch.device_id, epoch=batch.epoch, seq=batch.seq, gen=gen,
                      attempted=attempted, size=path.stat().st_size, windows=len(batch.windows),
                      originals=batch.merged_windows if gen else len(batch.windows), dropped=batch.dropped_windows,
                      tally=Tally.of(batch.windows), replaces=replaces)

    @staticmethod
    def _parse(data: bytes, gen: int) -> tuple[TelemetryBatch, tuple[tuple[int, int], ...]]:
        if not gen:
            return TelemetryBatch.model_validate_json(data), ()
        doc = json.loads(data)
        replaces = tuple((int(e), int(s)) for e, s in doc["replaces"])
        return TelemetryBatch.model_validate(doc["batch"]), replaces

    def _recover(self, intent: dict[str, Any], found: list[_Entry]) -> None:
        if intent.get("op") == "merge":
            if not (self.dir / str(intent.get("file"))).exists():
                # Crashed before the merged batch was written: the originals are all there; undo the count.
                self._merged_total -= int(intent.get("added", 0))
                log.info("outbox: a merge interrupted before its write was rolled back")
        elif intent.get("op") == "drop":
            for e in [e for e in found if e.path.name == intent.get("file")]:
                _remove(e.path)  # already counted as dropped before the crash
                found.remove(e)

    # -- state ---------------------------------------------------------------------------------------------------

    def _save_state(self, intent: dict[str, Any] | None = None) -> None:
        d = self._dropped_detail
        atomic_write_json(self.dir / self.STATE_FILE, {
            "epoch": self._epoch, "next_seq": self._next_seq, "dropped_pending": self._dropped_pending,
            "dropped_total": self._dropped_total, "dropped_attempted_total": self._dropped_attempted,
            "merged_total": self._merged_total, "intent": intent,
            "dropped_detail": {"requests": d.requests, "errors": d.errors, "rows": d.rows}})

    def _count_drop(self, originals: int, tally: Tally, *, attempted: bool, carried: int = 0) -> None:
        self._dropped_pending += originals + carried
        self._dropped_total += originals
        self._dropped_detail += tally
        if attempted:
            self._dropped_attempted += originals

    @property
    def next_seq(self) -> int:
        """The seq the next `add` gets: how many batches this outbox has made, across restarts."""
        with self._lock:
            return self._next_seq

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def dropped_pending(self) -> int:
        """Dropped windows not yet reported: the next batch carries them."""
        return self._dropped_pending

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    @property
    def dropped_attempted_total(self) -> int:
        """Of `dropped_total`, windows of batches that may have reached the cloud before they were dropped."""
        return self._dropped_attempted

    @property
    def dropped_detail(self) -> Tally:
        """Requests, errors and rows of the dropped windows."""
        return self._dropped_detail

    @property
    def merged_total(self) -> int:
        """Original windows ever merged into coarser ones (each counted once, however often merged again)."""
        return self._merged_total

    # -- the API -------------------------------------------------------------------------------------------------

    def add(self, device_id: str, windows: list[TelemetryWindow], now: datetime) -> TelemetryBatch:
        """Write a new batch with the next seq and the dropped count; then enforce the size bound. The batch
        returned is what was written; a merge may replace it at once, so send only what `mark_attempted` gives."""
        with self._lock:
            batch = TelemetryBatch(device_id=device_id, epoch=self._epoch, seq=self._next_seq, windows=windows,
                                   dropped_windows=min(self._dropped_pending, INT32_MAX), sent_at=now)
            data = batch.to_wire()
            path = self.dir / _name(batch.seq, len(windows), batch.epoch, 0, False)
            atomic_write_bytes(path, data)
            self._entries[batch.seq] = _Entry(path, device_id, batch.epoch, batch.seq, 0, False, len(data),
                                              len(windows), len(windows), batch.dropped_windows, Tally.of(windows))
            self._next_seq += 1
            self._dropped_pending -= batch.dropped_windows
            self._save_state()
            try:
                self._enforce_bound()
            except OSError as exc:  # a full disk while merging: the batch is safe; resync the index from disk
                log.warning("outbox: could not enforce its %d-byte bound (%s); will retry on the next batch",
                            self.max_bytes, exc)
                self._open_quietly()
            return batch

    def _open_quietly(self) -> None:
        try:
            self._open()
        except OSError as exc:
            log.warning("outbox: could not rescan %s: %s", self.dir, exc)

    def pending(self) -> list[TelemetryBatch]:
        """Unacknowledged batches, oldest first, to publish (again) after a (re)connect."""
        with self._lock:
            out = []
            for seq in sorted(self._entries):
                batch = self._read(self._entries[seq])
                if batch is not None:
                    out.append(batch)
            if len(out) != len(self._entries):
                self._save_state()
            return out

    def _read(self, e: _Entry) -> TelemetryBatch | None:
        try:
            return self._parse(e.path.read_bytes(), e.gen)[0]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("outbox: batch file %s is unreadable (%s); its %d windows are counted as dropped",
                        e.path.name, exc, e.originals)
            _remove(e.path)
            del self._entries[e.seq]
            self._count_drop(e.originals, e.tally, attempted=e.attempted, carried=e.dropped)
            return None

    def _find(self, seq: int, epoch: int | None) -> _Entry | None:
        e = self._entries.get(seq)
        return e if e is not None and (epoch is None or e.epoch == epoch) else None

    def mark_attempted(self, seq: int, epoch: int | None = None) -> TelemetryBatch | None:
        """Batch `seq` is about to be handed to a transport (or was, in a way that may have reached the cloud):
        mark it so that it is never merged, crash-safely. Returns the batch to send; None when it is not pending."""
        with self._lock:
            e = self._find(seq, epoch)
            if e is None:
                return None
            batch = self._read(e)
            if batch is not None and not e.attempted:
                target = e.path.with_name(_name(e.seq, e.windows, e.epoch, e.gen, True))
                os.replace(e.path, target)
                fsync_dir(self.dir)
                e.path, e.attempted = target, True
            return batch

    def ack(self, seq: int, epoch: int | None = None) -> bool:
        """The cloud stored batch `seq` (of `epoch`, when given): delete it. False when no such batch is pending."""
        return self.ack_many(epoch, [seq]) == 1

    def ack_many(self, epoch: int | None, seqs: Iterable[int]) -> int:
        """A `TelemetryAck`: delete these batches of `epoch` (pass its `seqs` and `refused`). Returns how many went."""
        with self._lock:
            gone = 0
            for seq in seqs:
                e = self._find(seq, epoch)
                if e is not None:
                    _remove(e.path)
                    del self._entries[seq]
                    self._settled.discard(seq)
                    gone += 1
            if gone:
                fsync_dir(self.dir)
            return gone

    def size_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- the bound -----------------------------------------------------------------------------------------------

    def _enforce_bound(self) -> None:
        changed = False
        while self.size_bytes() > self.max_bytes:
            plan = self._plan_merge()
            if plan is not None:
                self._merge(*plan)
            elif not self._drop_oldest():
                break  # only the newest batch is left: kept whatever its size
            changed = True
        if changed:
            self._save_state()  # clears the last intent

    def _plan_merge(self) -> tuple[list[_Entry], TelemetryBatch, bytes] | None:
        """The shortest run of oldest never-attempted batches whose merge gets under the bound, else the longest
        one that frees any bytes; None when no run frees anything."""
        order = [self._entries[s] for s in sorted(self._entries)]
        candidates = [e for e in order if not e.attempted]
        excess = self.size_bytes() - self.max_bytes
        for i, head in enumerate(candidates):
            if head.seq in self._settled:
                continue
            merger, group, batches, best = _Merger(), [], [], None
            for e in candidates[i:]:
                if e.device_id != head.device_id:
                    break
                batch = self._read(e)
                if batch is None:  # unreadable: deleted and counted; plan again over what is left
                    return self._plan_merge()
                merger.feed(batch.windows)
                if merger.size() > MAX_WINDOWS_PER_BATCH:
                    if len(group) == 1 and best is None:
                        self._settled.add(head.seq)  # it can absorb nothing more; later heads may
                    break
                group.append(e)
                batches.append(batch)
                merged, data = self._merged_batch(group, batches, merger.windows())
                saved = sum(g.size for g in group) - len(data)
                if saved > 0:
                    best = (list(group), merged, data)
                    if saved >= excess:
                        break
            if best is not None:
                return best
        return None

    def _merged_batch(self, group: list[_Entry], batches: list[TelemetryBatch],
                      windows: list[TelemetryWindow]) -> tuple[TelemetryBatch, bytes]:
        newest = batches[-1]
        merged = TelemetryBatch(
            device_id=newest.device_id, epoch=newest.epoch, seq=newest.seq, windows=windows,
            dropped_windows=min(sum(b.dropped_windows for b in batches), INT32_MAX),
            merged_windows=min(sum(e.originals for e in group), INT32_MAX), sent_at=newest.sent_at)
        gen = max(e.gen for e in group) + 1
        doc = {"gen": gen, "replaces": [[e.epoch, e.seq] for e in group], "batch": json.loads(merged.to_wire())}
        return merged, json.dumps(doc, separators=(",", ":")).encode()

    def _merge(self, group: list[_Entry], merged: TelemetryBatch, data: bytes) -> None:
        gen = max(e.gen for e in group) + 1
        path = self.dir / _name(merged.seq, len(merged.windows), merged.epoch, gen, False)
        added = sum(e.windows for e in group if not e.gen)  # merged ones were counted when they were made
        self._merged_total += added
        # Write order: intent, merged batch, then the originals go; see "Crash safety" in the module docstring.
        self._save_state({"op": "merge", "file": path.name, "added": added,
                          "replaces": [[e.epoch, e.seq] for e in group]})
        atomic_write_bytes(path, data)
        for e in group:
            _remove(e.path)
            del self._entries[e.seq]
            self._settled.discard(e.seq)
        fsync_dir(self.dir)
        self._entries[merged.seq] = _Entry(path, merged.device_id, merged.epoch, merged.seq, gen, False, len(data),
                                           len(merged.windows), merged.merged_windows, merged.dropped_windows,
                                           Tally.of(merged.windows), tuple((e.epoch, e.seq) for e in group))
        log.info("outbox: merged %d batches (%d original windows) into %d windows as seq %d", len(group),
                 merged.merged_windows, len(merged.windows), merged.seq)

    def _drop_oldest(self) -> bool:
        """Last resort: drop the oldest never-attempted batch, else the oldest attempted one; never the newest."""
        order = [self._entries[s] for s in sorted(self._entries)][:-1]
        victims = [e for e in order if not e.attempted] or order
        if not victims:
            return False
        e = victims[0]
        self._count_drop(e.originals, e.tally, attempted=e.attempted, carried=e.dropped)
        self._save_state({"op": "drop", "file": e.path.name})
        _remove(e.path)
        del self._entries[e.seq]
        self._settled.discard(e.seq)
        fsync_dir(self.dir)
        log.warning("outbox over %d bytes: dropped batch %d (%d windows%s), counted", self.max_bytes, e.seq,
                    e.originals, ", attempted: the cloud may hold it" if e.attempted else "")
        return True


__all__ = ["Outbox", "Tally", "merge_windows"]
