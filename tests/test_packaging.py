"""The edge agent installs lean: `pip install '.[agent]'` pulls no torch, FastAPI, SQLAlchemy, uvicorn or gRPC, and the
agent's modules import none of them. Checked on the installed metadata (the dependency closure of the extra) and
on a fresh interpreter that imports every agent module."""

from __future__ import annotations

import importlib.metadata as md
import pkgutil
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Distributions. gRPC is the cloud's (cloud/inference/grpc_server.py); the agent and SDK speak OIP over HTTP and frames.
FORBIDDEN = {"torch", "fastapi", "sqlalchemy", "uvicorn", "alembic", "starlette", "onnx", "skl2onnx", "scikit-learn",
             "grpcio", "grpcio-health-checking"}
# What the agent's modules must not import: the above by import name, and protobuf, which an agent install does
# carry (onnxruntime requires it) but never loads. Not bare "google": securesystemslib probes google.cloud.
_IMPORT_NAME = {"scikit-learn": "sklearn", "grpcio": "grpc", "grpcio-health-checking": "grpc_health"}
FORBIDDEN_MODULES = {_IMPORT_NAME.get(d, d) for d in FORBIDDEN} | {"google.protobuf"}


def closure(dist: str, extras: set[str]) -> set[str]:
    """Every distribution `dist[extras]` pulls in, from the installed metadata."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(dist, frozenset(extras))]
    while todo:
        name, want = todo.pop()
        key = canonicalize_name(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            raise AssertionError(f"{name} is required but not installed; the closure cannot be checked") from None
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in want] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            child = canonicalize_name(req.name)
            if child == key:  # a self-reference such as edgefleet[agent] inside edgefleet[cloud]
                todo.append((name, frozenset(req.extras)))
                continue
            if child not in seen:
                seen.add(child)
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_agent_extra_pulls_nothing_heavy():
    deps = closure("edgefleet", {"agent"})
    assert {"onnxruntime", "paho-mqtt", "numpy", "httpx", "tuf"} <= deps
    assert not deps & FORBIDDEN, f"the agent extra pulls {sorted(deps & FORBIDDEN)}"


def test_cloud_extra_does_pull_the_cloud_stack():
    # The check above can fail: the same walk finds FastAPI and SQLAlchemy in the cloud extra.
    deps = closure("edgefleet", {"cloud"})
    assert {"fastapi", "sqlalchemy", "uvicorn"} <= deps


def test_agent_modules_import_nothing_heavy():
    import edgefleet.common as common
    import edgefleet.edge_agent as agent
    import edgefleet.sdk as sdk

    # The agent runs on the neutral package too (its runtimes and crash-safe writes live there), and apps on the
    # device import the SDK from the same lean install.
    modules = [m.name for m in pkgutil.walk_packages(agent.__path__, "edgefleet.edge_agent.")]
    modules += [m.name for m in pkgutil.walk_packages(common.__path__, "edgefleet.common.")]
    modules += ["edgefleet.sdk"] + [m.name for m in pkgutil.walk_packages(sdk.__path__, "edgefleet.sdk.")]
    assert "edgefleet.edge_agent.daemon" in modules and "edgefleet.common.runtimes.onnx" in modules
    assert "edgefleet.sdk.embedded" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"forbidden = set({sorted(FORBIDDEN_MODULES)!r})\n"
        "bad = sorted(m for m in sys.modules if {m.split('.')[0], '.'.join(m.split('.')[:2])} & forbidden)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"agent modules import {out.stdout.strip()}"
