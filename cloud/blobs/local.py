"""`LocalBlobStore`: blobs as files `{root}/{key[:2]}/{key}` under one folder.

Theory: a blob becomes visible only complete. Bytes go to a temporary file in the blob's own folder (same file
system, so the rename is atomic), are fsynced, linked onto the final name (an existing blob of the same key wins),
and the folder is fsynced so the new name survives a power cut (`edgefleet.common.fsutil.staged_file`). A reader
therefore sees a whole blob or none; a crash leaves at most a `.tmp-*` file, which `put_*` never mistakes for a blob.
The two-character fan-out keeps folders small on file systems that slow down with many entries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from edgefleet.cloud.blobs.base import check_key
from edgefleet.cloud.errors import CloudError, Invalid, NotFound
from edgefleet.common.fsutil import staged_file  # the one crash-safe write recipe for cloud and agent

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

    def _folder(self, key: str) -> Path:
        return self._file(key).parent

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if self._file(key).exists():
            return key
        with staged_file(self._folder(key), 0o644) as staged:
            staged.file.write(data)
            staged.commit(self._file(key), exclusive=True)  # same key, same bytes: an existing blob wins
        return key

    def put_file(self, path: Path) -> str:
        # The key is known only after reading, so copy into a temp file in the root while hashing, then rename
        # into the fan-out folder (same file system).
        digest = hashlib.sha256()
        try:
            src = open(path, "rb")
        except FileNotFoundError:
            raise Invalid(f"cannot store {path}: no such file") from None
        with src, staged_file(self.root, 0o644) as staged:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                staged.file.write(chunk)
            key = digest.hexdigest()
            self._folder(key).mkdir(parents=True, exist_ok=True)
            staged.commit(self._file(key), exclusive=True)
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
