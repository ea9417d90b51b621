"""Telemetry (agent -> cloud): windows of requests and the rows (inferences) in them, batched for the outbox.

Theory: a request to a model carries one or more rows, the leading dimension of its input (a batch); every row is
one inference. A window counts both, per (model, version, where) and aligned period: `count` and `errors` are
requests, `rows` the rows in all of them. Latency is given per request (p50/p95/p99 and `mean_ms`) and per row
(`row_ms`, the successful requests' busy time over their rows), energy per request (`mean_mj`) and per row
(`row_mj`); every figure is of the successful requests only. Per-row figures are what a cost model or a fleet view
compares across devices: one request of 1,200 rows is 1,200 inferences, not one slow one.

Compatibility: a window without `rows` (an agent older than row counts) is read as batch 1: `rows = count`, its
median latency standing in for both means (`mean_ms = row_ms = p50_ms`) and `row_mj = mean_mj`. Adding these
optional fields kept `SCHEMA_VERSION`.

Consistency, refused as "inconsistent" or "out_of_range" (protos/limits.py): errors <= count <= rows, requests and
rows within what the window's length can hold, p50 <= p95 <= p99, per-row figures at most the per-request ones
(each request has at least one row), a per-row figure given with its per-request one, and no figure when no request
succeeded. `reasons` counts the offload policy's decisions per reason (edge_agent/offload_policy.py) for the requests
of the window: at most one per request, so they add up to at most `count`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from edgefleet.protos.base import DeviceId, Message, Name, Versioned
from edgefleet.protos.limits import (
    MAX_REQUESTS_PER_S,
    MAX_ROWS_PER_S,
    MAX_WINDOW_S,
    MAX_WINDOWS_PER_BATCH,
    EnergyMj,
    Int32,
    Int64,
    LatencyMs,
    ShortText,
    Timestamp,
    Version,
    Watts,
)

# The most seqs one TelemetryAck names: a cloud that stored more batches of one device at once sends several.
MAX_ACK_SEQS = 1000
# A meter sampling faster than 1 MHz is not a power sensor an edge device has.
MAX_SAMPLE_HZ = 1_000_000.0
SampleHz = Annotated[float, Field(gt=0, le=MAX_SAMPLE_HZ, allow_inf_nan=False)]

# Per-row figures are a request figure divided by at least one row; this slack absorbs the float rounding of
# computing both from the same sums (a relative 1e-9 is far above double precision's 1e-16 and far below any lie).
_ROUNDING = 1e-9
# (per request, per row): the pairs a window gives together or not at all.
_PAIRS = (("mean_ms", "row_ms"), ("mean_mj", "row_mj"))
# The offload policy's reasons are a closed set of snake_case names; 32 leaves room for the set to grow.
REASON_RE = r"^[a-z][a-z0-9_]{0,47}$"
MAX_REASONS = 32
Reason = Annotated[str, StringConstraints(pattern=REASON_RE)]


def _inconsistent(template: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("inconsistent", template, context)


class TelemetryWindow(Message):
    """One (model, version, where) window; see the module docstring for what counts and what each figure is."""

    model: Name
    version: Version
    start: Timestamp
    end: Timestamp  # start <= end, at most MAX_WINDOW_S apart
    count: Int32  # requests, failed ones included; at most MAX_REQUESTS_PER_S per second of window
    errors: Int32  # failed requests, <= count
    # Rows (inferences) in all the requests, failed ones included: >= count, at most MAX_ROWS_PER_S per second.
    # Absent (an older agent): read as count.
    rows: Int64 = 0
    # Per request, present only when some request succeeded (count > errors), ordered p50 <= p95 <= p99.
    p50_ms: LatencyMs | None = None
    p95_ms: LatencyMs | None = None
    p99_ms: LatencyMs | None = None
    mean_ms: LatencyMs | None = None  # mean latency per successful request
    row_ms: LatencyMs | None = None  # per row: busy time of the successful requests / their rows; <= mean_ms
    mean_mj: EnergyMj | None = None  # mean energy per successful request, millijoules
    row_mj: EnergyMj | None = None  # per row (per inference): energy / rows of the metered requests; <= mean_mj
    energy_source: Literal["measured", "estimated", "none"] = "estimated"
    energy_meter: ShortText = ""  # which meter: "modelled", "rapl", "ina3221", ...
    # How the energy figures were obtained (edge_agent/meters): "counter" (a cumulative energy counter read at the
    # window's edges: RAPL, NVML), "sampled" (power sampled at `energy_hz` and integrated: INA3221, the Pi 5 PMIC),
    # "modelled" (active watts x busy time); "" from an agent older than this field.
    energy_method: Literal["counter", "sampled", "modelled", ""] = ""
    energy_hz: SampleHz | None = None  # the sampling rate of a "sampled" meter
    # Idle-subtracted energy per row: (window energy - idle_w x window length) shared by busy time, over the rows.
    # Given only with row_mj and at most it; `row_mj` is then the gross figure (all the energy the device drew over
    # the window, shared the same way). `idle_w` is the idle power subtracted, measured or configured.
    row_net_mj: EnergyMj | None = None
    idle_w: Watts | None = None
    where: Literal["local", "cloud"] = "local"
    # The offload policy's decisions for this window's requests, per reason (empty without a policy).
    reasons: dict[Reason, Int32] = Field(default_factory=dict, max_length=MAX_REASONS)

    @model_validator(mode="before")
    @classmethod
    def _batch_one(cls, data: Any) -> Any:
        """An older agent's window (no `rows`): every request was one row."""
        if isinstance(data, dict) and data.get("rows") is None and "count" in data:
            data = {**data, "rows": data["count"]}
            for per_row, per_request in (("mean_ms", "p50_ms"), ("row_ms", "p50_ms"), ("row_mj", "mean_mj")):
                if data.get(per_row) is None:
                    data[per_row] = data.get(per_request)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryWindow:
        length_s = (self.end - self.start).total_seconds()
        if length_s < 0:
            raise _inconsistent("end {end} is before start {start}", end=str(self.end), start=str(self.start))
        if length_s > MAX_WINDOW_S:
            raise PydanticCustomError("out_of_range", "window of {length} s is longer than {most} s",
                                      {"length": length_s, "most": MAX_WINDOW_S})
        if self.errors > self.count:
            raise _inconsistent("errors {errors} exceed count {count}", errors=self.errors, count=self.count)
        if self.rows < self.count:
            raise _inconsistent("rows {rows} are fewer than the {count} requests; every request carries at least "
                                "one row", rows=self.rows, count=self.count)
        for what, n, rate in (("count", self.count, MAX_REQUESTS_PER_S), ("rows", self.rows, MAX_ROWS_PER_S)):
            if n > max(length_s, 1.0) * rate:
                raise PydanticCustomError("out_of_range", "{what} {n} is more than a {length} s window holds at "
                                          "{rate}/s", {"what": what, "n": n, "length": length_s, "rate": rate})
        figures = {k: v for k, v in (("p50_ms", self.p50_ms), ("p95_ms", self.p95_ms), ("p99_ms", self.p99_ms),
                                     ("mean_ms", self.mean_ms), ("row_ms", self.row_ms), ("mean_mj", self.mean_mj),
                                     ("row_mj", self.row_mj)) if v is not None}
        if figures and self.count <= self.errors:
            raise _inconsistent("{fields} given but no request succeeded (count {count}, errors {errors})",
                                fields=", ".join(figures), count=self.count, errors=self.errors)
        latencies = [(k, v) for k, v in figures.items() if k in ("p50_ms", "p95_ms", "p99_ms")]
        for (lower, low), (upper, high) in zip(latencies, latencies[1:]):
            if low > high:
                raise _inconsistent("{lower} {low} is above {upper} {high}; percentiles rise p50 <= p95 <= p99",
                                    lower=lower, low=low, upper=upper, high=high)
        for per_request, per_row in _PAIRS:
            request, row = figures.get(per_request), figures.get(per_row)
            if (request is None) != (row is None):
                given, missing = (per_request, per_row) if row is None else (per_row, per_request)
                raise _inconsistent("{given} given without {missing}; send both or neither", given=given,
                                    missing=missing)
            if request is not None and row is not None and row > request * (1 + _ROUNDING):
                raise _inconsistent("{per_row} {row} is above {per_request} {request}; a request has at least one "
                                    "row, so a per-row figure is at most the per-request one", per_row=per_row,
                                    row=row, per_request=per_request, request=request)
        if self.reasons and sum(self.reasons.values()) > self.count:
            raise _inconsistent("reasons add up to {total}, more than the {count} requests; the policy decides once "
                                "per request", total=sum(self.reasons.values()), count=self.count)
        if self.row_net_mj is not None:
            if self.row_mj is None:
                raise _inconsistent("row_net_mj given without row_mj; the net figure is the gross one less idle")
            if self.row_net_mj > self.row_mj * (1 + _ROUNDING):
                raise _inconsistent("row_net_mj {net} is above row_mj {gross}; idle-subtracted energy is at most the "
                                    "gross", net=self.row_net_mj, gross=self.row_mj)
        return self


