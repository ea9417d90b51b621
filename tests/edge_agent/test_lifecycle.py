"""edge_agent/lifecycle.py: the table is complete and ends well; the journal saves before effects and caps loops."""

from __future__ import annotations

import pytest

from edgefleet.edge_agent.errors import CrashLoop, LifecycleError
from edgefleet.edge_agent.lifecycle import (
    FORWARD,
    MAX_INSTALL_SAVES,
    MAX_PHASE_ENTRIES,
    TERMINAL,
    TRANSITIONS,
    Journal,
    Outcome,
    Phase,
    crash_loop_reason,
    is_crash_loop,
    next_phase,
)
from edgefleet.edge_agent.records import InstallRecord
from edgefleet.edge_agent.state import StateStore
from tests.edge_agent import agent_testkit as kit


def test_happy_path_walks_the_table():
    phase, seen = Phase.DOWNLOAD, []
    while phase not in TERMINAL:
        seen.append(phase)
        phase = next_phase(phase, Outcome.OK)
    assert seen == list(FORWARD) and phase is Phase.DONE


@pytest.mark.parametrize("phase", FORWARD)
def test_every_forward_phase_has_error_and_crash_loop_exits(phase):
    after_error = next_phase(phase, Outcome.ERROR)
    # Before activate nothing was switched: straight to failed. From activate on: through roll back.
    assert after_error is (Phase.ROLLBACK if phase in (Phase.ACTIVATE, Phase.COMMIT) else Phase.FAILED)
    assert next_phase(phase, Outcome.CRASH_LOOP) is Phase.ROLLBACK
    assert next_phase(Phase.ROLLBACK, Outcome.OK) is Phase.FAILED


def test_no_path_reaches_done_without_commit():
    for (phase, outcome), nxt in TRANSITIONS.items():
        if nxt is Phase.DONE:
            assert (phase, outcome) == (Phase.COMMIT, Outcome.OK)


def test_unknown_transition_is_an_error():
    with pytest.raises(LifecycleError):
        next_phase(Phase.UNPACK, Outcome.RETRY)


def test_journal_saves_before_and_counts(tmp_path):
    store = StateStore(tmp_path / "state.json")
    journal = Journal(store)
    record = journal.begin(InstallRecord(name="m", version=1, bundle_target="t", started_at=kit.T0, updated_at=kit.T0))
    record = journal.enter(record, Phase.DOWNLOAD, kit.T0)
    on_disk = StateStore(tmp_path / "state.json").state.installs["m"]
    assert on_disk.phase is Phase.DOWNLOAD and on_disk.entries == 1 and on_disk.saves == 1
    for n in range(2, MAX_PHASE_ENTRIES + 1):  # restarts re-enter the same phase
        record = journal.enter(record, Phase.DOWNLOAD, kit.T0)
        assert record.entries == n
    with pytest.raises(CrashLoop):
        journal.enter(record, Phase.DOWNLOAD, kit.T0)
    assert StateStore(tmp_path / "state.json").state.installs["m"].entries == MAX_PHASE_ENTRIES
    record = journal.enter(record, Phase.VERIFY, kit.T0)  # a new phase starts its own count
    assert record.entries == 1 and record.saves == MAX_PHASE_ENTRIES + 1
    record = journal.retry(record, "offline", kit.T0)
    assert record.entries == 0 and record.retries == 1  # the entry that met the network error did finish
    journal.finish("m")
    assert StateStore(tmp_path / "state.json").state.installs == {}


def _journal(tmp_path, **caps):
    journal = Journal(StateStore(tmp_path / "state.json"), **caps)
    record = journal.begin(InstallRecord(name="m", version=1, bundle_target="t", started_at=kit.T0, updated_at=kit.T0))
    return journal, record


def test_a_transient_retry_keeps_earlier_crashes_counted(tmp_path):
    journal, record = _journal(tmp_path)
    for _ in range(MAX_PHASE_ENTRIES - 1):  # two entries killed mid-phase
        record = journal.enter(record, Phase.DOWNLOAD, kit.T0)
    record = journal.enter(record, Phase.DOWNLOAD, kit.T0)  # the third meets a network error
    record = journal.retry(record, "offline", kit.T0)
    assert record.entries == MAX_PHASE_ENTRIES - 1
    record = journal.enter(record, Phase.DOWNLOAD, kit.T0)  # and is killed: three crashes in the same place
    with pytest.raises(CrashLoop):
        journal.enter(record, Phase.DOWNLOAD, kit.T0)


def test_a_long_network_outage_never_trips_a_cap(tmp_path):
    journal, record = _journal(tmp_path)
    for _ in range(10 * MAX_INSTALL_SAVES):
        record = journal.enter(record, Phase.DOWNLOAD, kit.T0)
        record = journal.retry(record, "offline", kit.T0)
    assert record.saves == 1 and record.retries == 10 * MAX_INSTALL_SAVES and record.entries == 0


def test_an_install_using_every_phase_allowance_fits_the_saves_cap(tmp_path):
    journal, record = _journal(tmp_path)
    for phase in FORWARD:
        for _ in range(MAX_PHASE_ENTRIES):
            record = journal.enter(record, phase, kit.T0)
    assert record.saves == MAX_INSTALL_SAVES


def test_the_saves_cap_is_enforced(tmp_path):
    journal, record = _journal(tmp_path, saves_cap=4)
    for phase in FORWARD[:4]:
        record = journal.enter(record, phase, kit.T0)
    with pytest.raises(CrashLoop, match="4 phase saves"):
        journal.enter(record, FORWARD[4], kit.T0)
    assert StateStore(tmp_path / "state.json").state.installs["m"].phase is FORWARD[3]  # nothing saved past it
    assert is_crash_loop(record, saves_cap=4) and not is_crash_loop(record)
    assert "4 phase saves" in crash_loop_reason(record)
    assert journal.enter(record, Phase.ROLLBACK, kit.T0).phase is Phase.ROLLBACK  # roll back is never capped


def test_corrupt_state_file_is_moved_aside(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    store = StateStore(tmp_path / "state.json")
    assert store.state.installs == {}
    assert list(tmp_path.glob("state.json.corrupt-*"))
