"""edge_agent/fallback.py: every report leaves the agent fitted to MAX_MESSAGE_BYTES, on the link and over HTTP.

A report the cloud cannot take is acknowledged by the broker and then dropped, so the device looks silent; before
`fit_report` a report of 512 failed models with long errors went out at about 3 MB.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from edgefleet.edge_agent.clock import SystemClock
from edgefleet.edge_agent.fallback import TRUNCATED, LinkOrHttp, fit_report
from edgefleet.protos.limits import MAX_ERROR_CHARS, MAX_MODELS_PER_REPORT
from edgefleet.protos.messages import MAX_MESSAGE_BYTES, ModelStatus, ReportedState, parse_message
from tests.edge_agent.fakes import MemoryLink

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
# \x01 is six bytes on the wire (\u0001): the worst case for a text the contract admits.
WIDE = "\x01"


class Posts:
    def __init__(self) -> None:
        self.reported: list[ReportedState] = []

    def post_reported(self, msg: ReportedState) -> None:
        self.reported.append(msg)


def failed(i: int, error: str, *, phase: str | None = "verify") -> ModelStatus:
    name = f"m{i:03d}".ljust(64, "x")
    return ModelStatus(name=name, target_version=2, active_version=1, state="failed", phase=phase, error=error)


def report(models: list[ModelStatus], last_error: str | None = None) -> ReportedState:
    return ReportedState(device_id="dev-1", generation=3, models=models, last_error=last_error, reported_at=NOW)


def sent_over(link_up: bool, msg: ReportedState) -> ReportedState:
    posts = Posts()
    path = LinkOrHttp(posts, SystemClock(), ack_timeout_s=0.01, desired_poll_s=60)  # type: ignore[arg-type]
    link = MemoryLink(up=link_up)
    link.start()
    path.link = link
    path.report(msg)
    (got,) = link.reported if link_up else posts.reported
    return got


@pytest.mark.parametrize("link_up", [True, False], ids=["link", "http"])
def test_long_errors_are_cut_from_the_end_until_the_report_fits(link_up):
    errors = [f"bundle {i} refused: " + WIDE * MAX_ERROR_CHARS for i in range(MAX_MODELS_PER_REPORT)]
    big = report([failed(i, e[:MAX_ERROR_CHARS]) for i, e in enumerate(errors)],
                 last_error="refused desired state from mqtt: " + "y" * 900)
    assert len(big.to_wire()) > 10 * MAX_MESSAGE_BYTES  # what went out before
    got = sent_over(link_up, big)
    wire = got.to_wire()
    assert len(wire) <= MAX_MESSAGE_BYTES
    assert parse_message(wire, ReportedState) == got  # the cloud takes it
    assert len(got.models) == MAX_MODELS_PER_REPORT  # no status lost: only texts were cut
    for i, status in enumerate(got.models):
        assert status.error.startswith(f"bundle {i} refused: ") and status.error.endswith(TRUNCATED)
        assert (status.name, status.state, status.phase) == (big.models[i].name, "failed", "verify")
    assert got.last_error == big.last_error  # one text of at most MAX_ERROR_CHARS: kept whole


def test_when_even_bare_statuses_do_not_fit_the_last_ones_are_left_out_and_said_so():
    # 64-character names and phases of six-byte characters: about 600 bytes a status before any error text.
    big = report([failed(i, "x", phase=WIDE * 64) for i in range(MAX_MODELS_PER_REPORT)], last_error="stalled")
    assert len(big.to_wire()) > MAX_MESSAGE_BYTES
    got = fit_report(big)
    wire = got.to_wire()
    assert len(wire) <= MAX_MESSAGE_BYTES
    assert parse_message(wire, ReportedState) == got
    kept = len(got.models)
    assert 0 < kept < MAX_MODELS_PER_REPORT and got.models == big.models[:kept]
    assert f"{MAX_MODELS_PER_REPORT - kept} of {MAX_MODELS_PER_REPORT} model statuses left out" in got.last_error
    assert got.last_error.endswith("stalled")
    # As many as fit: one more would not.
    one_more = got.model_copy(update={"models": big.models[: kept + 1]})
    assert len(one_more.to_wire()) > MAX_MESSAGE_BYTES


def test_a_report_that_fits_goes_out_unchanged():
    small = report([failed(1, "smoke test failed: output 'y' differs by 3.2")], last_error="x" * MAX_ERROR_CHARS)
    assert fit_report(small) is small
    assert sent_over(True, small) == small


class TelemetryPosts:
    """The HTTP side for telemetry: refuses for good (422) the seqs in `refuse`, is unreachable while `down`."""

    def __init__(self, refuse: set[int], down: bool = False) -> None:
        self.refuse, self.down, self.stored = refuse, down, []

    def post_telemetry(self, msg) -> None:
        from edgefleet.edge_agent.errors import CloudUnavailable, MessageRefused

        if self.down:
            raise CloudUnavailable("cannot reach the cloud")
        if msg.seq in self.refuse:
            raise MessageRefused("POST refused for good (422): out_of_range")
        self.stored.append(msg.seq)


def test_a_batch_refused_for_good_is_dropped_and_counted_not_left_to_block_the_outbox(tmp_path):
    from edgefleet.edge_agent.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox", 1 << 20)
    for _ in range(3):
        outbox.add("dev-1", [], NOW)
    posts = TelemetryPosts(refuse={1})
    path = LinkOrHttp(posts, SystemClock(), ack_timeout_s=0.01, desired_poll_s=60)  # type: ignore[arg-type]
    assert path.send_outbox(outbox) == 3
    assert posts.stored == [0, 2] and len(outbox) == 0 and path.refused_batches == 1


def test_a_cloud_that_cannot_be_reached_keeps_every_batch_and_a_late_ack_drains_one(tmp_path):
    from edgefleet.edge_agent.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox", 1 << 20)
    batches = [outbox.add("dev-1", [], NOW) for _ in range(3)]
    path = LinkOrHttp(TelemetryPosts(set(), down=True), SystemClock(), ack_timeout_s=0.01,  # type: ignore[arg-type]
                      desired_poll_s=60)
    link = MemoryLink(ack=False)
    link.start()
    path.link = link
    assert path.send_outbox(outbox) == 0 and len(outbox) == 3  # the broker took it, no one confirmed: kept
    link.late_acks.append((batches[0].epoch, batches[0].seq))  # the cloud came back and stored the first
    assert path.send_outbox(outbox) == 0 and [b.seq for b in outbox.pending()] == [1, 2]
    link.late_acks.append((batches[0].epoch + 1, 1))  # an ack for another epoch names another batch: ignored
    path.send_outbox(outbox)
    assert [b.seq for b in outbox.pending()] == [1, 2]
