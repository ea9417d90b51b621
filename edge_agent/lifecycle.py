"""The install lifecycle as ONE table, `(phase, outcome) -> next phase`, and the journal that saves each phase first.

    download ─ok→ verify ─ok→ unpack ─ok→ smoke_test ─ok→ activate ─ok→ commit ─ok→ done
       │ retry (network)  │error     │error       │error          │error       │error
       └→ download        └──────────┴────────────┴→ failed       └────────────┴→ rollback ─ok→ failed

Before `activate` nothing outside the staging area has changed, so an error there ends in `failed` after clean-up;
from `activate` on the `current` pointer may already name the new version, so an error goes through `rollback`,
which points it back at the previous version.

Crash safety (anchor: mender-update `state_machine.cpp` and the state-save cap in `context.cpp`): the journal
writes the phase to `state.json` BEFORE the phase's side effect and keeps two counters on the install record:

- `entries`: how often the current phase was entered without finishing. A transient failure (the network, handled
  by `Journal.retry`) finishes its entry, so it does not count; a crash or a kill does. A phase entered
  `MAX_PHASE_ENTRIES` times without finishing is a crash loop (a model that kills the process on load, a power
  supply that browns out while writing): the next start does not enter it again but rolls back.
- `saves`: how many phase entries the whole install made, not counting the re-entry that resumes a phase after a
  transient failure (so a long network outage never fails an install). The table has no way back to an earlier
  phase, so an install that respects the per-phase cap makes at most `MAX_INSTALL_SAVES` of them; one more is a
  loop the table does not know (a bug, a hand-edited state file) and is treated as a crash loop too.

A restart resumes the saved phase; every phase's side effect is idempotent, so running it again is safe. Roll back
itself is never capped, since it is what ends a loop: it points `current` back at the version that was active when
the install began, reloads that version into the runtime (`on_activate`, which the inference service answers by
loading the model), deletes the new version's files and records the failure. That version was serving before the
install, so its reload is the one load that is known to work.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.edge_agent.errors import CrashLoop, LifecycleError

if TYPE_CHECKING:  # records.py imports Phase from here; avoid the cycle at run time
    from edgefleet.edge_agent.records import AgentState, InstallRecord


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


P, O = Phase, Outcome  # noqa: E741 - the table below reads like the diagram above
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
# Every forward phase entered its full MAX_PHASE_ENTRIES: the most phase saves a loop-free install can make.
MAX_INSTALL_SAVES = len(FORWARD) * MAX_PHASE_ENTRIES


def next_phase(phase: Phase, outcome: Outcome) -> Phase:
    try:
        return TRANSITIONS[(Phase(phase), Outcome(outcome))]
    except KeyError:
        raise LifecycleError(f"no transition from phase {phase!s} on outcome {outcome!s}") from None


def is_crash_loop(record: InstallRecord, cap: int = MAX_PHASE_ENTRIES, saves_cap: int = MAX_INSTALL_SAVES) -> bool:
    """True when entering the saved phase again would pass a cap: the phase was entered `cap` times and never
    finished, or the install already made `saves_cap` phase saves."""
    return record.phase in FORWARD and (record.entries >= cap or record.saves >= saves_cap)


def crash_loop_reason(record: InstallRecord, cap: int = MAX_PHASE_ENTRIES) -> str:
    if record.entries >= cap:
        return f"phase {record.phase.value} entered {record.entries} times without finishing"
    return f"the install made {record.saves} phase saves without finishing (phase {record.phase.value})"


class _Store(Protocol):
    def update(self, fn: Callable[[AgentState], AgentState]) -> AgentState: ...


class Journal:
    """Saves an install's phase before its side effect, counting entries; one instance per state store."""

    def __init__(self, store: _Store, *, cap: int = MAX_PHASE_ENTRIES, saves_cap: int = MAX_INSTALL_SAVES) -> None:
        self._store = store
        self.cap = cap
        self.saves_cap = saves_cap

    def _put(self, record: InstallRecord) -> InstallRecord:
        self._store.update(lambda s: s.with_install(record))
        return record

    def begin(self, record: InstallRecord) -> InstallRecord:
        """Write a new install record (phase = download, nothing entered yet)."""
        return self._put(record)

    def enter(self, record: InstallRecord, phase: Phase, now: datetime, **changes: Any) -> InstallRecord:
        """Save `phase` (and `changes`) BEFORE its side effect. Raises CrashLoop instead of passing either cap."""
        phase = Phase(phase)
        same = record.phase == phase
        entries = record.entries + 1 if same else 1
        # Resuming the phase a transient failure left (Journal.retry set not_before) is not a new save.
        saves = record.saves if same and record.not_before is not None else record.saves + 1
        if phase in FORWARD and entries > self.cap:
            raise CrashLoop(f"phase {phase.value} was entered {record.entries} times without finishing")
        if phase in FORWARD and saves > self.saves_cap:
            raise CrashLoop(f"the install made {record.saves} phase saves without finishing, the cap is "
                            f"{self.saves_cap} (phase {phase.value})")
        updated = record.model_copy(
            update={"phase": phase, "entries": entries, "saves": saves, "updated_at": now, "not_before": None,
                    **changes}
        )
        return self._put(updated)

    def retry(self, record: InstallRecord, error: str, not_before: datetime) -> InstallRecord:
        """A transient failure: stay in the phase and back off. The entry that failed transiently did finish, so
        it leaves the crash count; entries that crashed before it stay counted."""
        updated = record.model_copy(
            update={"entries": max(0, record.entries - 1), "retries": record.retries + 1, "error": error,
                    "not_before": not_before}
        )
        return self._put(updated)

    def finish(self, name: str) -> None:
        self._store.update(lambda s: s.without_install(name))
