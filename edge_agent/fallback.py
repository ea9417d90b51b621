"""The daemon's traffic with the cloud once enrolled: over the link when it acknowledges, over HTTP when it does not.

Theory of operation: a reported state or a telemetry batch is first offered to the `CloudLink`, which returns True
only once the cloud side acknowledged it within `link.ack_timeout_s`. A link that is down answers False at once, a
link that is up but silent answers False after the timeout; either way the same message then goes over HTTP
(`POST /api/v1/devices/{id}/reported`, `.../telemetry`). Duplicates are harmless (reported state is last writer
wins, the cloud ignores a telemetry seq it already stored), a loss is not: a batch leaves the disk outbox only when
one of the two paths acknowledged it, and the outbox drains oldest first and stops at the first batch neither path
took, so the cloud sees batches in order. The desired state comes over HTTP after every (re)connect (the daemon
asks), and every `link.desired_poll_s` (default `retry.retry_max_s`, on the monotonic clock) while the link is down.
"""

from __future__ import annotations

import logging

from edgefleet.edge_agent.clock import Clock
from edgefleet.edge_agent.cloud_client import CloudApi
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import AgentError, CloudUnavailable
from edgefleet.edge_agent.link import CloudLink
from edgefleet.edge_agent.telemetry import Outbox
from edgefleet.protos.messages import ReportedState, TelemetryBatch

log = logging.getLogger(__name__)


class LinkOrHttp:
    def __init__(self, client: CloudApi, clock: Clock, *, ack_timeout_s: float, desired_poll_s: float) -> None:
        self.client = client
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        self.desired_poll_s = desired_poll_s
        self.link: CloudLink | None = None  # set by the daemon once enrolled
        self._last_fetch: float | None = None  # monotonic time of the last desired-state fetch over HTTP

    @classmethod
    def from_config(cls, config: AgentConfig, client: CloudApi, clock: Clock) -> LinkOrHttp:
        return cls(client, clock, ack_timeout_s=config.link.ack_timeout_s, desired_poll_s=config.desired_poll_s)

    @property
    def link_up(self) -> bool:
        return self.link is not None and self.link.connected

    def report(self, report: ReportedState) -> None:
        """Send the reported state; AgentError when neither path took it."""
        if self.link is not None and self.link.publish_reported(report, self.ack_timeout_s):
            return
        try:
            self.client.post_reported(report)
        except AgentError as exc:
            raise AgentError(f"could not report state over the link or HTTP: {exc}") from None

    def send_outbox(self, outbox: Outbox) -> int:
        """Send pending batches oldest first, acking each; stop at the first one neither path took. Returns how many."""
        sent = 0
        for batch in outbox.pending():
            if not self._send_batch(batch):
                break  # keep order: this one and the newer ones go on a later tick
            outbox.ack(batch.seq)
            sent += 1
        return sent

    def _send_batch(self, batch: TelemetryBatch) -> bool:
        if self.link is not None and self.link.publish_telemetry(batch, self.ack_timeout_s):
            return True
        try:
            self.client.post_telemetry(batch)
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
