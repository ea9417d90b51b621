"""Versioned model directories and the `current` pointer that says which one serves.

Layout under `{data_dir}/models/`:

    {name}/
      3/                     a complete, verified, smoke-tested version (manifest.json, model.onnx, smoke/...)
      4/
      current -> 4           symlink, switched by atomic rename: the active version
      previous -> 3          symlink: what a roll back or a downgrade returns to
      .staging-5-1a2b3c4d/   an unpack in progress; renamed to 5/ only after every check and the smoke test
      .trash-*               a removal that a crash interrupted; collected at start

Theory of operation: a version directory appears under its final name only by `rename(2)` of a fully checked
staging dir, and disappears only by a rename to `.trash-*`; the pointer changes only by renaming a new symlink over
the old one. So at every instant `current` names either the old complete version or the new complete one, never
half of either. The file system is the single truth for what is installed and active (state.json does not copy it).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from edgefleet.common.fsutil import atomic_symlink, collect_trash, fsync_dir, remove_tree
from edgefleet.protos.messages import check_name

CURRENT = "current"
PREVIOUS = "previous"
STAGING_PREFIX = ".staging-"


class Installer:
    def __init__(self, models_dir: str | Path) -> None:
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)

    # -- reading the layout ---------------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        check_name(name)  # names become directory names: refuse anything that could escape
        return self.models_dir / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(int(version))

    def _pointer(self, name: str, pointer: str) -> int | None:
        link = self.model_dir(name) / pointer
        try:
            target = os.readlink(link)
        except OSError:
            return None
        if not target.isdigit() or not (link.parent / target).is_dir():
            return None
        return int(target)

    def active_version(self, name: str) -> int | None:
        return self._pointer(name, CURRENT)

    def previous_version(self, name: str) -> int | None:
        return self._pointer(name, PREVIOUS)

    def active_dir(self, name: str) -> Path | None:
        version = self.active_version(name)
        return self.version_dir(name, version) if version is not None else None

    def versions(self, name: str) -> tuple[int, ...]:
        directory = self.model_dir(name)
        if not directory.is_dir():
            return ()
        return tuple(sorted(int(p.name) for p in directory.iterdir()
                            if p.name.isdigit() and p.is_dir() and not p.is_symlink()))

    def names(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def installed(self) -> dict[str, tuple[int, ...]]:
        return {name: v for name in self.names() if (v := self.versions(name))}

    def active(self) -> dict[str, int]:
        return {name: v for name in self.names() if (v := self.active_version(name)) is not None}

    # -- changing it ----------------------------------------------------------------------------------------------

    def new_staging(self, name: str, version: int) -> Path:
        directory = self.model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f"{STAGING_PREFIX}{int(version)}-{secrets.token_hex(4)}"
        staging.mkdir()
        fsync_dir(directory)
        return staging

    def promote(self, name: str, version: int, staging: str | Path) -> Path:
        """Rename a checked staging dir to `{name}/{version}`. Idempotent: a resumed activate calls it again."""
        staging = Path(staging)
        final = self.version_dir(name, version)
        if staging.is_dir():
            if final.exists():
                # A leftover of an earlier, rolled-back attempt; the staging dir is the one just verified.
                remove_tree(final)
            os.replace(staging, final)
            fsync_dir(final.parent)
        elif not final.is_dir():
            raise FileNotFoundError(f"neither staging {staging} nor {final} exists")
        return final

    def activate(self, name: str, version: int, previous: int | None) -> None:
        """Point `current` at `version` and `previous` at `previous` (when given and different)."""
        if not self.version_dir(name, version).is_dir():
            raise FileNotFoundError(f"model {name} version {version} is not installed")
        directory = self.model_dir(name)
        if previous is not None and previous != version and self.version_dir(name, previous).is_dir():
            # previous first: a crash between the two renames leaves current on the old version, which is fine.
            atomic_symlink(str(previous), directory / PREVIOUS)
        atomic_symlink(str(int(version)), directory / CURRENT)

    def deactivate(self, name: str) -> None:
        link = self.model_dir(name) / CURRENT
        if link.is_symlink():
            link.unlink()
            fsync_dir(link.parent)

    def remove_version(self, name: str, version: int) -> None:
        if version in (self.active_version(name), self.previous_version(name)):
            raise ValueError(f"model {name} version {version} is still pointed at; switch the pointer first")
        remove_tree(self.version_dir(name, version))

    def remove_model(self, name: str) -> None:
        remove_tree(self.model_dir(name))

    def remove_staging(self, staging: str | Path | None) -> None:
        if staging:
            path = Path(staging)
            # Only ever delete inside our own tree, whatever a state file says.
            if path.resolve().is_relative_to(self.models_dir.resolve()) and path.name.startswith(STAGING_PREFIX):
                remove_tree(path)

    def gc(self, keep: dict[str, set[int]] | None = None, keep_staging: set[str] | None = None) -> list[str]:
        """Delete trash, staging dirs and versions other than current, previous and `keep`; return what went."""
        keep = keep or {}
        keep_staging = {str(Path(p).resolve()) for p in (keep_staging or set())}
        removed: list[str] = []
        collect_trash(self.models_dir)
        for name in self.names():
            directory = self.model_dir(name)
            collect_trash(directory)
            for entry in directory.iterdir():
                if entry.name.startswith(STAGING_PREFIX) and str(entry.resolve()) not in keep_staging:
                    remove_tree(entry)
                    removed.append(f"{name}/{entry.name}")
            pinned = {self.active_version(name), self.previous_version(name)} | keep.get(name, set())
            for version in self.versions(name):
                if version not in pinned:
                    remove_tree(self.version_dir(name, version))
                    removed.append(f"{name}/{version}")
            for pointer in (CURRENT, PREVIOUS):  # a pointer to a version that is gone
                link = directory / pointer
                if link.is_symlink() and self._pointer(name, pointer) is None:
                    link.unlink()
            if not any(directory.iterdir()):
                directory.rmdir()
        return removed
