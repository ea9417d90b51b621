"""edge_agent/reconcile.py: table-driven, state in -> steps out, including a crash at every phase."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgefleet.edge_agent.lifecycle import FORWARD, MAX_INSTALL_SAVES, MAX_PHASE_ENTRIES, Phase
from edgefleet.edge_agent.reconcile import (
    Activate,
    AgentSnapshot,
    Install,
    Remove,
    Report,
    Resume,
    RetryPolicy,
    Rollback,
    next_wakeup,
    plan,
    statuses,
)
from edgefleet.edge_agent.records import FailedRecord, InstallRecord
from edgefleet.protos.limits import MAX_ERROR_CHARS
from tests.edge_agent import agent_testkit as kit

NOW = kit.T0
POLICY = RetryPolicy(failed_retry_initial_s=60, failed_retry_max_s=3600)


def rec(name="digits", version=2, phase=Phase.DOWNLOAD, entries=1, **kw) -> InstallRecord:
    return InstallRecord(name=name, version=version, bundle_target=kit.target_path(name, version), phase=phase,
                         entries=entries, previous_version=kw.pop("previous_version", 1), started_at=NOW,
                         updated_at=NOW, **kw)


def failed(name="digits", version=2, generation=1, at=NOW, attempts=1) -> FailedRecord:
    return FailedRecord(name=name, version=version, generation=generation, phase="smoke_test",
                        reason="smoke_test_failed", error="differs", at=at, attempts=attempts)


def snap(**kw) -> AgentSnapshot:
    return AgentSnapshot(device_class=kit.DEVICE_CLASS, **kw)


def work(steps):
    """The steps other than the report (reports are checked separately)."""
    return [s for s in steps if not isinstance(s, Report)]


INSTALL_D2 = Install(name="digits", version=2, bundle_target=kit.target_path("digits", 2), generation=1)

CASES = [
    ("nothing desired yet, nothing installed", snap(), None, []),
    ("no desired state keeps what is active", snap(installed={"digits": (1,)}, active={"digits": 1}), None, []),
    ("fresh device installs", snap(), kit.desired([("digits", 2)]), [INSTALL_D2]),
    ("up to date", snap(installed={"digits": (2,)}, active={"digits": 2}), kit.desired([("digits", 2)]), []),
    ("upgrade", snap(installed={"digits": (1,)}, active={"digits": 1}), kit.desired([("digits", 2)]), [INSTALL_D2]),
    ("downgrade to the kept previous is a pointer switch",
     snap(installed={"digits": (1, 2)}, active={"digits": 2}), kit.desired([("digits", 1)]),
     [Activate(name="digits", version=1, generation=1)]),
    ("not desired any more", snap(installed={"digits": (1,)}, active={"digits": 1}), kit.desired([]),
     [Remove(name="digits")]),
    ("two models, sorted by name",
     snap(installed={"b": (1,)}, active={"b": 1}), kit.desired([("c", 1), ("a", 1)]),
     [Install(name="a", version=1, bundle_target=kit.target_path("a", 1), generation=1), Remove(name="b"),
      Install(name="c", version=1, bundle_target=kit.target_path("c", 1), generation=1)]),
    ("failed recently: back off", snap(failed={"digits": failed()}), kit.desired([("digits", 2)]), []),
    ("failed, back-off over: retry as attempt 2", snap(failed={"digits": failed(at=NOW - timedelta(seconds=61))}),
     kit.desired([("digits", 2)]),
     [INSTALL_D2.model_copy(update={"attempt": 2})]),
    ("failed twice: back-off doubled", snap(failed={"digits": failed(at=NOW - timedelta(seconds=61), attempts=2)}),
     kit.desired([("digits", 2)]), []),
    ("failed, newer generation: retry at once", snap(failed={"digits": failed(generation=1)}),
     kit.desired([("digits", 2)], generation=2),
     [INSTALL_D2.model_copy(update={"attempt": 2, "generation": 2})]),
    ("failure of another version does not block", snap(failed={"digits": failed(version=3)}),
     kit.desired([("digits", 2)]), [INSTALL_D2]),
    ("transient back-off pending", snap(installs={"digits": rec(not_before=NOW + timedelta(seconds=5), entries=0)}),
     kit.desired([("digits", 2)]), []),
    ("transient back-off over", snap(installs={"digits": rec(not_before=NOW - timedelta(seconds=1), entries=0)}),
     kit.desired([("digits", 2)]), [Resume(name="digits", version=2, phase=Phase.DOWNLOAD)]),
    ("desired changed under an install: roll back, not a failure",
     snap(installs={"digits": rec(phase=Phase.UNPACK)}), kit.desired([("digits", 3)], generation=2),
     [Rollback(name="digits", version=2, reason="superseded by version 3", mark_failed=False)]),
    ("model removed under an install", snap(installs={"digits": rec(phase=Phase.ACTIVATE)}), kit.desired([]),
     [Rollback(name="digits", version=2, reason="superseded by removal", mark_failed=False)]),
    ("roll back in progress is finished",
     snap(installs={"digits": rec(phase=Phase.ROLLBACK, error="crash loop", entries=5)}),
     kit.desired([("digits", 2)]), [Rollback(name="digits", version=2, reason="crash loop")]),
    ("no desired state: an install record still resumes (it carries its target)",
     snap(installs={"digits": rec(phase=Phase.VERIFY)}), None, [Resume(name="digits", version=2, phase=Phase.VERIFY)]),
]


@pytest.mark.parametrize("name,current,want,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name, current, want, expected):
    assert work(plan(current, want, NOW, POLICY)) == expected


@pytest.mark.parametrize("phase", FORWARD, ids=[p.value for p in FORWARD])
@pytest.mark.parametrize("entries", range(1, MAX_PHASE_ENTRIES + 2))
def test_crash_at_every_phase_resumes_then_rolls_back(phase, entries):
    """A record left by a crash in `phase`: resume it, until the phase was entered MAX_PHASE_ENTRIES times."""
    current = snap(installed={"digits": (1,)}, active={"digits": 1},
                   installs={"digits": rec(phase=phase, entries=entries)})
    steps = work(plan(current, kit.desired([("digits", 2)]), NOW, POLICY))
    if entries < MAX_PHASE_ENTRIES:
        assert steps == [Resume(name="digits", version=2, phase=phase)]
    else:
        assert len(steps) == 1 and isinstance(steps[0], Rollback) and steps[0].mark_failed
        assert f"phase {phase.value} entered {entries} times" in steps[0].reason


def test_an_install_past_its_saves_cap_rolls_back():
    looped = rec(phase=Phase.VERIFY, entries=1, saves=MAX_INSTALL_SAVES)
    current = snap(installed={"digits": (1,)}, active={"digits": 1}, installs={"digits": looped})
    (step,) = work(plan(current, kit.desired([("digits", 2)]), NOW, POLICY))
    assert isinstance(step, Rollback) and step.mark_failed and f"{MAX_INSTALL_SAVES} phase saves" in step.reason
    below = looped.model_copy(update={"saves": MAX_INSTALL_SAVES - 1})
    current = snap(installed={"digits": (1,)}, active={"digits": 1}, installs={"digits": below})
    assert work(plan(current, kit.desired([("digits", 2)]), NOW, POLICY)) == [
        Resume(name="digits", version=2, phase=Phase.VERIFY)]


def test_report_first_and_only_on_change():
    current = snap(installed={"digits": (1,)}, active={"digits": 1})
    want = kit.desired([("digits", 2)])
    steps = plan(current, want, NOW, POLICY)
    assert isinstance(steps[0], Report) and steps[1] == INSTALL_D2
    (status,) = steps[0].models
    assert (status.state, status.active_version, status.target_version) == ("installing", 1, 2)
    reported = snap(installed={"digits": (1,)}, active={"digits": 1}, reported=tuple(steps[0].models))
    assert plan(reported, want, NOW, POLICY) == [INSTALL_D2]


def test_statuses_cover_each_state():
    want = kit.desired([("a", 1), ("b", 2), ("c", 3), ("d", 1)])
    current = snap(installed={"a": (1,), "e": (1,)}, active={"a": 1, "e": 1},
                   installs={"b": rec(name="b", phase=Phase.SMOKE_TEST)}, failed={"c": failed(name="c", version=3)})
    got = {s.name: s for s in statuses(current, want)}
    assert got["a"].state == "active"
    assert got["b"].state == "installing" and got["b"].phase == "smoke_test"
    assert got["c"].state == "failed" and got["c"].error == "smoke_test_failed: differs"
    assert got["d"].state == "installing" and got["d"].phase is None
    assert got["e"].state == "removed"


def test_statuses_clip_error_texts_to_the_contract():
    # An exception's text (ONNX Runtime's are long) must not make the report one the cloud refuses.
    huge = failed(name="c", version=3).model_copy(update={"error": "x" * 50_000})
    current = snap(installs={"b": rec(name="b", phase=Phase.SMOKE_TEST, error="y\x00" * 50_000)},
                   failed={"c": huge})
    got = {s.name: s for s in statuses(current, kit.desired([("b", 2), ("c", 3)]))}
    assert len(got["c"].error) == MAX_ERROR_CHARS and got["c"].error.startswith("smoke_test_failed: xxx")
    assert len(got["b"].error) == MAX_ERROR_CHARS and "\x00" not in got["b"].error


def test_next_wakeup_is_the_earliest_backoff():
    current = snap(failed={"a": failed(name="a", version=1)},
                   installs={"b": rec(name="b", not_before=NOW + timedelta(seconds=7), entries=0)})
    assert next_wakeup(current, kit.desired([("a", 1), ("b", 2)]), NOW, POLICY) == NOW + timedelta(seconds=7)
    assert next_wakeup(snap(), kit.desired([]), NOW, POLICY) is None


