"""edge_agent/records.py: what `state.json` holds stays readable across a tightening of the wire contract."""

from __future__ import annotations

import json

from edgefleet.edge_agent.records import AgentState


def test_statuses_saved_under_a_looser_contract_are_forgotten_not_the_whole_state():
    # An older agent saved a status with an error past today's cap; the highest generation must survive the load.
    saved = {"highest_generation": 41, "reported": [{"name": "m", "state": "failed", "error": "x" * 5000}]}
    state = AgentState.model_validate_json(json.dumps(saved))
    assert (state.highest_generation, state.reported) == (41, None)
    fine = {"highest_generation": 41, "reported": [{"name": "m", "state": "active", "active_version": 2}]}
    assert AgentState.model_validate_json(json.dumps(fine)).reported[0].active_version == 2
