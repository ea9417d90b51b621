"""The contracts between cloud, agent, CLI and apps. Imports nothing of cloud, edge_agent or fleet.

`messages` is the import for every control-plane message (enrollment, desired state, reported state, telemetry,
status, bundle manifest, device class), which live one concept per module (`base`, `bundle`, `enroll`, `state`,
`telemetry`); `oip` the Open Inference Protocol (KServe v2) bodies used by the agent's local inference
API and, later, cloud offload; `topics` the MQTT topic layout.
"""

from edgefleet.protos.messages import SCHEMA_VERSION, MessageError, parse_message

__all__ = ["SCHEMA_VERSION", "MessageError", "parse_message"]
