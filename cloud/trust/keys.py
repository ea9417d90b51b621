"""Signing-key files and the lock that serialises changes across processes: what the TUF repository and the
desired-state signer share.

Keys are ed25519 in PKCS#8 PEM, mode 0600, in a 0700 folder, written through the one crash-safe recipe
(`common/fsutil.py`). A rotation stages the new key as `{name}.next.pem` and `promote`s it over the old one only once
the metadata that names it is on disk, so a crash leaves either the old state or one the next open completes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner

from edgefleet.cloud.errors import CloudError
from edgefleet.common.fsutil import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (made 0600 when missing), held across processes until the block ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def new_signer(path: Path) -> CryptoSigner:
    """A fresh ed25519 signer written to `path` (0600), replacing whatever a failed earlier attempt left there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = CryptoSigner.generate_ed25519()
    atomic_write_bytes(path, fresh.private_bytes, 0o600)
    log.info("made signing key %s (keyid %s)", path, fresh.public_key.keyid)
    return fresh


def load_signer(path: Path) -> CryptoSigner:
    """The ed25519 signer kept in `path`; CloudError when it is unreadable."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("signing key %s was readable by others; setting mode 0600", path)
        os.chmod(path, 0o600)
    try:
        return CryptoSigner(load_pem_private_key(path.read_bytes(), None))
    except (ValueError, TypeError) as exc:
        raise CloudError(f"signing key {path} is unreadable ({exc}): restore it from backup") from None


def promote(staged: Path, path: Path) -> None:
    """Make the staged key `staged` the key in `path` (one rename; the folder is fsynced)."""
    os.replace(staged, path)
    fsync_dir(path.parent)
    log.info("key %s now replaces the previous one", path)


def load_or_create_signer(path: Path) -> CryptoSigner:
    """The ed25519 signer kept in `path` (PEM, 0600), made the first time."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fresh = CryptoSigner.generate_ed25519()
        if atomic_write_bytes(path, fresh.private_bytes, 0o600, exclusive=True):
            log.info("made signing key %s (keyid %s)", path, fresh.public_key.keyid)
            return fresh
    return load_signer(path)
