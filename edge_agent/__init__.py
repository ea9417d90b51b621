"""edgefleet edge agent: reconcile, verify, install, serve and meter models on a device.

Installs lean (`pip install 'edgefleet[agent]'`): no torch, FastAPI, SQLAlchemy or onnx.
"""
