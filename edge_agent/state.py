"""The agent's persisted state (`{data_dir}/state.json`), written crash-safe after every change.

Theory of operation: `AgentState` (in `records.py`, with the records it holds, so the pure planner can use them
without importing this I/O module) is a frozen pydantic model; a change is a pure function old -> new, applied by
`StateStore.update(fn)` under a lock and written with `atomic_write_bytes` (temp, fsync, rename, fsync dir) before
`update` returns. So the file on disk is always one complete state, and the state in memory is never ahead of it.

What the state holds, and what it does not, is told in `records.py`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.edge_agent.records import AgentState

log = logging.getLogger(__name__)


class StateStore:
    """Loads `state.json` once, then every `update` writes the new state to disk before returning it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._state = self._load()
        self.writes = 0

    def _load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        try:
            return AgentState.model_validate_json(self.path.read_bytes())
        except (ValidationError, ValueError, OSError) as exc:
            # Atomic writes make this a disk fault or a hand edit. Keep the bad file for a person to read and start
            # from empty state: the installed models on disk still serve, and the cloud re-sends the desired state.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("state file %s is unreadable (%s); moved to %s and starting fresh", self.path, exc, aside.name)
            return AgentState()

    @property
    def state(self) -> AgentState:
        return self._state

    def save(self, state: AgentState) -> AgentState:
        with self._lock:
            atomic_write_bytes(self.path, state.model_dump_json(indent=1).encode(), mode=0o600)
            self._state = state
            self.writes += 1
            return state

    def update(self, fn: Callable[[AgentState], AgentState]) -> AgentState:
        with self._lock:
            return self.save(fn(self._state))
