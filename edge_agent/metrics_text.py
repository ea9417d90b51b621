"""The agent's Prometheus `/metrics` on its local API, in the text exposition format written by hand: the agent
installs lean (no prometheus-client on a Pi), and the format is a few lines per series.

Theory of operation: everything comes from the `Telemetry` already in memory, read at scrape time: counters since
the agent started per (model, version, where) of requests, errors, rows (inferences), busy seconds and energy in
joules (of the windows closed so far, labelled with its source: measured, estimated or none), the outbox's gauges
(batches, bytes) and its counted losses (windows merged, dropped). Counters restart at zero with the agent, which
Prometheus's `rate()` expects. Label values are escaped as the format says (backslash, quote, newline).
"""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _series(name: str, kind: str, help_text: str, rows: list[tuple[dict[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in rows:
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{inner}}} {value!r}" if inner else f"{name} {value!r}")
    return lines


def render(telemetry: Any, device_id: str) -> bytes:
    totals = telemetry.totals()

    def per_model(index: int, scale: float = 1.0, with_source: bool = False) -> list[tuple[dict[str, object], float]]:
        out = []
        for model, version, where, *figures, source in totals:
            labels: dict[str, object] = {"model": model, "version": version, "where": where}
            if with_source:
                labels["energy_source"] = source
            out.append((labels, float(figures[index]) * scale))
        return out

    outbox = telemetry.outbox
    lines = [
        *_series("edgefleet_agent_requests_total", "counter", "Inference requests served since the agent started",
                 per_model(0)),
        *_series("edgefleet_agent_request_errors_total", "counter", "Failed inference requests", per_model(1)),
        *_series("edgefleet_agent_inferences_total", "counter", "Rows (inferences) in all requests", per_model(2)),
        *_series("edgefleet_agent_busy_seconds_total", "counter", "Time the successful requests kept the runtime busy",
                 per_model(3, 1e-3)),
        *_series("edgefleet_agent_energy_joules_total", "counter", "Energy of the successful requests in closed "
                 "telemetry windows, labelled measured or estimated", per_model(4, 1e-3, with_source=True)),
        *_series("edgefleet_agent_outbox_batches", "gauge", "Telemetry batches waiting for the cloud's confirmation",
                 [({}, float(len(outbox)))]),
        *_series("edgefleet_agent_outbox_bytes", "gauge", "Bytes of those batches on disk",
                 [({}, float(outbox.size_bytes()))]),
        *_series("edgefleet_agent_outbox_merged_windows_total", "counter", "Windows a full outbox merged into "
                 "coarser ones", [({}, float(outbox.merged_total))]),
        *_series("edgefleet_agent_outbox_dropped_windows_total", "counter", "Windows a full outbox had to drop "
                 "(last resort)", [({}, float(outbox.dropped_total))]),
        *_series("edgefleet_agent_offload_reasons_unplaced_total", "counter", "Offload decisions no open telemetry "
                 "window could take (a window flushed between a request and its reason)",
                 [({}, float(getattr(telemetry, "reasons_unplaced", 0)))]),
        *_series("edgefleet_agent_info", "gauge", "This agent", [({"device_id": device_id}, 1.0)]),
    ]
    return ("\n".join(lines) + "\n").encode()
