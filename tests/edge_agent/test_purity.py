"""The agent's pure cores (STYLE.md 3): `reconcile` and `lifecycle` decide; they never touch files, sockets, clocks
or the state store. Read from the source of each module and of every edgefleet module it reaches, so an I/O import
slipped in through a helper module fails here too."""

from __future__ import annotations

import ast

import pytest

from tests.import_graph import closure, imports_in_source

PURE_CORES = ("edgefleet.edge_agent.reconcile", "edgefleet.edge_agent.lifecycle", "edgefleet.edge_agent.offload_policy",
              "edgefleet.edge_agent.offload_state")
# I/O: files and processes, sockets and the network clients, the clock, and the module that writes state.json.
FORBIDDEN = ("os", "socket", "time", "shutil", "subprocess", "httpx", "paho", "urllib3", "edgefleet.edge_agent.state",
             "edgefleet.common.fsutil")
CLOCK_READS = {"now", "utcnow", "today", "monotonic", "time"}


def forbidden(imports) -> list[str]:
    return sorted({f"line {i.line}: {i.module}" for i in imports
                   if any(i.module == f or i.module.startswith(f + ".") for f in FORBIDDEN)})


def clock_reads(source: str) -> list[str]:
    """Calls such as `datetime.now()`: a pure core takes `now` as an argument."""
    return [f"line {n.lineno}: .{n.func.attr}()" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CLOCK_READS]


@pytest.mark.parametrize("core", PURE_CORES)
def test_pure_core_imports_no_io(core):
    reached = closure(core)
    assert core in reached
    if core.endswith(("reconcile", "lifecycle")):  # the walk really follows imports
        assert "edgefleet.edge_agent.records" in reached
    if core.endswith("offload_state"):
        assert "edgefleet.edge_agent.offload_policy" in reached
    bad = {module: forbidden(imports) for module, imports in reached.items() if forbidden(imports)}
    assert bad == {}


@pytest.mark.parametrize("core", PURE_CORES)
def test_pure_core_reads_no_clock(core):
    from tests.import_graph import ROOT

    path = ROOT / core.removeprefix("edgefleet.").replace(".", "/")
    assert clock_reads(path.with_suffix(".py").read_text()) == []


@pytest.mark.parametrize("source", [
    "import os\n",
    "from time import monotonic\n",
    "def f():\n    import socket\n",
    "from paho.mqtt import client\n",
    "from edgefleet.edge_agent.state import StateStore\n",
    "from edgefleet.edge_agent import state\n",
    "import httpx\n",
])
def test_the_check_finds_io(source):
    assert forbidden(imports_in_source(source, "edgefleet.edge_agent.reconcile")) != []


def test_the_check_finds_a_clock_read():
    assert clock_reads("from datetime import datetime\nx = datetime.now()\n") == ["line 2: .now()"]
    assert clock_reads("def plan(now):\n    return now\n") == []
