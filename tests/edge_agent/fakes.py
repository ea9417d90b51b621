"""In-memory seams for unit tests of the daemon: a manual `Clock`, a `CloudLink` and a cloud behind `CloudApi`.

Each fake records what reached it and can be made to fail the way the real part fails: the link goes down (publish
answers False at once) or stays up but never acknowledges (the real one answers False after `timeout_s`; the fake
answers at once and records the timeout it was given); the cloud becomes unreachable (every call raises
`CloudUnavailable`, as httpx network errors do in `CloudClient`). Bundle bytes come from an
`agent_testkit.MemoryRepo`, which also serves as the executor's TUF `TargetVerifier`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from edgefleet.edge_agent.errors import BundleError, CloudUnavailable
from edgefleet.protos.messages import (
    BrokerInfo,
    DeviceClassInfo,
    DeviceStatus,
    EnrollRequest,
    EnrollResponse,
    ReportedState,
    TelemetryBatch,
)
from tests.edge_agent.agent_testkit import DEVICE_CLASS, MemoryRepo

TARGETS_URL = "http://cloud.test/tuf/targets/"


class ManualClock:
    """Time moves only when a test says so; wall and monotonic time move together."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._mono = 1000.0  # arbitrary origin: nothing may read meaning into monotonic zero
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._mono += seconds


class MemoryLink:
    """A `CloudLink` whose connection and acknowledgements the test controls. Pass `link.attach` as link_factory."""

    name = "memory"

    def __init__(self, *, up: bool = True, ack: bool = True) -> None:
        self.up = up  # the transport is connected (as far as the daemon can tell)
        self.ack = ack  # the cloud side acknowledges publishes
        self.started = False
        self.stopped = False
        self.reported: list[ReportedState] = []
        self.telemetry: list[TelemetryBatch] = []
        self.statuses: list[DeviceStatus] = []
        self.unacked: list[Any] = []  # published while up, never acknowledged
        self.timeouts: list[float] = []  # the timeout_s of every publish
        self.late_acks: list[tuple[int, int]] = []  # (epoch, seq) the cloud confirmed after the publish gave up
        self._on_desired: Callable[[bytes], None] | None = None
        self._on_retained: Callable[[bytes], None] | None = None
        self._on_connected: Callable[[], None] | None = None
        self.enrollment: EnrollResponse | None = None

    # LinkFactory
    def attach(self, enrollment: EnrollResponse, *, on_desired: Callable[[bytes], None],
               on_connected: Callable[[], None], on_retained: Callable[[bytes], None] | None = None) -> MemoryLink:
        self.enrollment = enrollment
        self._on_desired, self._on_connected = on_desired, on_connected
        self._on_retained = on_retained or on_desired
        return self

    # CloudLink
    @property
    def connected(self) -> bool:
        return self.started and not self.stopped and self.up

    def start(self) -> None:
        self.started = True
        if self.up and self._on_connected is not None:
            self._on_connected()

    def stop(self) -> None:
        self.stopped = True

    def publish_reported(self, report: ReportedState, timeout_s: float) -> bool:
        return self._publish(self.reported, report, timeout_s)

    def publish_telemetry(self, batch: TelemetryBatch, timeout_s: float) -> bool:
        return self._publish(self.telemetry, batch, timeout_s)

    def publish_status(self, status: DeviceStatus, timeout_s: float) -> bool:
        return self._publish(self.statuses, status, timeout_s)

    def take_acked(self) -> list[tuple[int, int]]:
        out, self.late_acks = self.late_acks, []
        return out

    def _publish(self, into: list, msg: Any, timeout_s: float) -> bool:
        self.timeouts.append(timeout_s)
        if not self.connected:
            return False
        if not self.ack:
            self.unacked.append(msg)
            return False
        into.append(msg)
        return True

    # the test's side: what the broker and the network would do
    def connect(self) -> None:
        """The link comes (back) up: as on every real (re)connect, the daemon hears of it."""
        self.up = True
        if self.started and self._on_connected is not None:
            self._on_connected()

    def disconnect(self) -> None:
        self.up = False

    def deliver(self, raw: bytes, *, retained: bool = False) -> None:
        """A desired-state document arrives on the link: a fresh publish, or (`retained`) the copy the broker kept,
        handed over on subscribe."""
        assert self._on_desired is not None, "the daemon has not built its link yet"
        (self._on_retained if retained else self._on_desired)(raw)


def enrollment(desired_state_keys: list[dict[str, Any]], *, device_id: str = "dev-1",
               device_class: str = DEVICE_CLASS) -> EnrollResponse:
    cls = DeviceClassInfo(name=device_class, cores=4, memory_mb=4096, runtimes=["onnxruntime"], idle_watts=5.0,
                          active_watts=15.0)
    return EnrollResponse(device_id=device_id, device_token="device-token", device_class=cls,
                          broker=BrokerInfo(host="broker.test", port=1883), tuf_root={},
                          tuf_metadata_url="http://cloud.test/tuf/metadata/", tuf_targets_url=TARGETS_URL,
                          desired_state_keys=desired_state_keys,
                          desired_state_url=f"http://cloud.test/api/v1/devices/{device_id}/desired")


class MemoryCloud:
    """The `CloudApi` surface over memory. `desired` is what GET .../desired serves (None: 404)."""

    def __init__(self, answer: EnrollResponse, repo: MemoryRepo) -> None:
        self.answer = answer
        self.repo = repo
        self.reachable = True
        self.desired: bytes | None = None
        self.token: str | None = None
        self.closed = False
        self.enrolls: list[EnrollRequest] = []
        self.desired_fetches = 0
        self.reported: list[ReportedState] = []
        self.telemetry: list[TelemetryBatch] = []
        self.failed_posts = 0  # posts refused because the cloud was unreachable
        self.fail_telemetry = 0  # the next N telemetry posts are lost in the network; the cloud stays reachable

    def _check(self, what: str) -> None:
        if not self.reachable:
            raise CloudUnavailable(f"cannot reach the cloud for {what} (test)")

    def enroll(self, req: EnrollRequest, enrollment_token: str) -> EnrollResponse:
        self._check("enroll")
        self.enrolls.append(req)
        return self.answer

    def set_token(self, token: str) -> None:
        self.token = token

    def desired_state_raw(self, url: str) -> bytes | None:
        assert url == self.answer.desired_state_url
        self.desired_fetches += 1
        self._check("desired state")
        return self.desired

    def post_reported(self, msg: ReportedState) -> None:
        self._post(self.reported, msg)

    def post_telemetry(self, msg: TelemetryBatch) -> None:
        if self.reachable and self.fail_telemetry > 0:
            self.fail_telemetry -= 1
            self.failed_posts += 1
            raise CloudUnavailable(f"telemetry batch {msg.seq} lost on the way (test)")
        self._post(self.telemetry, msg)

    def _post(self, into: list, msg: Any) -> None:
        if not self.reachable:
            self.failed_posts += 1
        self._check(msg.kind)
        into.append(msg)

    def download(self, url: str, dest: Path, *, max_bytes: int) -> Path:
        self._check("download")
        assert url.startswith(TARGETS_URL), url
        data = self.repo.targets[unquote(url[len(TARGETS_URL):])]
        if len(data) > max_bytes:
            raise BundleError(f"download of {url} exceeds the trusted length of {max_bytes} bytes")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    def close(self) -> None:
        self.closed = True
