"""The agent daemon: serve at once, enroll, then reconcile the signed desired state with what is installed.

Theory of operation. One loop thread owns every decision; other threads only put events on its queue:
paho's thread hands over desired-state payloads and "connected", the local API's threads run inferences and record
telemetry. At start the daemon serves whatever `models/*/current` names before touching the network, so a device
that reboots without a network keeps answering. Then it enrolls (once; the answer is kept in state.json), opens the
MQTT link and, on every (re)connect (and every `retry.retry_max_s` while the broker is away), fetches the full
desired state over HTTP: the cloud's database is the source of truth, the broker's retained copy only a fast path.

Each desired-state document is verified (signature, device, class, expiry, generation) before it is accepted; the
highest accepted generation is saved (crash-safe) so a replay is refused after a restart too. Then the executor
plans and applies steps until nothing is left (`Executor.converge`), waking again when a back-off ends. Telemetry
windows close every `telemetry.window_s` into the disk outbox and leave it only when the broker acknowledged them
(or the HTTP fallback got a 2xx).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgefleet.edge_agent.apply import Executor
from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import AgentError, CloudUnavailable, EnrollError, Replayed, TrustError
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.link_mqtt import MqttLink
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.meters import ModelledMeter, NullMeter
from edgefleet.edge_agent.reconcile import next_wakeup
from edgefleet.edge_agent.state import StateStore
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.edge_agent.trust import BundleTrust, DesiredStateVerifier
from edgefleet.protos.messages import (
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    ModelStatus,
    ReportedState,
    parse_message,
)

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class _Event:
    kind: str  # "desired" | "connected" | "stop"
    payload: bytes | None = None
    source: str = ""


class _BundleFetcher:
    """apply.Fetcher over the cloud's TUF targets endpoint, resumable with Range."""

    def __init__(self, client: CloudClient, targets_url: str, max_bytes: int) -> None:
        self.client = client
        self.targets_url = targets_url.rstrip("/") + "/"
        self.max_bytes = max_bytes

    def fetch(self, target_path: str, dest: Path, *, expected_length: int | None = None) -> None:
        url = self.targets_url + quote(target_path)
        self.client.download(url, dest, max_bytes=expected_length if expected_length is not None else self.max_bytes)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(config.state_path)
        self.installer = Installer(config.models_dir)
        self.telemetry = Telemetry.from_config(config)
        self.service = InferenceService(self.installer, meter=NullMeter(), telemetry=self.telemetry)
        self.api = LocalApi.from_config(config, self.service, telemetry=self.telemetry)
        self.client = CloudClient(config.cloud_url)
        self.events: queue.Queue[_Event] = queue.Queue()
        self.stopped = threading.Event()
        self.enrollment: EnrollResponse | None = None
        self.verifier: DesiredStateVerifier | None = None
        self.executor: Executor | None = None
        self.link: MqttLink | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {}
        self._last_http_fetch = 0.0  # monotonic time of the last desired-state fetch over HTTP

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start_serving(self) -> dict[str, int]:
        """Serve the last active models before any network: a reboot without a network still answers."""
        enrolled = self.store.state.enrollment
        if enrolled is not None:
            self._set_meter(parse_message(enrolled, EnrollResponse))
        serving = self.service.load_active()
        self.api.start()
        log.info("local API on %s%s; serving %s", self.api.url,
                 f" and {self.config.api.unix_socket}" if self.config.api.unix_socket else "", serving or "nothing yet")
        return serving

    def run(self) -> None:
        """Serve, enroll, connect and reconcile until `stop()`."""
        self.start_serving()
        try:
            if not self._enroll_with_backoff():
                return
            self._connect()
            self._loop()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stopped.set()
        self.events.put(_Event("stop"))

    def _shutdown(self) -> None:
        if self.link is not None:
            self.link.stop()
        self.api.stop()
        # Open windows go to the outbox on disk: the next start sends them.
        self.telemetry.flush(utcnow(), force=True)
        self.client.close()
        log.info("agent stopped")

    # -- enrollment ---------------------------------------------------------------------------------------------------

    def _set_meter(self, enrollment: EnrollResponse) -> None:
        cls = enrollment.device_class
        active = self.config.energy.active_watts or cls.active_watts
        idle = self.config.energy.idle_watts if self.config.energy.idle_watts is not None else cls.idle_watts
        self.service.meter = ModelledMeter(active, idle)

    def _enroll_with_backoff(self) -> bool:
        saved = self.store.state.enrollment
        if saved is not None:
            enrollment = parse_message(saved, EnrollResponse)
            if enrollment.device_id == self.config.device_id and enrollment.device_class.name == self.config.device_class:
                self._enrolled(enrollment)
                return True
            log.warning("config names %s/%s but state.json was enrolled as %s/%s: enrolling again",
                        self.config.device_id, self.config.device_class, enrollment.device_id,
                        enrollment.device_class.name)
        request = EnrollRequest(device_id=self.config.device_id, device_class=self.config.device_class,
                                labels=dict(self.config.labels), agent_version=AGENT_VERSION)
        delay = self.config.retry.retry_initial_s
        while not self.stopped.is_set():
            try:
                enrollment = self.client.enroll(request, self.config.enrollment_token)
            except EnrollError as exc:
                # A refused token will not fix itself, but a daemon that exits gets restarted in a loop: keep serving
                # local models and try again slowly, loudly.
                log.error("%s; fix enrollment_token in the config (fleet tokens create). Retrying in %.0f s",
                          exc, self.config.retry.retry_max_s)
                delay = self.config.retry.retry_max_s
            except CloudUnavailable as exc:
                log.warning("enrollment: %s; retrying in %.1f s", exc, delay)
            else:
                self.store.update(lambda s: s.model_copy(update={"enrollment": enrollment.to_dict()}))
                self._enrolled(enrollment)
                log.info("enrolled as %s (%s)", enrollment.device_id, enrollment.device_class.name)
                return True
            if self.stopped.wait(delay * (1 + random.random() * 0.2)):
                return False
            delay = min(self.config.retry.retry_max_s, delay * 2)
        return False

    def _enrolled(self, enrollment: EnrollResponse) -> None:
        self.enrollment = enrollment
        self.client.set_token(enrollment.device_token)
        self._set_meter(enrollment)
        self.verifier = DesiredStateVerifier(enrollment.desired_state_keys)
        trust = BundleTrust(self.config.tuf_dir, enrollment.tuf_metadata_url, trusted_root=enrollment.tuf_root)
        fetcher = _BundleFetcher(self.client, enrollment.tuf_targets_url,
                                 int(self.config.limits.bundle_max_mb * 1024 * 1024))
        self.executor = Executor(self.config, self.store, self.installer, fetcher, trust,
                                 on_activate=self.service.activate, reporter=self._report_models)
        removed = self.executor.start()
        if removed:
            log.info("cleaned up %s", ", ".join(removed))

    def _connect(self) -> None:
        assert self.enrollment is not None
        broker = self.enrollment.broker
        self.link = MqttLink(
            broker, self.config.device_id,
            on_desired=lambda raw: self.events.put(_Event("desired", raw, "mqtt")),
            on_connected=lambda: self.events.put(_Event("connected")),
            retry_initial_s=self.config.retry.retry_initial_s, retry_max_s=self.config.retry.retry_max_s,
            host_override=self.config.mqtt.host, port_override=self.config.mqtt.port,
        )
        self.link.start()
        # Also fetch over HTTP now: a broker that is down must not keep a new desired state from us.
        self.events.put(_Event("connected", source="start"))

    # -- the loop -----------------------------------------------------------------------------------------------------

    def _desired(self) -> DesiredState | None:
        doc = self.store.state.desired
        if doc is None:
            return None
        return parse_message(doc["payload"], DesiredState)

    def _loop(self) -> None:
        assert self.executor is not None
        while not self.stopped.is_set():
            timeout = self._next_timeout()
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if event is not None and event.kind == "stop":
                break
            try:
                if event is not None and event.kind == "connected":
                    self._fetch_desired()
                elif self._should_poll():
                    self._fetch_desired()
                elif event is not None and event.kind == "desired" and event.payload is not None:
                    self._offer_desired(event.payload, event.source)
                self.executor.converge(self._desired(), utcnow)
                self._send_telemetry()
            except Exception:  # noqa: BLE001 - the loop must survive a bug in one step; it is logged with a trace
                self._count("loop_errors")
                log.exception("agent loop step failed; continuing")

    def _next_timeout(self) -> float:
        now = utcnow()
        timeout = min(1.0, self.config.telemetry.window_s)
        if self.executor is not None:
            wake = next_wakeup(self.executor.snapshot(), self._desired(), now, self.executor.policy)
            if wake is not None:
                timeout = min(timeout, max(0.05, (wake - now).total_seconds()))
        return timeout

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _should_poll(self) -> bool:
        """While the broker is away, poll the desired state over HTTP every `retry.retry_max_s`."""
        if self.link is not None and self.link.connected.is_set():
            return False
        return time.monotonic() - self._last_http_fetch >= self.config.retry.retry_max_s

    def _fetch_desired(self) -> None:
        assert self.enrollment is not None
        self._last_http_fetch = time.monotonic()
        try:
            raw = self.client.desired_state_raw(self.enrollment.desired_state_url)
        except CloudUnavailable as exc:
            log.warning("could not fetch the desired state over HTTP (%s); keeping the accepted one", exc)
            return
        except AgentError as exc:
            log.error("fetching the desired state: %s", exc)
            return
        if raw is not None:
            self._offer_desired(raw, "http")

    def _offer_desired(self, raw: bytes, source: str) -> None:
        """Verify and accept a desired-state document, or refuse it with a reason the cloud will see."""
        assert self.verifier is not None
        highest = self.store.state.highest_generation
        try:
            state = self.verifier.verify(raw, device_id=self.config.device_id, device_class=self.config.device_class,
                                         highest_generation=highest, now=utcnow())
        except Replayed as exc:
            # The same document arrives twice on every connect (retained message and HTTP fetch): not news.
            if highest is not None and self._generation_of(raw) == highest:
                return
            self._refuse(exc, source)
            return
        except TrustError as exc:
            self._refuse(exc, source)
            return
        import json

        doc = json.loads(raw)
        self.store.update(lambda s: s.model_copy(update={"highest_generation": state.generation, "desired": doc}))
        self.last_error = None
        log.info("accepted desired state generation %d from %s: %s", state.generation, source,
                 ", ".join(f"{m.name} v{m.version}" for m in state.models) or "no models")

    @staticmethod
    def _generation_of(raw: bytes) -> int | None:
        try:
            import json

            return int(json.loads(raw)["payload"]["generation"])
        except (ValueError, KeyError, TypeError):
            return None

    def _refuse(self, exc: TrustError, source: str) -> None:
        self._count(f"refused_{exc.reason}")
        self.last_error = f"refused desired state from {source}: {exc}"
        log.warning("%s", self.last_error)
        assert self.executor is not None
        try:
            self._report_models(list(self.store.state.reported or []))
        except AgentError:
            pass  # reported on the next successful report

    # -- reports and telemetry -----------------------------------------------------------------------------------------

    def _report_models(self, models: list[ModelStatus]) -> None:
        report = ReportedState(device_id=self.config.device_id, generation=self.store.state.highest_generation or 0,
                               models=models, last_error=self.last_error, agent_version=AGENT_VERSION,
                               reported_at=utcnow())
        if self.link is not None and self.link.publish_wait(self.link.topics.reported, report, retain=True,
                                                            timeout_s=5):
            return
        try:
            self.client.post_reported(report)  # HTTP fallback while the broker is away
        except AgentError as exc:
            raise AgentError(f"could not report state over MQTT or HTTP: {exc}") from None

    def _send_telemetry(self) -> None:
        self.telemetry.flush(utcnow())
        for batch in self.telemetry.outbox.pending():
            sent = self.link is not None and self.link.publish_wait(self.link.topics.telemetry, batch, timeout_s=5)
            if not sent:
                try:
                    self.client.post_telemetry(batch)
                    sent = True
                except AgentError as exc:
                    log.debug("telemetry batch %d stays in the outbox: %s", batch.seq, exc)
            if not sent:
                return  # keep order: try again on the next tick
            self.telemetry.outbox.ack(batch.seq)


def status_summary(agent: Agent) -> dict[str, Any]:
    """What `edgefleet-agent status` prints: a local view without the cloud."""
    state = agent.store.state
    return {
        "device_id": agent.config.device_id,
        "device_class": agent.config.device_class,
        "enrolled": state.enrollment is not None,
        "highest_generation": state.highest_generation,
        "active": agent.installer.active(),
        "installs": {k: v.phase for k, v in state.installs.items()},
        "failed": {k: v.error for k, v in state.failed.items()},
        "outbox_batches": len(agent.telemetry.outbox),
    }
