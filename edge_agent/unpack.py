"""Safe extraction of a bundle (a gzip tar) into a staging directory, then a check of every file against its manifest.

Theory of operation: the archive's bytes were verified against trusted TUF metadata before they get here, but the
checks below do not rely on that: a signed bundle from a compromised build must still not write outside its
staging dir. So `tarfile` is used only to READ members; every member is checked by our own rules and written by
our own code (`open(..., "xb")` under the staging dir), never by `extract`/`extractall`, so no extraction filter,
Python version or tar feature decides what reaches the disk.

A member is accepted only if it is a regular file (directory entries are skipped: the folders are made from the
file paths), its name is a clean relative '/'-path (no absolute path, no '..' or '.', no backslash, no empty
part), it is not a duplicate (also after case folding, for case-insensitive file systems), and the member count and
the total unpacked bytes stay within the caps. Symlinks, hard links, devices, FIFOs and sparse files are refused.
Anything refused raises `BundleError` naming the member.

Then `manifest.json` is parsed as a `Manifest`, and the tree must hold exactly the manifest's `files` (size and
sha256 each) plus `manifest.json`: nothing missing, nothing extra. Every file is fsynced, so a power cut after the
unpack phase is saved cannot leave an empty file that a later phase trusts; `check_tree` re-runs the check anyway
when an install resumes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgefleet.common.fsutil import fsync_dir
from edgefleet.edge_agent.errors import BundleError
from edgefleet.protos.messages import Manifest, MessageError, parse_message

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_MAX_NAME_CHARS = 255  # FileEntry.path allows 255
_MAX_DEPTH = 8


@dataclass(frozen=True)
class UnpackLimits:
    max_total_bytes: int = 2048 * 1024 * 1024
    max_members: int = 64

    @classmethod
    def from_config(cls, config) -> UnpackLimits:
        return cls(int(config.limits.unpacked_max_mb * 1024 * 1024), config.limits.unpacked_max_files)


def _check_name(raw: str) -> str:
    name = raw
    if not name or "\x00" in name:
        raise BundleError(f"bundle member {raw!r}: empty or NUL in the name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle member {raw!r}: absolute paths are not allowed")
    if "\\" in name:
        raise BundleError(f"bundle member {raw!r}: backslashes are not allowed in member names")
    parts = name.split("/")
    if any(p in ("..",) for p in parts):
        raise BundleError(f"bundle member {raw!r}: '..' is not allowed in member names")
    if any(p in ("", ".") for p in parts):
        raise BundleError(f"bundle member {raw!r}: '.' or empty path parts are not allowed")
    if len(name) > _MAX_NAME_CHARS or len(parts) > _MAX_DEPTH:
        raise BundleError(f"bundle member {raw!r}: name too long or too deep")
    return name


def _check_type(member: tarfile.TarInfo) -> None:
    what = (
        "a symlink" if member.issym() else
        "a hard link" if member.islnk() else
        "a FIFO" if member.isfifo() else  # before isdev(): tarfile counts FIFOs as devices
        "a device" if member.isdev() else
        "a sparse file" if member.issparse() else
        None if member.isreg() else
        f"an unsupported type {member.type!r}"
    )
    if what is not None:
        raise BundleError(f"bundle member {member.name!r} is {what}; only regular files are allowed")


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: int) -> int:
    target = dest / member.name
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tf.extractfile(member)
    if src is None:  # not a regular file after all
        raise BundleError(f"bundle member {member.name!r} has no data")
    written = 0
    # "xb": never follow or replace something already there (a duplicate that slipped through would fail here).
    with src, open(target, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.size or written > budget:
                raise BundleError(f"bundle member {member.name!r} is larger than its header or the size cap")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, 0o644)
    return written


def unpack_bundle(archive: str | Path, dest: str | Path, limits: UnpackLimits = UnpackLimits()) -> Manifest:
    """Extract `archive` into the empty or new directory `dest`, check it, and return its manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"staging directory {dest} is not empty")
    seen: set[str] = set()
    total = 0
    count = 0
    try:
        # "r:gz" and not "r:*": a bundle is a gzip tar; anything else is refused rather than guessed.
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:  # streaming: headers are checked one by one, before anything is written
                count += 1
                if count > limits.max_members:
                    raise BundleError(f"bundle has more than {limits.max_members} members (at {member.name!r})")
                _check_name(member.name)
                if member.isdir():
                    continue
                _check_type(member)
                folded = member.name.casefold()
                if folded in seen:
                    raise BundleError(f"bundle member {member.name!r} appears more than once")
                seen.add(folded)
                if member.size < 0 or total + member.size > limits.max_total_bytes:
                    raise BundleError(
                        f"bundle member {member.name!r} ({member.size} bytes) exceeds the unpacked size cap of "
                        f"{limits.max_total_bytes} bytes"
                    )
                total += _write_member(tf, member, dest, limits.max_total_bytes - total)
    except BundleError:
        raise
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise BundleError(f"bundle is not a valid gzip tar archive: {exc}") from None
    except OSError as exc:
        raise BundleError(f"bundle could not be unpacked: {exc}") from None
    for d in sorted({p for p in dest.rglob("*") if p.is_dir()} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    manifest = read_manifest(dest)
    check_tree(dest, manifest)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle has no {MANIFEST_NAME}") from None
    try:
        return parse_message(raw, Manifest)
    except MessageError as exc:
        raise BundleError(f"bundle {MANIFEST_NAME}: {exc}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_tree(directory: str | Path, manifest: Manifest) -> None:
    """The tree holds exactly `manifest.files` (size and sha256) plus manifest.json; raise BundleError otherwise."""
    directory = Path(directory)
    listed = {entry.path: entry for entry in manifest.files}
    if len(listed) != len(manifest.files):
        raise BundleError("bundle manifest lists a file more than once")
    if MANIFEST_NAME in listed:
        raise BundleError(f"bundle manifest must not list {MANIFEST_NAME} in its files")
    for needed in (manifest.model_file, manifest.smoke_test.input_file, manifest.smoke_test.expected_file):
        if needed not in listed:
            raise BundleError(f"bundle manifest names {needed!r} but does not list it in its files")
    present: set[str] = set()
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"bundle file {rel!r} is not a regular file")
        if path.is_file():
            present.add(rel)
    extra = sorted(present - set(listed) - {MANIFEST_NAME})
    if extra:
        raise BundleError(f"bundle file {extra[0]!r} is not listed in the manifest")
    for rel, entry in listed.items():
        path = directory / rel
        if rel not in present:
            raise BundleError(f"bundle file {rel!r} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {rel!r} is {size} bytes; the manifest says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(f"bundle file {rel!r} has sha256 {digest[:12]}..., "
                              f"the manifest says {entry.sha256[:12]}...")
