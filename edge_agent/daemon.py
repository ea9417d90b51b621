"""The agent daemon: serve at once, enroll, then reconcile the signed desired state with what is installed.

Theory of operation. One loop thread owns every decision; other threads only put events on its queue: the link's
thread hands over desired-state payloads and "connected", the local API's threads run inferences and record
telemetry. At start the daemon serves whatever `models/*/current` names before touching the network, so a device
that reboots without a network keeps answering. Then it enrolls (once; the answer is kept in state.json), opens its
`CloudLink` (MQTT, or gRPC with transport = "grpc") and, on every (re)connect, fetches the full desired state over
HTTP: the cloud's database is the source of truth, the link's copy only a fast path. While the link is down the
fetch repeats every `link.desired_poll_s`, and reports and telemetry go over HTTP (`fallback.LinkOrHttp`).

Each desired-state document is verified (signature, device, class, expiry, generation) before it is accepted; the
highest accepted generation is saved (crash-safe) so a replay is refused after a restart too. The same generation
arriving twice (the retained copy and the HTTP fetch after every connect) is not news and is dropped quietly; an
older, foreign, expired, forged or garbled document is refused, counted, and named in the reported state's
`last_error` (sent at once, and again every tick until it got through); only an older one that the broker handed
over on subscribe (its retained copy, which can lag the database the HTTP fetch read) is refused and counted
without that alarm. The keys the signature is checked against
follow the cloud's key rotations (`keyring.py`): a document signed by a key the agent does not know, or one that a
trusted key no longer signs, makes the agent walk the cloud's signed key lists (through TUF) and save the result in
`desired_keys.json` before using it. Then the executor plans and applies steps
until nothing is left (`Executor.converge`, at most `reconcile.max_rounds` rounds; running out goes into
`last_error` too), waking again when a back-off ends and at the latest every `reconcile.tick_s`. Telemetry windows
close every `telemetry.window_s` into the disk outbox and leave it only once the link or HTTP acknowledged them.

Seams, each defaulting to the production part: `link_factory` (`link.LinkFactory`, default `MqttLink.from_config`,
or `GrpcLink.from_config` with transport = "grpc"), `client` (`cloud_client.CloudApi`), `clock` (`clock.Clock`, the
only source of time here) and `trust_factory` (the executor's TUF `TargetVerifier`). `run_once` is one turn of the
loop, so a unit test can drive it without threads.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edgefleet.common.backoff import full_jitter_delay
from edgefleet.common.fsutil import private_dir
from edgefleet.common.runtimes import make_runtime
from edgefleet.edge_agent.apply import Executor, Fetcher, TargetVerifier
from edgefleet.edge_agent.clock import Clock, SystemClock
from edgefleet.edge_agent.cloud_client import CloudApi, CloudClient
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.emulate import slowed_factory
from edgefleet.edge_agent.errors import (
    AgentError,
    BadSignature,
    CloudUnavailable,
    EnrollError,
    EnrollmentRefused,
    Replayed,
    TrustError,
)
from edgefleet.edge_agent.fallback import LinkOrHttp
from edgefleet.edge_agent.fetch import GrpcBundleFetcher, HttpBundleFetcher
from edgefleet.edge_agent.identity import DeviceKey
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.keyring import advance, load_ring, save_ring
from edgefleet.edge_agent.link import CloudLink, LinkFactory
from edgefleet.edge_agent.link_grpc import GrpcLink, require_grpc
from edgefleet.edge_agent.link_mqtt import MqttLink
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.meters import NullMeter
from edgefleet.edge_agent.meters.detect import meter_for_class
from edgefleet.edge_agent.offload import Router
from edgefleet.edge_agent.reconcile import next_wakeup
from edgefleet.edge_agent.state import StateStore
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.edge_agent.trust import BundleTrust, DesiredStateVerifier, KeyDocumentSource
from edgefleet.protos.limits import clip_text
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
DESIRED_KEYS_FILE = "desired_keys.json"
# 60 s: the least time between two looks at the cloud's key lists prompted by a document signed by an unknown key,
# so a stream of such documents costs one TUF refresh a minute, not one each.
UNKNOWN_KEY_RECHECK_S = 60.0


@dataclass(frozen=True)
class _Event:
    kind: str  # "desired" | "connected" | "stop"
    payload: bytes | None = None
    source: str = ""
    retained: bool = False  # a desired state the broker kept and handed over on subscribe


class Agent:
    def __init__(self, config: AgentConfig, *, link_factory: LinkFactory | None = None,
                 client: CloudApi | None = None, clock: Clock | None = None,
                 trust_factory: Callable[[EnrollResponse], TargetVerifier] | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.client = client if client is not None else CloudClient(config.cloud_url)
        # transport = "grpc": the cloud's agent channel (link_grpc.py, which loads grpc only when it starts).
        # With no [grpc] target the link asks the cloud where its channel is (GET /api/v1/agent-channel).
        default_link: Any = partial(GrpcLink.from_config, discover=self.client.agent_channel) \
            if config.transport == "grpc" else MqttLink.from_config
        self.link_factory = link_factory or partial(default_link, config, clock=self.clock)
        self._default_link = link_factory is None
        self._meter_key: tuple | None = None  # the device class the meter was picked for (_set_meter)
        self.trust_factory = trust_factory or (lambda enrollment: BundleTrust(
            config.tuf_dir, enrollment.tuf_metadata_url, trusted_root=enrollment.tuf_root))
        if private_dir(config.data_dir):  # state.json holds the device token, device_key.pem the device's key
            log.warning("data dir %s was open to other users; made it 0700", config.data_dir)
        self.store = StateStore(config.state_path)
        self.installer = Installer(config.models_dir)
        self.telemetry = Telemetry.from_config(config)
        # offload.slowdown_factor > 1, or emulate_class, emulates a slower class on this machine (emulate.py, logged).
        # The serving runtimes get [runtime]'s thread counts, as the executor's smoke tests do.
        factor = None if config.offload.emulate_class else config.offload.slowdown_factor
        runtimes = partial(make_runtime, intra_op_threads=config.runtime.intra_op_threads,
                           inter_op_threads=config.runtime.inter_op_threads)
        self.service = InferenceService(self.installer, meter=NullMeter(), telemetry=self.telemetry,
                                        clock=self.clock.now, runtime_factory=slowed_factory(runtimes, factor))
        # The offload router (edge_agent/offload.py) only when offload is on: off, requests take the service's
        # own path, with no policy's bookkeeping on it.
        self.router = Router.from_config(config, self.service, telemetry=self.telemetry) \
            if config.offload.enabled else None
        self.api = LocalApi.from_config(config, self.service, telemetry=self.telemetry, router=self.router)
        self.link_or_http = LinkOrHttp.from_config(config, self.client, self.clock)
        self.events: queue.Queue[_Event] = queue.Queue()
        self.stopped = threading.Event()
        self.enrollment: EnrollResponse | None = None
        self.verifier: DesiredStateVerifier | None = None
        self.key_source: KeyDocumentSource | None = None  # where rotated desired-state keys are learned (TUF)
        self._keys_looked_at: float | None = None  # monotonic time of the last look prompted by an unknown key
        self.executor: Executor | None = None
        self.link: CloudLink | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {}
        self._error_unsent = False  # last_error changed but no report carried it yet
        self._stall: str | None = None  # why the last converge ran out of rounds, while it does

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start_serving(self) -> dict[str, int]:
        """Serve the last active models before any network: a reboot without a network still answers."""
        enrolled = self.store.state.enrollment
        if enrolled is not None:
            self._set_meter(parse_message(enrolled, EnrollResponse))
        serving = self.service.load_active()
        self._follow_budgets(self._desired())
        self.api.start()
        log.info("local API on %s%s; serving %s", self.api.url,
                 f" and {self.config.api.unix_socket}" if self.config.api.unix_socket else "", serving or "nothing yet")
        return serving

    def run(self) -> None:
        """Serve, enroll, connect and reconcile until `stop()`."""
        if self.config.transport == "grpc" and self._default_link:
            require_grpc()  # a lean install without grpcio: say how to install it, before anything starts
        self.start_serving()
        try:
            if not self.connect():
                return
            while not self.stopped.is_set() and self.run_once(self._next_timeout()):
                pass
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stopped.set()
        self.events.put(_Event("stop"))

    def shutdown(self) -> None:
        if self.link is not None:
            self.link.stop()
        self.api.stop()
        if self.router is not None:
            self.router.close()
        # Open windows go to the outbox on disk: the next start sends them.
        self.telemetry.flush(self.clock.now(), force=True)
        if hasattr(self.service.meter, "close"):
            self.service.meter.close()  # a sampled meter's thread stops with it
        self.client.close()
        log.info("agent stopped")

    # -- enrollment ---------------------------------------------------------------------------------------------------

    def _set_meter(self, enrollment: EnrollResponse) -> None:
        """Pick the energy meter once the device class is known (meters/detect.py: the configured one, or the first
        that reads) and hand it to inference and telemetry. A meter that cannot read (no sensor, permission denied)
        falls back with the reason and its fix logged, never a crash. The same class again keeps the meter."""
        cls = enrollment.device_class
        key = (cls.name, cls.active_watts, cls.idle_watts, tuple(cls.execution_providers))
        if self._meter_key == key:
            return
        meter, idle_w = meter_for_class(self.config.energy, cls, window_s=self.config.telemetry.window_s)
        previous = self.service.meter
        self.service.meter = meter
        self.telemetry.attach_meter(meter, self.clock.now(), idle_w=idle_w)
        if previous is not meter and hasattr(previous, "close"):
            previous.close()  # a sampled meter's thread stops with it
        self._meter_key = key
        log.info("energy meter: %s (%s, %s)%s", meter.name, meter.source, getattr(meter, "method", "") or "-",
                 f": {meter.label}" if getattr(meter, "label", "") else "")

    def connect(self) -> bool:
        """Enroll (with back-off) and start the link; False when stopped first."""
        if not self._enroll_with_backoff():
            return False
        assert self.enrollment is not None
        self.link = self.link_factory(
            self.enrollment,
            on_desired=lambda raw: self.events.put(_Event("desired", raw, self.link.name if self.link else "link")),
            on_connected=lambda: self.events.put(_Event("connected")),
            on_retained=lambda raw: self.events.put(_Event("desired", raw, self.link.name if self.link else "link",
                                                           retained=True)),
        )
        self.link_or_http.link = self.link
        self.link.start()
        # Also fetch over HTTP now: a link that is down must not keep a new desired state from us.
        self.events.put(_Event("connected", source="start"))
        return True

    def _enroll_with_backoff(self) -> bool:
        saved = self.store.state.enrollment
        if saved is not None:
            enrollment = parse_message(saved, EnrollResponse)
            same_class = enrollment.device_class.name == self.config.device_class
            if enrollment.device_id == self.config.device_id and same_class:
                self._enrolled(enrollment)
                return True
            log.warning("config names %s/%s but state.json was enrolled as %s/%s: enrolling again",
                        self.config.device_id, self.config.device_class, enrollment.device_id,
                        enrollment.device_class.name)
        key = DeviceKey.load_or_create(self.config.data_dir)
        delay = self.config.retry.retry_initial_s
        while not self.stopped.is_set():
            # Signed afresh for every try: the cloud accepts a proof only newer than the last one it took.
            request = EnrollRequest(device_id=self.config.device_id, device_class=self.config.device_class,
                                    labels=dict(self.config.labels), agent_version=AGENT_VERSION,
                                    public_key=key.public_key,
                                    proof=key.proof(self.config.device_id, self.config.device_class, self.clock.now()))
            try:
                enrollment = self.client.enroll(request, self.config.enrollment_token)
            except EnrollmentRefused as exc:
                # Another agent holds this id, or this one was reinstalled: only the operator can decide which.
                log.error("%s. If this device was reinstalled, ask the operator to run `fleet devices reset %s`; "
                          "if this config was copied from another device, give this one its own device_id. "
                          "Serving local models meanwhile; retrying in %.0f s", exc, self.config.device_id,
                          self.config.retry.retry_max_s)
                delay = self.config.retry.retry_max_s
            except EnrollError as exc:
                # A refused token will not fix itself, but a daemon that exits gets restarted in a loop: keep serving
                # local models and try again slowly, loudly.
                log.error("%s. Retrying in %.0f s", exc, self.config.retry.retry_max_s)  # the fix: in the message
                delay = self.config.retry.retry_max_s
            except CloudUnavailable as exc:
                log.warning("enrollment: %s; retrying in %.1f s", exc, delay)
            else:
                self._save_enrollment(enrollment)
                self._enrolled(enrollment)
                log.info("enrolled as %s (%s)", enrollment.device_id, enrollment.device_class.name)
                return True
            # Full jitter (common/backoff.py): uniform in [0, delay), so a fleet that lost the cloud together does not
            # come back together; `delay` is the doubling window.
            if self.stopped.wait(full_jitter_delay(0, initial_s=delay, max_s=delay, draw=random.random())):
                return False
            delay = min(self.config.retry.retry_max_s, delay * 2)
        return False

    def _save_enrollment(self, enrollment: EnrollResponse) -> None:
        doc = enrollment.to_dict()
        self.store.update(lambda s: s.model_copy(update={"enrollment": doc}))

    def _enrolled(self, enrollment: EnrollResponse) -> None:
        self.enrollment = enrollment
        self.client.set_token(enrollment.device_token)
        if self.router is not None:
            self.router.set_token(enrollment.device_token)  # offload.token, when set, wins
        self._set_meter(enrollment)
        # The keys pinned at enrollment, moved along every key rotation this agent has followed since.
        self.verifier = DesiredStateVerifier(ring=load_ring(self._keys_path, enrollment.desired_state_keys))
        max_bytes = int(self.config.limits.bundle_max_mb * 1024 * 1024)
        fetcher: Fetcher = HttpBundleFetcher(self.client, enrollment.tuf_targets_url, max_bytes)
        if self.config.transport == "grpc":  # bundles over the channel too, HTTP when it cannot serve (fetch.py)
            fetcher = GrpcBundleFetcher(lambda: self.link, fetcher, max_bytes)
        trust = self.trust_factory(enrollment)
        self.key_source = trust if isinstance(trust, KeyDocumentSource) else None
        self.executor = Executor(self.config, self.store, self.installer, fetcher, trust,
                                 on_activate=self.service.activate, reporter=self._report_models)
        removed = self.executor.start()
        if removed:
            log.info("cleaned up %s", ", ".join(removed))

    # -- the loop -----------------------------------------------------------------------------------------------------

    def _desired(self) -> DesiredState | None:
        doc = self.store.state.desired
        if doc is None:
            return None
        return parse_message(doc["payload"], DesiredState)

    def run_once(self, timeout_s: float) -> bool:
        """One turn: wait up to `timeout_s` for an event and handle it, replan, send telemetry. False on stop."""
        assert self.executor is not None, "connect() first"
        try:
            event: _Event | None = self.events.get(timeout=timeout_s) if timeout_s > 0 else self.events.get_nowait()
        except queue.Empty:
            event = None
        if event is not None and event.kind == "stop":
            return False
        try:
            if event is not None and event.kind == "connected":
                self._fetch_desired()
            elif event is not None and event.kind == "desired" and event.payload is not None:
                self._offer_desired(event.payload, event.source, retained=event.retained)
            if self.link_or_http.poll_due():
                self._fetch_desired()
            stalls: list[str] = []
            self.executor.converge(self._desired(), self.clock.now, on_stall=stalls.append)
            self._note_stall(stalls[-1] if stalls else None)
            if self._error_unsent:
                self._report_error()
            self._send_telemetry()
        except Exception:
            self._count("loop_errors")
            log.exception("agent loop step failed; continuing")
        return True

    def _next_timeout(self) -> float:
        now = self.clock.now()
        timeout = min(self.config.reconcile.tick_s, self.config.telemetry.window_s)
        if self.executor is not None:
            wake = next_wakeup(self.executor.snapshot(), self._desired(), now, self.executor.policy)
            if wake is not None:
                timeout = min(timeout, max(0.05, (wake - now).total_seconds()))
        return timeout

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _fetch_desired(self) -> None:
        assert self.enrollment is not None
        raw = self.link_or_http.fetch_desired(self.enrollment.desired_state_url)
        if raw is not None:
            self._offer_desired(raw, "http")

    def _offer_desired(self, raw: bytes, source: str, *, retained: bool = False) -> None:
        """Verify and accept a desired-state document, or refuse it with a reason the cloud will see."""
        assert self.verifier is not None
        highest = self.store.state.highest_generation
        try:
            state = self._verify_desired(raw, highest)
        except Replayed as exc:
            # The same document arrives twice on every connect (retained message and HTTP fetch): not news.
            if highest is not None and self._generation_of(raw) == highest:
                return
            if retained:
                # The broker's retained copy, handed over on subscribe, can lag the database the HTTP fetch read:
                # the cloud commits, then publishes, and a device that (re)connects in between gets the older copy
                # after the newer one. Refused all the same, counted and logged, but not an alarm for the operator:
                # a replay put there by someone else would be refused the same way, and the cloud's next publish
                # replaces it. A stale document published live (not on subscribe) still goes into last_error.
                self._count("refused_stale_retained")
                log.warning("refused desired state from %s (the broker's retained copy, older than what this device "
                            "runs; the cloud replaces it on its next publish): %s", source, exc)
                return
            self._refuse(exc, source)
            return
        except TrustError as exc:
            self._refuse(exc, source)
            return
        doc = json.loads(raw)
        self.store.update(lambda s: s.model_copy(update={"highest_generation": state.generation, "desired": doc}))
        self._follow_budgets(state)
        if self.last_error is not None:
            self.last_error = None
            self._error_unsent = True  # the cloud should see it cleared even if no model status changes
        log.info("accepted desired state generation %d from %s: %s", state.generation, source,
                 ", ".join(f"{m.name} v{m.version}" for m in state.models) or "no models")
        if self.verifier.signed_by != set(self.verifier.ring.keys):
            # A trusted key did not sign: the cloud may have finished a rotation and revoked it. Learn that now,
            # so the revoked key is refused from here on.
            self._update_desired_keys()

    def _follow_budgets(self, state: DesiredState | None) -> None:
        """The deployments' budgets (`fleet deploy --p95-ms --mj-per-inference`) for the offload policy."""
        if self.router is None:
            return
        models = state.models if state is not None else []
        self.router.set_deployment_budgets({m.name: (m.budgets.p95_ms, m.budgets.mj_per_inference)
                                            for m in models if m.budgets is not None})

    def _verify_desired(self, raw: bytes, highest: int | None) -> DesiredState:
        assert self.verifier is not None

        def verify() -> DesiredState:
            assert self.verifier is not None
            return self.verifier.verify(raw, device_id=self.config.device_id, device_class=self.config.device_class,
                                        highest_generation=highest, now=self.clock.now())

        try:
            return verify()
        except BadSignature:
            # Signed by a key the cloud may have rotated in since: learn its key lists, then one more try.
            now = self.clock.monotonic()
            recent = self._keys_looked_at is not None and now - self._keys_looked_at < UNKNOWN_KEY_RECHECK_S
            if recent or not self.verifier.names_unknown_key(raw):
                raise
            self._keys_looked_at = now
            if not self._update_desired_keys():
                raise
        return verify()

    @property
    def _keys_path(self) -> Path:
        return self.config.data_dir / DESIRED_KEYS_FILE

    def _update_desired_keys(self) -> bool:
        """Walk the cloud's desired-state key lists (through TUF) and keep the result, saved before it is used;
        True when the trusted keys changed. A failure changes nothing and is logged and counted."""
        assert self.verifier is not None
        if self.key_source is None:
            return False
        try:
            ring = advance(self.verifier.ring, self.key_source.desired_key_documents())
        except TrustError as exc:
            self._count(f"desired_keys_{exc.reason}")
            log.warning("desired-state keys not updated: %s", exc)
            return False
        if ring == self.verifier.ring:
            return False
        save_ring(self._keys_path, ring)  # a fresh enrollment's place in the chain is worth keeping too
        changed = ring.trust != self.verifier.ring.trust
        self.verifier.ring = ring
        if changed:
            log.info("desired-state keys now v%s: %s%s", ring.version, ", ".join(k[:12] for k in sorted(ring.keys)),
                     f" (revoked: {', '.join(k[:12] for k in sorted(ring.revoked))})" if ring.revoked else "")
        return changed

    @staticmethod
    def _generation_of(raw: bytes) -> int | None:
        try:
            return int(json.loads(raw)["payload"]["generation"])
        except (ValueError, KeyError, TypeError):
            return None

    def _refuse(self, exc: TrustError, source: str) -> None:
        self._count(f"refused_{exc.reason}")
        self.last_error = f"refused desired state from {source}: {exc}"
        log.warning("%s", self.last_error)
        self._report_error()

    def _note_stall(self, message: str | None) -> None:
        """A converge that ran out of rounds goes into last_error; the next one that finishes takes it out again."""
        if message == self._stall:
            return
        previous, self._stall = self._stall, message
        if message is not None:
            self.last_error = message
            self._report_error()
        elif self.last_error == previous:  # not overwritten by newer news (a refusal) meanwhile
            self.last_error = None
            self._report_error()

    # -- reports and telemetry -----------------------------------------------------------------------------------------

    def _report_error(self) -> None:
        """Send last_error now with the statuses the cloud already has; on failure, again on the next tick."""
        try:
            self._report_models(list(self.store.state.reported or []))
        except AgentError as exc:
            self._error_unsent = True
            log.debug("last_error not reported yet: %s", exc)

    def _report_models(self, models: list[ModelStatus]) -> None:
        report = ReportedState(device_id=self.config.device_id, generation=self.store.state.highest_generation or 0,
                               models=models, last_error=clip_text(self.last_error), agent_version=AGENT_VERSION,
                               reported_at=self.clock.now())
        self.link_or_http.report(report)  # the link, or HTTP while it is down or silent; raises when neither took it
        self._error_unsent = False

    def _send_telemetry(self) -> None:
        self.telemetry.flush(self.clock.now())
        self.link_or_http.send_outbox(self.telemetry.outbox)

