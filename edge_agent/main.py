"""`edgefleet-agent`: run the daemon, or check a config file.

    edgefleet-agent run --config /etc/edgefleet/agent.toml
    edgefleet-agent check-config /etc/edgefleet/agent.toml
    edgefleet-agent status --config /etc/edgefleet/agent.toml   (local state, no network)

argparse, not typer: the agent installs lean. SIGTERM and SIGINT stop the daemon cleanly (telemetry windows in
memory go to the disk outbox, the status goes offline).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from edgefleet.edge_agent.config import load_config
from edgefleet.edge_agent.errors import ConfigError, EdgefleetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet edge agent: reconcile, verify, "
                                "install and serve models on this device.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon", description="Serve the last active models at once, enroll "
                         "with the cloud, and keep the installed models in line with the signed desired state.")
    run.add_argument("--config", "-c", required=True, type=Path, help="agent TOML config file")
    chk = sub.add_parser("check-config", help="validate a config file and print it as JSON")
    chk.add_argument("config", type=Path)
    st = sub.add_parser("status", help="print this device's local state as JSON (no network)")
    st.add_argument("--config", "-c", required=True, type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        from dataclasses import asdict

        print(json.dumps(asdict(config), default=str, indent=2))
        return 0

    from edgefleet.edge_agent.daemon import Agent, status_summary

    if args.command == "status":
        agent = Agent(config)
        print(json.dumps(status_summary(agent), default=str, indent=2))
        return 0

    agent = Agent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.run()
    except EdgefleetError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
