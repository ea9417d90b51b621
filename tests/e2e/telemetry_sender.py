"""The agent's telemetry path as a process of its own, for delivery tests that kill things: the real `Outbox`,
`MqttLink` (or, with --grpc-target HOST:PORT, `GrpcLink` to the cloud's agent channel) and `LinkOrHttp` (with the
real HTTP client), fed windows that a test can count.

Window i (0-based) covers second i after --t0 and holds 1 + i % 7 requests, so a test knows exactly how many windows
and requests a device produced: batch seq k holds windows k*B .. k*B+B-1 (B = --per-batch), and the outbox's next
seq, which survives a SIGKILL, says where to go on after a restart. `--resend` republishes that share of the
batches once more over raw MQTT (a duplicate the cloud must store once; MQTT only). The process exits 0 once it has
produced --windows windows and its outbox is empty, i.e. the cloud confirmed every batch.

    python -m tests.e2e.telemetry_sender ENROLLMENT.json DATA_DIR --windows 500 --per-batch 10
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from edgefleet.edge_agent.clock import SystemClock
from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.fallback import LinkOrHttp
from edgefleet.edge_agent.link_grpc import GrpcLink
from edgefleet.edge_agent.link_mqtt import MqttLink
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.protos.messages import EnrollResponse, TelemetryBatch, TelemetryWindow


def window(i: int, t0: datetime) -> TelemetryWindow:
    count = requests_in(i)
    start = t0 + timedelta(seconds=i)
    return TelemetryWindow(model="m", version=1, start=start, end=start + timedelta(seconds=1), count=count,
                           errors=0, rows=count, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.5, row_ms=1.5,
                           mean_mj=2.0, row_mj=2.0, energy_source="estimated", energy_meter="modelled",
                           energy_method="modelled")


def requests_in(i: int) -> int:
    return 1 + i % 7


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("enrollment", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--windows", type=int, required=True)
    ap.add_argument("--per-batch", type=int, default=10)
    ap.add_argument("--interval-s", type=float, default=0.02)
    ap.add_argument("--resend", type=float, default=0.0)
    ap.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--ack-timeout-s", type=float, default=1.0)
    ap.add_argument("--deadline-s", type=float, default=240.0)
    ap.add_argument("--grpc-target", default=None, help="host:port of the cloud's agent channel: GrpcLink, not MQTT")
    # Window 0's start, the same for every run of a sender; recent, or the cloud's retention would drop the windows.
    ap.add_argument("--t0", type=datetime.fromisoformat, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    enrollment = EnrollResponse.model_validate_json(args.enrollment.read_bytes())
    device_id = enrollment.device_id
    outbox = Outbox(args.data_dir / "outbox", args.max_bytes)
    clock = SystemClock()
    client = CloudClient(str(enrollment.desired_state_url).split("/api/")[0], token=enrollment.device_token,
                         timeout_s=2.0)
    sender = LinkOrHttp(client, clock, ack_timeout_s=args.ack_timeout_s, desired_poll_s=60.0)
    link: MqttLink | GrpcLink
    if args.grpc_target:
        if args.resend:
            ap.error("--resend republishes over raw MQTT; not with --grpc-target")
        link = GrpcLink(args.grpc_target, device_id, enrollment.device_token, on_desired=lambda raw: None,
                        on_connected=lambda: None, retry_initial_s=0.1, retry_max_s=0.5)
    else:
        link = MqttLink(enrollment.broker, device_id, on_desired=lambda raw: None, on_connected=lambda: None,
                        retry_initial_s=0.1, retry_max_s=0.5)
    sender.link = link
    over_link = 0  # batches the link itself confirmed (the rest went over HTTP): the test checks its transport ran
    publish = link.publish_telemetry

    def counted(batch: TelemetryBatch, timeout_s: float) -> bool:
        nonlocal over_link
        ok = publish(batch, timeout_s)
        over_link += ok
        return ok

    link.publish_telemetry = counted  # type: ignore[method-assign]
    link.start()
    rand = random.Random(device_id)
    deadline = time.monotonic() + args.deadline_s
    try:
        while time.monotonic() < deadline:
            produced = outbox.next_seq * args.per_batch
            if produced < args.windows:
                first = produced
                batch = outbox.add(device_id, [window(i, args.t0) for i in range(first, min(first + args.per_batch,
                                                                                   args.windows))], clock.now())
                if args.resend and rand.random() < args.resend and link.connected and isinstance(link, MqttLink):
                    outbox.mark_attempted(batch.seq, batch.epoch)  # from here the cloud may hold it: never merged
                    link._client.publish(link.topics.telemetry, batch.to_wire(), qos=1)  # a duplicate, raw
            sender.send_outbox(outbox)
            if produced >= args.windows and len(outbox) == 0:
                print(f"{device_id}: {over_link} batch(es) confirmed over {link.name}", file=sys.stderr)
                return 0
            time.sleep(args.interval_s)
        print(f"{device_id}: {len(outbox)} batch(es) still unconfirmed at the deadline", file=sys.stderr)
        return 1
    finally:
        link.stop(graceful=False)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
