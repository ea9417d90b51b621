"""Crash-safe file operations: a write either happened completely or not at all, even across power loss.

Theory of operation: the only atomic primitive a POSIX file system gives is `rename(2)` within one directory. So
every write that matters goes: temp file in the same directory -> write -> fsync(file) -> rename over the target ->
fsync(directory). Without the file fsync a power cut can leave a renamed but empty file (ext4 delalloc); without the
directory fsync the rename itself may be lost. A symlink pointer (`models/{name}/current`) is switched the same
way: make a temp symlink, rename it over the old one.

This module is the one place that recipe lives: the agent's state, outbox and installs, the cloud's blobs, TUF
metadata, keys and admin token, and the CLI's config all write through `atomic_write_bytes` or `staged_file`.

Removal of a directory tree is made atomic the same way: rename it to a `.trash-*` name first (so nothing that
reads the layout ever sees half a tree under its real name), then delete; a crash leaves only trash, which the next
start collects.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

TRASH_PREFIX = ".trash-"


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames and creations inside it survive a power cut."""
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: str | Path) -> bool:
    """Make `path` (and missing parents) a folder only its owner can enter: 0700. A program's data dir holds its
    keys and tokens; the files are 0600 and the folder must not let others list or reach them. Tightens an existing
    looser folder; returns True when it did (the caller may say so)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return True
    return False


def fsync_file(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(folder: Path, hint: str) -> Path:
    # Same directory as the target (rename must not cross file systems); a dot name so listings skip it, and
    # `collect_trash` recognises it after a crash.
    return folder / (f".{hint}.tmp-{secrets.token_hex(4)}" if hint else f".tmp-{secrets.token_hex(4)}")


class StagedFile:
    """A temp file being written in the target's folder; `commit` makes it the target, crash-safely.

    Made by `staged_file`; `file` is the open binary handle. Not committed when the `with` block ends: removed.
    """

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self.file = file
        self.committed = False

    def commit(self, target: str | Path, *, exclusive: bool = False) -> bool:
        """fsync the bytes, rename onto `target` (same file system), fsync the folder(s).

        With `exclusive`, an existing `target` wins (a hard link, which fails when the name exists, instead of a
        rename): False is returned and the temp file is dropped, so two writers of the same key agree on one file.
        """
        target = Path(target)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exclusive:
            try:
                os.link(self.path, target)
            except FileExistsError:
                return False
            self.path.unlink()
        else:
            os.replace(self.path, target)
        self.committed = True
        fsync_dir(target.parent)
        if target.parent.resolve() != self.path.parent.resolve():
            fsync_dir(self.path.parent)  # the temp's folder lost an entry
        return True


@contextmanager
def staged_file(folder: str | Path, mode: int = 0o644, *, hint: str = "") -> Iterator[StagedFile]:
    """Open a temp file in `folder` with exactly `mode` from its first byte (0600 for secrets: never readable by
    others, even for an instant). Commit it with `StagedFile.commit`; otherwise it is removed when the block ends,
    also on an exception. Use this when the final name is known only after writing (a content-addressed blob)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder, hint)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not loosen or tighten what the caller asked for
        staged = StagedFile(tmp, os.fdopen(fd, "wb"))
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        yield staged
    finally:
        if not staged.committed:
            staged.file.close()
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` so that a reader (or a reboot) sees the old bytes or the new, never a mix.

    Returns False only with `exclusive` when `path` already existed (it is then left as it was)."""
    path = Path(path)
    with staged_file(path.parent, mode, hint=path.name) as staged:
        staged.file.write(data)
        return staged.commit(path, exclusive=exclusive)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), mode)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_bytes())


def atomic_symlink(target: str | Path, link: str | Path) -> None:
    """Point `link` at `target` (kept as given, e.g. relative "3"), replacing any old link atomically."""
    link = Path(link)
    tmp = _temp_name(link.parent, link.name)
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
