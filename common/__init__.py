"""Code both sides run, in one neutral place: it imports protos/ and libraries, never cloud, edge_agent or fleet.

- `fsutil`: the one crash-safe write (temp file, fsync, rename, fsync of the folder) and its relatives.
- `runtimes`: the inference engines behind the `Runtime` seam (ONNX Runtime, LiteRT). The agent serves with them;
  the cloud checks what it builds with the same code, so a bundle that passes in the cloud passes on the device.
- `errors`: the errors that code raises, the root both sides' trees hang from.
- `backoff`, `mqtt_client`: the full-jitter retry rule and the paho client that follows it, for every link the agent
  and the cloud own, so neither side reconnects in lockstep.

`tests/test_layering.py` keeps the rule: it fails when a module here imports cloud, the agent or the CLI.
"""
