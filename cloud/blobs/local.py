"""`LocalBlobStore`: blobs as files `{root}/{key[:2]}/{key}` under one folder.

Theory: a blob becomes visible only complete. Bytes go to a temporary file in the blob's own folder (same file
system, so the rename is atomic), are fsynced, renamed onto the final name, and the folder is fsynced so the rename
survives a power cut. A reader therefore sees a whole blob or none; a crash leaves at most a `.tmp-*` file, which
`put_*` never mistakes for a blob. The two-character fan-out keeps folders small on file systems that slow down
with many entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from edgefleet.cloud.blobs.base import check_key
from edgefleet.cloud.errors import CloudError, Invalid, NotFound
from edgefleet.edge_agent.fsutil import fsync_dir  # one crash-safe write recipe for cloud and agent

# 1 MiB: large enough that hashing a big file is not syscall-bound, small enough to stay out of the way.
_CHUNK_BYTES = 1024 * 1024


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CloudError(f"cannot create the blob folder {self.root}: {exc}; check data_dir") from None

    def _file(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    def _commit(self, tmp: Path, key: str) -> None:
        final = self._file(key)
        if final.exists():  # same key, same bytes: keep the one already there
            tmp.unlink(missing_ok=True)
            return
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def _tmp(self, key_hint: str) -> tuple[int, Path]:
        folder = self.root / key_hint[:2] if key_hint else self.root
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        return fd, Path(name)

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if self._file(key).exists():
            return key
        fd, tmp = self._tmp(key)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._commit(tmp, key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def put_file(self, path: Path) -> str:
        # The key is known only after reading, so copy into a temp file in the root while hashing, then rename
        # into the fan-out folder (same file system).
        digest = hashlib.sha256()
        fd, tmp = self._tmp("")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            key = digest.hexdigest()
            self._file(key).parent.mkdir(parents=True, exist_ok=True)
            self._commit(tmp, key)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise Invalid(f"cannot store {path}: no such file") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._file(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {key} is not in the store at {self.root}") from None

    def path_of(self, key: str) -> Path | None:
        path = self._file(key)
        if not path.is_file():
            raise NotFound(f"blob {key} is not in the store at {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._file(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {key} is not in the store at {self.root}") from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()
