"""The telemetry outbox: batches on disk until the cloud confirms it stored them.

Theory of operation: see `Outbox`.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

from edgefleet.common.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow


class Outbox:
    """Batches on disk until acknowledged. Thread-safe: inference threads flush, the link thread acks."""

    STATE_FILE = "outbox.json"

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        state = read_json(self.dir / self.STATE_FILE) if (self.dir / self.STATE_FILE).exists() else {}
        files = self._files()
        # A crash between writing a batch and writing outbox.json: the files are the truth for seq.
        highest = max((seq for seq, _, _ in files), default=-1)
        self._next_seq = max(int(state.get("next_seq", 0)), highest + 1)
        self._dropped_pending = int(state.get("dropped_pending", 0))
        self.dropped_total = int(state.get("dropped_total", 0))

    def _files(self) -> list[tuple[int, int, Path]]:
        out = []
        for path in self.dir.glob("*.json"):
            stem = path.stem.split("-")
            if len(stem) == 2 and stem[0].isdigit() and stem[1].isdigit():
                out.append((int(stem[0]), int(stem[1]), path))
        return sorted(out)

    def _save_state(self) -> None:
        atomic_write_json(self.dir / self.STATE_FILE, {"next_seq": self._next_seq,
                                                        "dropped_pending": self._dropped_pending,
                                                        "dropped_total": self.dropped_total})

    @property
    def dropped_pending(self) -> int:
        return self._dropped_pending

    def add(self, device_id: str, windows: list[TelemetryWindow], now: datetime) -> TelemetryBatch:
        """Write a new batch with the next seq and the dropped count; then enforce the size bound."""
        with self._lock:
            batch = TelemetryBatch(device_id=device_id, seq=self._next_seq, windows=windows,
                                   dropped_windows=self._dropped_pending, sent_at=now)
            atomic_write_bytes(self.dir / f"{batch.seq:012d}-{len(windows)}.json", batch.to_wire())
            self._next_seq += 1
            self._dropped_pending = 0
            self._enforce_bound()
            self._save_state()
            return batch

    def _enforce_bound(self) -> None:
        files = self._files()
        total = sum(p.stat().st_size for _, _, p in files)
        # Keep the newest batch whatever its size: it carries the dropped count.
        while total > self.max_bytes and len(files) > 1:
            _, n_windows, oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            self._dropped_pending += n_windows
            self.dropped_total += n_windows
        fsync_dir(self.dir)

    def pending(self) -> list[TelemetryBatch]:
        """Unacknowledged batches, oldest first, to publish (again) after a (re)connect."""
        with self._lock:
            out = []
            for _, _, path in self._files():
                try:
                    out.append(TelemetryBatch.model_validate_json(path.read_bytes()))
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)  # unreadable: cannot be sent; counted as dropped below
                    self._dropped_pending += 1
                    self.dropped_total += 1
            return out

    def ack(self, seq: int) -> bool:
        """The cloud has batch `seq` (the broker sent PUBACK): delete it. False when it was not pending."""
        with self._lock:
            for s, _, path in self._files():
                if s == seq:
                    path.unlink(missing_ok=True)
                    fsync_dir(self.dir)
                    return True
            return False

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for _, _, p in self._files())

    def __len__(self) -> int:
        return len(self._files())
