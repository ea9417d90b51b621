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
- Merging windows (edge_agent/outbox_merge.py, a pure core). Same (model, version, where), in arrival order,
  contiguous or not, spanning at most `MAX_WINDOW_S`. Counts, errors and rows add exactly. Means are weighted by what
  they are means over (edge_agent/telemetry.py `_Window.close`): `mean_ms` by successful requests (count - errors),
  `row_ms` by the successful requests' rows, recovered as busy time / `row_ms` (exactly `rows` when nothing failed);
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet.common.fsutil import atomic_write_bytes, atomic_write_json, collect_trash, fsync_dir, read_json
from edgefleet.edge_agent.errors import AgentError
from edgefleet.edge_agent.outbox_merge import Merger, Tally
from edgefleet.protos.limits import INT32_MAX, MAX_WINDOWS_PER_BATCH
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{12})-(\d+)(?:-e(\d+))?(?:-m(\d+))?(-a)?\.json$")


# -- the outbox: the edge that acts ------------------------------------------------------------------------------


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
            merger, group, batches, best = Merger(), [], [], None
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


__all__ = ["Outbox"]
