"""Crash-safe file operations: a write either happened completely or not at all, even across power loss.

Theory of operation: the only atomic primitive a POSIX file system gives is `rename(2)` within one directory. So
every write that matters goes: temp file in the same directory -> write -> fsync(file) -> rename over the target ->
fsync(directory). Without the file fsync a power cut can leave a renamed but empty file (ext4 delalloc); without the
directory fsync the rename itself may be lost. A symlink pointer (`models/{name}/current`) is switched the same
way: make a temp symlink, rename it over the old one.

Removal of a directory tree is made atomic the same way: rename it to a `.trash-*` name first (so nothing that
reads the layout ever sees half a tree under its real name), then delete; a crash leaves only trash, which the next
start collects.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

TRASH_PREFIX = ".trash-"


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames and creations inside it survive a power cut."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    # Same directory (rename must not cross file systems); a dot name so listings skip it.
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), mode)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_bytes())


def atomic_symlink(target: str | Path, link: str | Path) -> None:
    """Point `link` at `target` (kept as given, e.g. relative "3"), replacing any old link atomically."""
    link = Path(link)
    tmp = _temp_name(link)
    os.symlink(str(target), str(tmp))
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree so that it disappears under its name atomically (rename to trash, then delete)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def collect_trash(directory: str | Path) -> int:
    """Delete what a crashed `remove_tree` left behind; returns how many entries went."""
    directory = Path(directory)
    count = 0
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(TRASH_PREFIX) or (entry.name.startswith(".") and ".tmp-" in entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                count += 1
    return count
