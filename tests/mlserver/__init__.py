"""MLServer as a real peer OIP server for the offload tests and the benchmark (its own venv, its own process).

Theory: "any OIP server is an offload target" is only shown by a server we did not write. `env.py` builds
MLServer's venv once per machine (its pins fight ours), `server.py` runs `mlserver start` on free ports, and
`onnx_runtime.py` is the custom runtime it serves ONNX files with (it runs inside MLServer's venv, so nothing
here imports it).
"""