class TelemetryBatch(Versioned):
    """One outbox batch. (device_id, epoch, seq) is its identity, as a Kafka idempotent producer's (producer id,
    epoch, sequence): the cloud stores a batch once however often it arrives."""

    kind: Literal["telemetry"] = "telemetry"
    device_id: DeviceId
    # The outbox's incarnation: set when its state is first created (milliseconds since the Unix epoch), new when
    # the state was lost, so a seq counted again from 0 is not taken for a replay. 0 from an older agent.
    epoch: Int64 = 0
    seq: Int64  # rises per batch within an epoch; the cloud ignores a (epoch, seq) it has stored (outbox replays)
    windows: list[TelemetryWindow] = Field(default_factory=list, max_length=MAX_WINDOWS_PER_BATCH)
    dropped_windows: Int32 = 0  # windows the outbox had to drop since the last batch, counted (last resort)
    # Windows of older, never-sent batches that a full outbox merged into coarser ones carried here (edge_agent/
    # outbox.py); the windows they became are in `windows`. Counted by the cloud, never silent.
    merged_windows: Int32 = 0
    sent_at: Timestamp


class TelemetryAck(Versioned):
    """cloud -> agent on the device's `ack` topic: these batches are committed (or refused for good) and may leave
    the outbox. Sent after the database transaction that stored them, never before."""

    kind: Literal["telemetry_ack"] = "telemetry_ack"
    device_id: DeviceId
    epoch: Int64 = 0
    seqs: list[Int64] = Field(default_factory=list, max_length=MAX_ACK_SEQS)  # stored now or before
    # Read but outside the contract: the cloud will never store them, so resending is pointless; counted there.
    refused: list[Int64] = Field(default_factory=list, max_length=MAX_ACK_SEQS)
    reason: ShortText = ""


__all__ = ["MAX_ACK_SEQS", "TelemetryAck", "TelemetryBatch", "TelemetryWindow"]
