"""`edgefleet-agent`: run the daemon, or check a config file. Every command takes the config as `--config FILE`.

    edgefleet-agent run --config /etc/edgefleet/agent.toml
    edgefleet-agent check-config --config /etc/edgefleet/agent.toml
    edgefleet-agent status --config /etc/edgefleet/agent.toml   (local state, no network)

`check-config FILE` (the file as a positional argument, the older form) still works and says, on stderr, to use
`--config`. argparse, not typer: the agent installs lean. SIGTERM and SIGINT stop the daemon cleanly (telemetry
windows in memory go to the disk outbox, the status goes offline). Errors are one line on stderr: exit 2 for a bad
config, 1 for a daemon that cannot run (e.g. its local API port is taken).
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
                                "install and serve models on this device.",
                                epilog="Every command takes the agent's TOML config as --config FILE (-c FILE).")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon", description="Serve the last active models at once, enroll "
                         "with the cloud, and keep the installed models in line with the signed desired state.")
    run.add_argument("--config", "-c", required=True, type=Path, metavar="FILE", help="agent TOML config file")
    chk = sub.add_parser("check-config", help="validate a config file and print it as JSON",
                         description="Validate a config file and print it, with every default filled in, as JSON.")
    chk.add_argument("--config", "-c", type=Path, metavar="FILE", help="agent TOML config file")
    # The older form, `check-config FILE`: still accepted, with a note to use --config.
    chk.add_argument("config_file", nargs="?", type=Path, help=argparse.SUPPRESS)
    st = sub.add_parser("status", help="print this device's local state as JSON (no network)")
    st.add_argument("--config", "-c", required=True, type=Path, metavar="FILE", help="agent TOML config file")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        if args.config is not None and args.config_file is not None:
            parser.error("check-config: give the file once, as --config FILE")
        if args.config is None:
            if args.config_file is None:
                parser.error("check-config: the following arguments are required: --config/-c")
            print(f"edgefleet-agent: note: `check-config FILE` is deprecated; use `edgefleet-agent check-config "
                  f"--config {args.config_file}`", file=sys.stderr)
            args.config = args.config_file
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

    from edgefleet.edge_agent.daemon import Agent
    from edgefleet.edge_agent.status import status_summary

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
