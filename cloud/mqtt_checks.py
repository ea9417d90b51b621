"""The checks every device message passes before the cloud records it, with no broker and no database: topic ours,
payload not empty (a retained clear), size, the contract (telemetry first through the fast decoder,
cloud/telemetry_decode.py, then pydantic for whatever it does not accept), and the topic's device id equal to the
payload's. `check_message` says what it made of a message; the MQTT bridge and the gRPC agent channel's hub
count (`count`, `tally`: the same counters and log lines for both transports), store and acknowledge.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgefleet.cloud.telemetry_decode import decode_batch
from edgefleet.protos.messages import (
    MAX_MESSAGE_BYTES,
    DeviceStatus,
    MessageError,
    ReportedState,
    TelemetryBatch,
    parse_message,
)
from edgefleet.protos.topics import parse_topic

EXPECTED: dict[str, type] = {"reported": ReportedState, "telemetry": TelemetryBatch, "status": DeviceStatus}
REASON_MAX_CHARS = 200  # a reason quoted from a hostile payload stays one readable log line
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """What `check` made of a message: `msg` when it may be recorded, else `outcome` says why not."""

    outcome: str  # "ok", "ignored", "malformed", "refused"
    channel: str = ""
    device_id: str = ""
    msg: Any = None
    reason: str = ""


@dataclass(frozen=True)
class _Identity:
    device_id: str
    epoch: int
    seq: int


def check_message(prefix: str, topic: str, payload: bytes) -> Checked:
    """Check one message (no database): topic, emptiness, size, contract, device id; counts nothing."""
    where = parse_topic(prefix, topic)
    if where is None or where[1] not in EXPECTED:
        return Checked("malformed", reason="topic is not a device's reported, telemetry or status channel")
    device_id, channel = where
    if not payload:
        return Checked("ignored", channel, device_id)  # an empty retained payload clears the topic
    if len(payload) > MAX_MESSAGE_BYTES:
        return Checked("malformed", channel, device_id,
                       reason=f"{len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if channel == "telemetry":
        fast = decode_batch(bytes(payload))  # cloud/telemetry_decode.py: None means "ask pydantic"
        if fast is not None and fast.device_id == device_id:
            return Checked("ok", channel, device_id, fast)
    try:
        msg = parse_message(bytes(payload), EXPECTED[channel])
    except MessageError as exc:
        if exc.refused:
            return Checked("refused", channel, device_id, _identity(channel, device_id, payload),
                           f"{exc.reason}: {exc}")
        return Checked("malformed", channel, device_id, reason=str(exc))
    if msg.device_id != device_id:
        return Checked("malformed", channel, device_id,
                       reason=f"payload device_id {msg.device_id!r} does not match the topic's")
    return Checked("ok", channel, device_id, msg)


def _identity(channel: str, device_id: str, payload: bytes) -> Any:
    """For a refused telemetry batch, its (device, epoch, seq) if they can be read, so the ack can name it."""
    if channel != "telemetry":
        return None
    try:
        data = json.loads(payload)
        epoch, seq = int(data.get("epoch", 0)), int(data["seq"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not (0 <= epoch < 2**63 and 0 <= seq < 2**63):
        return None
    return _Identity(device_id, epoch, seq)


def count(fleet: Any, counters: Counter[str], name: str) -> None:
    """One more `name` in the transport's own counters and, best effort, in the fleet's (`fleet stats`)."""
    counters[name] += 1
    try:
        fleet.count(name)
    except Exception:
        log.warning("could not store counter %s", name, exc_info=True)


def tally(fleet: Any, counters: Counter[str], checked: Checked, transport: str) -> None:
    """Log and count a message that will not be recorded: malformed (`malformed_messages`) or refused
    (`refused_messages`, and by channel and reason through `Fleet.count_refused`); "ignored" is neither."""
    if checked.outcome == "malformed":
        log.warning("dropped a malformed %s message from %s on %s: %s", transport, checked.device_id or "a device",
                    checked.channel or "no channel", checked.reason[:REASON_MAX_CHARS])
        count(fleet, counters, "malformed_messages")
    elif checked.outcome == "refused":
        reason, _, text = checked.reason.partition(": ")
        log.warning("refused a %s %s message from %s (%s): %s", transport, checked.channel, checked.device_id,
                    reason, text[:REASON_MAX_CHARS])
        counters["refused_messages"] += 1
        try:
            fleet.count_refused(checked.channel, reason)
        except Exception:
            log.warning("could not store the refusal counters", exc_info=True)


def take_group(q: queue.Queue[Any], most: int, wait_s: float) -> list[Any]:
    """What an ingest worker stores together: the first item in `q` (waiting up to 0.2 s for one, so the caller
    can look at its stop flag; [] when none came), then whatever else arrives within `wait_s` of it, `most` in all."""
    try:
        items = [q.get(timeout=0.2)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + wait_s
    while len(items) < most:
        try:
            items.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    return items


__all__ = ["EXPECTED", "REASON_MAX_CHARS", "Checked", "check_message", "count", "take_group", "tally"]
