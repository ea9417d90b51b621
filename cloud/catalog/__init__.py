"""The device-class catalog: TOML data files parsed into `protos.messages.DeviceClassInfo`.

Theory: a class is data, not code. The built-in classes ship as `*.toml` next to this module, each figure with its
source in a comment; a user adds or overrides classes with TOML files in `{data_dir}/classes/` (read at start) or
through the API (`Fleet.add_class`, kept in the database). A file's stem is the class name; a `name` key, when
given, must match it, so that `ls` tells which file defines which class. A bad file is refused with the file and the
key named, because a silently skipped class shows up much later as "unknown class" on a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib
from pydantic import ValidationError

from edgefleet.cloud.errors import Invalid
from edgefleet.protos.messages import DeviceClassInfo

BUILTIN_DIR = Path(__file__).resolve().parent


def parse_class(data: dict[str, Any], source: str) -> DeviceClassInfo:
    """Validate one class dict; `source` names where it came from in the error message."""
    try:
        return DeviceClassInfo.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or "(class)"
        msg = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            known = ", ".join(DeviceClassInfo.model_fields)
            msg = f"unknown key; known keys are: {known}"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise Invalid(f"device class {source}: key {key!r}: {msg}{more}") from None


def load_class_file(path: Path) -> DeviceClassInfo:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise Invalid(f"device class file {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"device class file {path}: cannot be read: {exc}") from None
    stem = path.stem
    name = data.setdefault("name", stem)
    if name != stem:
        raise Invalid(
            f"device class file {path}: key 'name' is {name!r} but the file is named {stem!r}; make them match"
        )
    return parse_class(data, f"file {path}")


def load_dir(folder: Path) -> dict[str, DeviceClassInfo]:
    """Every `*.toml` in `folder` (sorted, so errors and results are stable); a missing folder is empty."""
    if not folder.is_dir():
        return {}
    return {info.name: info for info in (load_class_file(p) for p in sorted(folder.glob("*.toml")))}


def builtin_catalog() -> dict[str, DeviceClassInfo]:
    return load_dir(BUILTIN_DIR)


def load_catalog(extra_dir: Path | None = None) -> dict[str, DeviceClassInfo]:
    """The built-in classes, then the files in `extra_dir`; a user file of the same name replaces a built-in."""
    catalog = builtin_catalog()
    if extra_dir is not None:
        catalog.update(load_dir(Path(extra_dir)))
    return catalog


__all__ = ["BUILTIN_DIR", "builtin_catalog", "load_catalog", "load_class_file", "parse_class"]
