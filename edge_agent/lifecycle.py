"""The install lifecycle as ONE table, `(phase, outcome) -> next phase`, and the journal that saves each phase first.

    download ─ok→ verify ─ok→ unpack ─ok→ smoke_test ─ok→ activate ─ok→ commit ─ok→ done
       │ retry (network)  │error     │error       │error          │error       │error
       └→ download        └──────────┴────────────┴→ failed       └────────────┴→ rollback ─ok→ failed

Before `activate` nothing outside the staging area has changed, so an error there ends in `failed` after clean-up;
from `activate` on the `current` pointer may already name the new version, so an error goes through `rollback`,
which points it back at the previous version.

Crash safety (anchor: mender-update `state_machine.cpp` and the state-save cap in `context.cpp`): the journal
writes the phase to `state.json` BEFORE the phase's side effect, and counts how many times the phase was entered.
A restart resumes the saved phase; every phase's side effect is idempotent, so running it again is safe. A phase
entered `MAX_PHASE_ENTRIES` times without finishing is a crash loop (a model that kills the process on load, a
power supply that browns out while writing): the next start does not enter it again but rolls back. Roll back
itself is never capped; it only moves pointers and deletes, and it is what ends the loop.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Callable, Protocol

from edgefleet.edge_agent.errors import AgentError

if TYPE_CHECKING:  # state.py imports Phase from here; avoid the cycle at run time
    from edgefleet.edge_agent.state import AgentState, InstallRecord


class Phase(str, Enum):
    DOWNLOAD = "download"
    VERIFY = "verify"
    UNPACK = "unpack"
    SMOKE_TEST = "smoke_test"
    ACTIVATE = "activate"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    DONE = "done"
    FAILED = "failed"


class Outcome(str, Enum):
    OK = "ok"
    ERROR = "error"  # permanent for this attempt: bad bundle, failed smoke test, untrusted target
    RETRY = "retry"  # transient: the cloud is unreachable; stay in the phase and back off
    CRASH_LOOP = "crash_loop"  # the phase was entered too often without finishing


P, O = Phase, Outcome
TRANSITIONS: dict[tuple[Phase, Outcome], Phase] = {
    (P.DOWNLOAD, O.OK): P.VERIFY,
    (P.DOWNLOAD, O.RETRY): P.DOWNLOAD,
    (P.DOWNLOAD, O.ERROR): P.FAILED,
    (P.VERIFY, O.OK): P.UNPACK,
    (P.VERIFY, O.RETRY): P.VERIFY,  # fetching TUF metadata can fail on the network too
    (P.VERIFY, O.ERROR): P.FAILED,
    (P.UNPACK, O.OK): P.SMOKE_TEST,
    (P.UNPACK, O.ERROR): P.FAILED,
    (P.SMOKE_TEST, O.OK): P.ACTIVATE,
    (P.SMOKE_TEST, O.ERROR): P.FAILED,
    (P.ACTIVATE, O.OK): P.COMMIT,
    (P.ACTIVATE, O.ERROR): P.ROLLBACK,
    (P.COMMIT, O.OK): P.DONE,
    (P.COMMIT, O.ERROR): P.ROLLBACK,
    (P.ROLLBACK, O.OK): P.FAILED,
    (P.ROLLBACK, O.ERROR): P.ROLLBACK,  # retried on the next start; roll back must finish
}
# A crash loop in any forward phase ends in roll back (which is a no-op before activate, beyond clean-up).
for _phase in (P.DOWNLOAD, P.VERIFY, P.UNPACK, P.SMOKE_TEST, P.ACTIVATE, P.COMMIT):
    TRANSITIONS[(_phase, O.CRASH_LOOP)] = P.ROLLBACK

FIRST_PHASE = Phase.DOWNLOAD
TERMINAL = frozenset({Phase.DONE, Phase.FAILED})
FORWARD = (P.DOWNLOAD, P.VERIFY, P.UNPACK, P.SMOKE_TEST, P.ACTIVATE, P.COMMIT)
# Phases after which the `current` pointer may name the new version.
POINTER_MAY_BE_SWITCHED = frozenset({Phase.ACTIVATE, Phase.COMMIT, Phase.ROLLBACK})
# 3 tries of one phase: one crash can be bad luck (power cut), three in the same place is the model or the bundle.
MAX_PHASE_ENTRIES = 3


class LifecycleError(AgentError):
    reason = "lifecycle"


class CrashLoop(AgentError):
    reason = "crash_loop"


def next_phase(phase: Phase, outcome: Outcome) -> Phase:
    try:
        return TRANSITIONS[(Phase(phase), Outcome(outcome))]
    except KeyError:
        raise LifecycleError(f"no transition from phase {phase!s} on outcome {outcome!s}") from None


def is_crash_loop(record: "InstallRecord", cap: int = MAX_PHASE_ENTRIES) -> bool:
    """True when the saved phase was entered `cap` times and never finished (a restart would be one more)."""
    return record.phase in FORWARD and record.entries >= cap


class _Store(Protocol):
    def update(self, fn: Callable[["AgentState"], "AgentState"]) -> "AgentState": ...


class Journal:
    """Saves an install's phase before its side effect, counting entries; one instance per state store."""

    def __init__(self, store: _Store, *, cap: int = MAX_PHASE_ENTRIES) -> None:
        self._store = store
        self.cap = cap

    def _put(self, record: "InstallRecord") -> "InstallRecord":
        self._store.update(lambda s: s.with_install(record))
        return record

    def begin(self, record: "InstallRecord") -> "InstallRecord":
        """Write a new install record (phase = download, nothing entered yet)."""
        return self._put(record)

    def enter(self, record: "InstallRecord", phase: Phase, now: datetime, **changes) -> "InstallRecord":
        """Save `phase` (and `changes`) BEFORE its side effect. Raises CrashLoop instead of a fourth entry."""
        phase = Phase(phase)
        entries = record.entries + 1 if record.phase == phase else 1
        if phase in FORWARD and entries > self.cap:
            raise CrashLoop(f"phase {phase.value} was entered {record.entries} times without finishing")
        updated = record.model_copy(
            update={"phase": phase, "entries": entries, "saves": record.saves + 1, "updated_at": now,
                    "not_before": None, **changes}
        )
        return self._put(updated)

    def retry(self, record: "InstallRecord", error: str, not_before: datetime) -> "InstallRecord":
        """A transient failure: stay in the phase, back off, and do not count it toward the crash cap."""
        updated = record.model_copy(
            update={"entries": 0, "retries": record.retries + 1, "error": error, "not_before": not_before}
        )
        return self._put(updated)

    def finish(self, name: str) -> None:
        self._store.update(lambda s: s.without_install(name))
