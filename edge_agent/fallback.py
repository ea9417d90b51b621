"""The daemon's traffic with the cloud once enrolled: over the link when it acknowledges, over HTTP when it does not.

Theory of operation: a reported state or a telemetry batch is first offered to the `CloudLink`, which returns True
only once the cloud side acknowledged it within `link.ack_timeout_s` (telemetry: once the cloud confirmed it stored
it). A link that is down answers False at once, a link that is up but silent answers False after the timeout;
either way the same message then goes over HTTP (`POST /api/v1/devices/{id}/reported`, `.../telemetry`).
Duplicates are harmless (reported state is last writer wins, the cloud stores a telemetry (epoch, seq) once), a
loss is not: a batch leaves the disk outbox only when one of the two paths confirmed it, and the outbox drains
oldest first and stops at the first batch neither path took, so the cloud sees batches in order. The desired state
comes over HTTP after every (re)connect (the daemon asks), and every `link.desired_poll_s` (default
`retry.retry_max_s`, on the monotonic clock) while the link is down.
Every report is first fitted to MAX_MESSAGE_BYTES (`fit_report`), so neither path carries one the cloud would drop.
"""

from __future__ import annotations

import logging

from edgefleet.edge_agent.clock import Clock
from edgefleet.edge_agent.cloud_client import CloudApi
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import AgentError, CloudUnavailable, MessageRefused
from edgefleet.edge_agent.link import CloudLink
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.protos.limits import MAX_ERROR_CHARS
from edgefleet.protos.messages import MAX_MESSAGE_BYTES, ReportedState, TelemetryBatch

log = logging.getLogger(__name__)
TRUNCATED = "… [truncated]"
# Error lengths tried, longest first, until a report fits; 40 characters still name the failure.
_ERROR_STEPS = (MAX_ERROR_CHARS // 2, MAX_ERROR_CHARS // 4, 120, 40)


def clip_error(text: str | None, limit: int) -> str | None:
    """The start of `text`, at most `limit` characters, ending in TRUNCATED when it was cut."""
    if text is None or len(text) <= limit:
        return text
    return text[: max(0, limit - len(TRUNCATED))] + TRUNCATED


def fit_report(report: ReportedState, max_bytes: int = MAX_MESSAGE_BYTES) -> ReportedState:
    """`report` shortened until its wire form fits `max_bytes`, the most the cloud takes on either path.

    A larger report is acknowledged by the broker and then dropped by the cloud, so the device would look silent
    (measured: a long refusal made a 328 KB report). Every model's error is cut first, keeping its start, to shorter
    lengths in turn (`last_error` is one text, already at most MAX_ERROR_CHARS: the daemon clips it). Only if the
    statuses alone do not fit (hundreds of models) are the last ones left out, and `last_error` says how many.
    """
    if len(report.to_wire()) <= max_bytes:
        return report
    for limit in _ERROR_STEPS:
        models = [m.model_copy(update={"error": clip_error(m.error, limit)}) for m in report.models]
        candidate = report.model_copy(update={"models": models})
        if len(candidate.to_wire()) <= max_bytes:
            return candidate

    def cut(keep: int) -> ReportedState:
        note = (f"report cut to fit {max_bytes} bytes: {len(report.models) - keep} of {len(report.models)} model "
                f"statuses left out; {report.last_error or 'no other error'}")
        return candidate.model_copy(update={"models": candidate.models[:keep],
                                            "last_error": clip_error(note, MAX_ERROR_CHARS)})

    fits, too_many = 0, len(candidate.models)  # cut(0) fits: a bare report is a few hundred bytes
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if len(cut(mid).to_wire()) <= max_bytes else (fits, mid)
    return cut(fits)


class LinkOrHttp:
    def __init__(self, client: CloudApi, clock: Clock, *, ack_timeout_s: float, desired_poll_s: float) -> None:
        self.client = client
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        self.desired_poll_s = desired_poll_s
        self.link: CloudLink | None = None  # set by the daemon once enrolled
        self._last_fetch: float | None = None  # monotonic time of the last desired-state fetch over HTTP
        self.refused_batches = 0  # telemetry batches the cloud refused for good (422), dropped, since start

    @classmethod
    def from_config(cls, config: AgentConfig, client: CloudApi, clock: Clock) -> LinkOrHttp:
        return cls(client, clock, ack_timeout_s=config.link.ack_timeout_s, desired_poll_s=config.desired_poll_s)

    @property
    def link_up(self) -> bool:
        return self.link is not None and self.link.connected

    def report(self, report: ReportedState) -> None:
        """Send the reported state (shortened to fit, `fit_report`); AgentError when neither path took it."""
        report = fit_report(report)
        if self.link is not None and self.link.publish_reported(report, self.ack_timeout_s):
            return
        try:
            self.client.post_reported(report)
        except AgentError as exc:
            raise AgentError(f"could not report state over the link or HTTP: {exc}") from None

    def send_outbox(self, outbox: Outbox) -> int:
        """Send pending batches oldest first, acking each; stop at the first one neither path took. Returns how many.

        Confirmations that came late over the link (the cloud was away, then stored what the broker kept for it)
        drain their batches first. A batch is marked attempted before it is handed to a transport: from then on the
        cloud may hold it, so a full outbox never merges it into others (that would count its windows twice)."""
        if self.link is not None:
            for epoch, seq in self.link.take_acked():
                outbox.ack(seq, epoch=epoch)
        sent = 0
        for pending in outbox.pending():
            # What mark_attempted returns is what goes out: a merge may have replaced the listed copy meanwhile.
            batch = outbox.mark_attempted(pending.seq, pending.epoch)
            if batch is None:
                continue  # merged into another or acked meanwhile
            if not self._send_batch(batch):
                break  # keep order: this one and the newer ones go on a later tick
            outbox.ack(batch.seq, epoch=batch.epoch)
            sent += 1
        return sent

    def _send_batch(self, batch: TelemetryBatch) -> bool:
        if self.link is not None and self.link.publish_telemetry(batch, self.ack_timeout_s):
            return True
        try:
            self.client.post_telemetry(batch)
        except MessageRefused as exc:
            # Sending it again cannot succeed, and keeping it would hold every newer batch behind it. The cloud
            # counted the refusal (refused_telemetry_*); here it is counted and logged, never silent.
            self.refused_batches += 1
            log.error("the cloud refused telemetry batch %d for good; dropped it: %s", batch.seq, exc)
            return True
        except AgentError as exc:
            log.debug("telemetry batch %d stays in the outbox: %s", batch.seq, exc)
            return False
        return True

    def poll_due(self) -> bool:
        """While the link is down, the desired state is fetched over HTTP every `desired_poll_s`."""
        if self.link_up:
            return False
        return self._last_fetch is None or self.clock.monotonic() - self._last_fetch >= self.desired_poll_s

    def fetch_desired(self, url: str) -> bytes | None:
        """The signed desired-state document over HTTP, or None (none yet, or the cloud could not be asked)."""
        self._last_fetch = self.clock.monotonic()
        try:
            return self.client.desired_state_raw(url)
        except CloudUnavailable as exc:
            log.warning("could not fetch the desired state over HTTP (%s); keeping the accepted one", exc)
        except AgentError as exc:
            log.error("fetching the desired state: %s", exc)
        return None
