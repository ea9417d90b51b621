"""Who imports what, read from the source (the AST), never by importing: what a module names is what it depends on.

Used by `test_layering.py` (the packages' import contract) and `edge_agent/test_purity.py` (the pure cores). Every
import counts: at the top, inside functions, under `if TYPE_CHECKING:`, relative ones resolved, and
`importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The folders that install as `edgefleet.<name>` (setup.py ROOTS).
PACKAGES = ("common", "cloud", "edge_agent", "fleet", "protos", "sdk")


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name as written or resolved ("edgefleet.cloud.store", "os")
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["edgefleet", *parts])


def imports_in_source(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every module `source` (the text of `module`) imports."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(Import(target, node.lineno))
            # `from edgefleet.edge_agent import state` names a module, not an attribute: keep both readings.
            if target == "edgefleet" or target.startswith("edgefleet."):
                found += [Import(f"{target}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(arg.value, node.lineno))
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def package_modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """`edgefleet.<package>.*` module name -> file, for every .py file under the package's folder."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def imports_of_file(path: Path, root: Path = ROOT) -> list[Import]:
    return imports_in_source(path.read_text(encoding="utf-8"), module_name(path, root),
                             is_package=path.name == "__init__.py")


def closure(module: str, root: Path = ROOT) -> dict[str, list[Import]]:
    """`module` and every edgefleet module it reaches through imports -> that module's own imports."""
    files = {name: path for pkg in PACKAGES for name, path in package_modules(pkg, root).items()}
    seen: dict[str, list[Import]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in files:
            continue
        seen[name] = imports_of_file(files[name], root)
        todo += [imp.module for imp in seen[name]]  # names that are not edgefleet files are skipped above
    return seen
