"""`edgefleet-agent status`: what the agent knows about itself, read from its data directory without the cloud."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.edge_agent.daemon import Agent


def status_summary(agent: Agent) -> dict[str, Any]:
    """What `edgefleet-agent status` prints: a local view without the cloud."""
    state = agent.store.state
    return {
        "device_id": agent.config.device_id,
        "device_class": agent.config.device_class,
        "enrolled": state.enrollment is not None,
        "highest_generation": state.highest_generation,
        "active": agent.installer.active(),
        "installs": {k: v.phase for k, v in state.installs.items()},
        "failed": {k: v.error for k, v in state.failed.items()},
        "outbox_batches": len(agent.telemetry.outbox),
        # Telemetry that did not go as sent, counted, never silent: windows a full outbox merged into coarser
        # ones or (last resort) dropped, and batches the cloud refused for good.
        "outbox_merged_windows": agent.telemetry.outbox.merged_total,
        "outbox_dropped_windows": agent.telemetry.outbox.dropped_total,
        "telemetry_refused_batches": agent.link_or_http.refused_batches,
        # The offload router's breaker, per-model estimates and reasons counted since start; None when offload is off.
        "offload": agent.router.snapshot() if agent.router is not None else None,
    }
