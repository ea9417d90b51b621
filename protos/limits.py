"""The ranges of the wire contract: every number, list and free text in a device message has a stated bound.

Theory: a receiver must be able to store, sum and show whatever the contract admits, so the contract admits only
what it can. Each bound below is a named constant with its unit and the reason for its value; the message modules
(`telemetry.py`, `state.py`, ... re-exported by `messages.py`) apply them as pydantic constraints (finite floats,
integer ranges, list and text lengths) and as cross-field rules (errors <= count <= rows, p50 <= p95 <= p99,
per-row figures <= per-request ones, start <= end). A message that breaks one is refused whole by `parse_message`
with a `MessageError` whose `reason` says which kind of rule (`REFUSAL_REASONS`), so receivers count refusals apart
from garbage. The agent produces values inside these bounds by construction (edge_agent/telemetry.py clamps
samples, edge_agent/config.py bounds `telemetry.window_s`, `clip_text` shortens error texts); docs/protocol.md
"Limits" lists them for people.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field
from pydantic_core import PydanticCustomError

# Integer columns of the cloud's database (cloud/db/models.py): INTEGER is 32-bit on PostgreSQL, BIGINT 64-bit.
INT32_MAX = 2**31 - 1  # versions, generations, window counts and errors, dropped windows
INT64_MAX = 2**63 - 1  # telemetry seq and rows, byte sizes

# 1 hour: no inference on an edge device takes that long; a larger figure is a clock jump or a lie. At this ceiling
# a window's count-weighted sum (count <= INT32_MAX) stays below 1e16 and its rows-weighted one (rows <= a day at
# MAX_ROWS_PER_S) below 1e21, far from double precision's 1.8e308.
MAX_LATENCY_MS = 3_600_000.0
# 10 kW: above any edge device (a rack of accelerators); device classes' power figures must stay below it.
MAX_WATTS = 10_000.0
# The longest inference at the highest power (W x ms = mJ): 3.6e10 mJ, so the modelled meter can never exceed it.
MAX_ENERGY_MJ = MAX_LATENCY_MS * MAX_WATTS
# 1 day: a telemetry window longer than the cloud's look-back would be meaningless; the agent's
# `telemetry.window_s` is capped to it.
MAX_WINDOW_S = 86_400
# 1 µs per request, all threads together: the agent serves through Python, whose per-run overhead alone is several
# µs, so no real window reaches this rate. A window of under a second may hold one second's worth.
MAX_REQUESTS_PER_S = 1_000_000
MAX_INFERENCES_PER_S = MAX_REQUESTS_PER_S  # the name before windows counted rows; a window's `count` is requests
# 1 ns per row (one inference of a batched request), all threads together: one clock cycle of a 1 GHz core, below
# what any model costs per row. A day of it (8.6e13) fits the 64-bit `telemetry_windows.rows`.
MAX_ROWS_PER_S = 1_000_000_000
# 200 windows of about 400 bytes: 80 KB, well inside MAX_MESSAGE_BYTES (256 KiB) on the telemetry topic.
MAX_WINDOWS_PER_BATCH = 200
# Models in one desired state; an edge device serving more than a few dozen is not a real deployment.
MAX_MODELS_PER_DEVICE = 256
# A report names each desired model and each model still active but no longer desired (during a full swap, both).
MAX_MODELS_PER_REPORT = 2 * MAX_MODELS_PER_DEVICE
# An error's last line with its context; the cloud shows it in one table cell.
MAX_ERROR_CHARS = 1000
# agent_version, phase, energy_meter: names, kept in 64-character columns (String(64)).
MAX_SHORT_TEXT_CHARS = 64
MAX_LABELS = 64  # labels per device: selectors for deployments, not a data store
MAX_LABEL_CHARS = 128  # a label's value
MAX_TENSOR_RANK = 64  # numpy 2's largest number of dimensions
MAX_LIST_ENTRIES = 1024  # tensors, files, providers or signatures in one document: far above any real bundle
MAX_PATH_CHARS = 255  # a file name or TUF target path (bundles.target_path is String(255))
MAX_CORES = 4096
MAX_MODEL_MB = 1_048_576.0  # 1 TiB
MAX_TOLERANCE = 1_000.0  # a smoke-test rtol/atol beyond this checks nothing
MAX_EMULATION_FACTOR = 10_000.0  # a device class emulated more than 10,000x slower than the build machine is a typo
# Times: after the Unix epoch (a device clock cannot read earlier) and far from datetime's year-9999 end, so every
# time converts to UTC and fits both databases.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=timezone.utc)

# MessageError.reason of a readable message that breaks one of these limits (counted as refused, not malformed).
REFUSAL_REASONS = frozenset({"out_of_range", "not_finite", "too_long", "inconsistent", "bad_text"})
_REASON_OF_TYPE = {
    "finite_number": "not_finite",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "string_too_long": "too_long",
    "too_long": "too_long",
    "out_of_range": "out_of_range",
    "inconsistent": "inconsistent",
    "bad_text": "bad_text",
    "string_unicode": "bad_text",  # a lone surrogate, refused by pydantic itself in a length-capped string
}


def reason_of(error_type: str) -> str:
    """The counter reason for a pydantic error type: a limit of this module, or "malformed" for anything else."""
    return _REASON_OF_TYPE.get(error_type, "malformed")


def _check_text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate cannot be encoded as UTF-8 for any database.
    if "\x00" in value:
        raise PydanticCustomError("bad_text", "text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("bad_text", "text must be valid Unicode (no lone surrogates)") from None
    return value


def _check_time(value: datetime) -> datetime:
    try:
        inside = EARLIEST_TIME <= value < LATEST_TIME
    except OverflowError:  # an offset that pushes a year-1 or year-9999 time out of range
        inside = False
    if not inside:
        raise PydanticCustomError("out_of_range", "time must be between 1970 and 9000 (UTC)")
    return value


def clip_text(value: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """`value` shortened to `limit` characters (ending in "…") and made storable, for texts built from exceptions."""
    if value is None:
        return None
    value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value if len(value) <= limit else value[: limit - 1] + "…"


Int32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
Version = Annotated[int, Field(ge=1, le=INT32_MAX)]  # model versions: model_versions.version is INTEGER
Generation = Annotated[int, Field(ge=0, le=INT32_MAX)]  # devices.desired_generation is INTEGER
LatencyMs = Annotated[float, Field(ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)]
EnergyMj = Annotated[float, Field(ge=0, le=MAX_ENERGY_MJ, allow_inf_nan=False)]
Watts = Annotated[float, Field(ge=0, le=MAX_WATTS, allow_inf_nan=False)]
ErrorText = Annotated[str, Field(max_length=MAX_ERROR_CHARS), AfterValidator(_check_text)]
ShortText = Annotated[str, Field(max_length=MAX_SHORT_TEXT_CHARS), AfterValidator(_check_text)]
Timestamp = Annotated[AwareDatetime, AfterValidator(_check_time)]  # times a device sends: aware, in range
