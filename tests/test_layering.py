"""The import contract of the tree (docs/internals.md "Layering"), read from every module's source:

- `protos/` (the contracts) imports none of the other packages;
- `common/` (code both sides run: the crash-safe write, the runtimes) imports only `protos/`;
- `cloud/`, `edge_agent/` and `fleet/` never import each other; each may import `common/` and `protos/`;
- `sdk/` (what apps import) may import `common/`, `protos/` and the agent (its standalone mode runs the agent's
  pure offload policy), never the cloud or the CLI.

A violation names the file, the line and the import, so the fix is obvious: move the shared code to `common/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_graph import PACKAGES, ROOT, imports_in_source, imports_of_file, module_name, package_modules

ALLOWED: dict[str, set[str]] = {
    "protos": set(),
    "common": {"protos"},
    "cloud": {"common", "protos"},
    "edge_agent": {"common", "protos"},
    "fleet": {"common", "protos"},
    "sdk": {"common", "protos", "edge_agent"},
}


def edgefleet_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "edgefleet" and parts[1] in PACKAGES else None


def violations(package: str, root: Path = ROOT) -> list[str]:
    """One line per offending import statement: 'file:line: module imports other'."""
    out: dict[tuple[str, int], str] = {}
    for path in package_modules(package, root).values():
        for imp in imports_of_file(path, root):
            other = edgefleet_package(imp.module)
            if other is not None and other != package and other not in ALLOWED[package]:
                where = (str(path.relative_to(root)), imp.line)
                if where not in out or len(imp.module) < len(out[where]):
                    out[where] = imp.module
    return [f"{file}:{line}: {module_name(root / file, root)} imports {module}"
            for (file, line), module in sorted(out.items())]


def test_every_package_is_checked():
    # A new top-level package must get its own rule here, not slip past the contract.
    setup = (ROOT / "setup.py").read_text()
    for package in PACKAGES:
        assert f'"{package}"' in setup
    assert set(ALLOWED) == set(PACKAGES)
    assert all(package_modules(p) for p in PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_keeps_its_layer(package):
    assert violations(package) == []


# -- the checker itself can fail -----------------------------------------------------------------------------------


@pytest.mark.parametrize("package, source", [
    ("cloud", "from edgefleet.edge_agent.fsutil import fsync_dir\n"),
    ("cloud", "def f():\n    from edgefleet.edge_agent.runtimes.litert import LiteRtRuntime\n"),
    ("edge_agent", "import edgefleet.cloud.store\n"),
    ("edge_agent", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgefleet.cloud import services\n"),
    ("edge_agent", "from .. import cloud\n"),
    ("fleet", "from edgefleet.edge_agent import trust\n"),
    ("fleet", "import importlib\nimportlib.import_module('edgefleet.cloud.main')\n"),
    ("protos", "from edgefleet.common.fsutil import atomic_write_bytes\n"),
    ("protos", "from edgefleet.fleet.client import Client\n"),
    ("common", "from edgefleet.edge_agent.errors import AgentError\n"),
    ("sdk", "from edgefleet.cloud.infer import serve\n"),
    ("sdk", "import edgefleet.fleet.client\n"),
])
def test_a_forbidden_import_is_found(tmp_path, package, source):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "bad.py").write_text(source)
    found = violations(package, tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{package}/bad.py:")


def test_allowed_imports_pass(tmp_path):
    (tmp_path / "cloud").mkdir()
    (tmp_path / "cloud" / "ok.py").write_text(
        "import os\nfrom edgefleet.common.fsutil import atomic_write_bytes\nfrom edgefleet.protos import messages\n"
        "from edgefleet.cloud.errors import CloudError\nfrom . import errors\n")
    assert violations("cloud", tmp_path) == []


def test_relative_imports_resolve():
    found = imports_in_source("from ..protos import messages\nfrom . import x\n", "edgefleet.common.fsutil")
    assert {i.module for i in found} == {"edgefleet.protos", "edgefleet.protos.messages", "edgefleet.common",
                                        "edgefleet.common.x"}
