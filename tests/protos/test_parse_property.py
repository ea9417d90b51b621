"""Property tests of `parse_message` for every document a receiver parses from the network or a bundle (manifest,
desired state, reported state, telemetry, status): whatever the bytes, the only exception is `MessageError`, and
whatever a receiver accepts serialises and parses back the same, so it can be stored and served.

Seeded and bounded (`derandomize=True`, a few hundred examples) so `make test` stays fast and a failure repeats.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.protos.messages import (
    DesiredModel,
    DesiredState,
    DeviceStatus,
    FileEntry,
    Manifest,
    Message,
    MessageError,
    ModelStatus,
    ReportedState,
    Signature,
    SignedDesiredState,
    SmokeTest,
    TelemetryBatch,
    TelemetryWindow,
    TensorSpec,
    parse_message,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
BOUNDED = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

_desired = DesiredState(device_id="pi-1", device_class="rpi4", generation=7, issued_at=NOW,
                        expires_at=NOW + timedelta(days=1),
                        models=[DesiredModel(name="digits", version=3, bundle_target="bundles/digits/v3/rpi4.tar.gz")])
EXAMPLES: dict[type[Message], dict[str, Any]] = {
    Manifest: Manifest(
        name="digits", version=3, device_class="rpi4", model_file="model.onnx",
        inputs=[TensorSpec(name="input", dtype="float32", shape=[None, 64])],
        outputs=[TensorSpec(name="label", dtype="int64", shape=["N"])],
        files=[FileEntry(path="model.onnx", sha256="0" * 64, size=1234)],
        smoke_test=SmokeTest(input_file="smoke/input.npz", expected_file="smoke/expected.npz"), created_at=NOW,
    ).to_dict(),
    DesiredState: _desired.to_dict(),
    SignedDesiredState: SignedDesiredState(payload=_desired, signatures=[Signature(keyid="k" * 64, sig="ab" * 64)])
    .to_dict(),
    ReportedState: ReportedState(device_id="pi-1", generation=7, reported_at=NOW, agent_version="0.1.0", models=[
        ModelStatus(name="digits", active_version=3, target_version=4, state="failed", phase="verify",
                    error="smoke test mismatch")]).to_dict(),
    TelemetryBatch: TelemetryBatch(device_id="pi-1", seq=118, sent_at=NOW, windows=[TelemetryWindow(
        model="digits", version=3, start=NOW - timedelta(seconds=60), end=NOW, count=1200, errors=2, p50_ms=0.41,
        p95_ms=0.73, p99_ms=1.12, mean_mj=1.85, energy_meter="modelled")]).to_dict(),
    DeviceStatus: DeviceStatus(device_id="pi-1", online=True, at=NOW).to_dict(),
}
# What devices send: the cloud stores these, so an accepted one must serialise again.
FROM_DEVICES = (ReportedState, TelemetryBatch, DeviceStatus)

# Values an attacker reaches for first, then anything JSON can hold.
SPECIAL = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0, -1, 0, 2**31 - 1, 2**31, 2**63 - 1,
    2**63, 2**64, 10**40, "", "\x00", "\ud800", "x" * 70, "x" * 2000, "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+14:00", "1969-01-01T00:00:00Z", "2025-03-01T12:00:00", True, None, [], {},
])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | SPECIAL,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document: each key and list index, leaves and containers alike."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replace(node[head], rest, value)}
    return [_replace(v, rest, value) if i == head else v for i, v in enumerate(node)]


def _parse(raw: bytes | dict[str, Any], model: type[Message] | None) -> Message | None:
    try:
        got = parse_message(raw, model)
    except MessageError:
        return None
    if model in FROM_DEVICES:
        assert parse_message(got.to_wire(), model) == got  # storable: serialises and reads back the same
    return got


@BOUNDED
@given(raw=st.binary(max_size=1024), model=st.sampled_from([*EXAMPLES, None]))
def test_random_bytes_raise_only_message_error(raw, model):
    _parse(raw, model)


@BOUNDED
@given(model=st.sampled_from(list(EXAMPLES)), data=st.data())
def test_a_valid_document_with_one_place_replaced_raises_only_message_error(model, data):
    doc = EXAMPLES[model]
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    mutated = _replace(doc, path, data.draw(JSON, label="value"))
    # Through JSON text, the way it travels: NaN and Infinity become the tokens Python's decoder reads back.
    _parse(json.dumps(mutated, allow_nan=True).encode("utf-8", "surrogatepass"), model)
    _parse(mutated, model)


# JSON text no encoder writes but a hostile sender can: past Python's 4300-digit integer limit, nested past the
# decoder's recursion limit, escapes of a lone surrogate or NUL, numbers past every column.
RAW_TOKENS = st.one_of(
    st.sampled_from([b"9" * 5000, b"[" * 50_000, b"NaN", b"-Infinity", b"1e400", b'"\\ud800"', b'"a\\u0000"',
                     b'"' + b"x" * 3000 + b'"', b"2147483648", b"9223372036854775808", b"-1", b"true", b"{}"]),
    JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()),
)
_HOLE = "\x01hole\x01"


@BOUNDED
@given(model=st.sampled_from(list(EXAMPLES)), data=st.data())
def test_a_valid_document_with_one_value_replaced_by_raw_json_text_raises_only_message_error(model, data):
    doc = EXAMPLES[model]
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    text = json.dumps(_replace(doc, path, _HOLE)).encode()
    _parse(text.replace(json.dumps(_HOLE).encode(), data.draw(RAW_TOKENS, label="raw")), model)


@BOUNDED
@given(model=st.sampled_from(list(EXAMPLES)), data=st.data())
def test_a_valid_document_with_a_field_added_or_removed_raises_only_message_error(model, data):
    doc = EXAMPLES[model]
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    parent_path, key = path[:-1], path[-1]
    parent: Any = doc
    for step in parent_path:
        parent = parent[step]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="remove"):
        changed = {k: v for k, v in parent.items() if k != key}
    elif isinstance(parent, dict):
        changed = {**parent, data.draw(st.text(max_size=8), label="new key"): data.draw(JSON, label="value")}
    else:
        changed = [*parent, data.draw(JSON, label="appended")]
    _parse(_replace(doc, parent_path, changed) if parent_path else changed, model)


def test_the_examples_themselves_parse():
    for model, doc in EXAMPLES.items():
        assert isinstance(parse_message(json.dumps(doc).encode(), model), model)
