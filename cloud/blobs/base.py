"""The `BlobStore` protocol: immutable blobs keyed by the sha256 (lowercase hex) of their bytes.

Theory: a key names content, so a blob is written once and never changes; writing the same bytes twice is a no-op
and two writers cannot disagree. Readers stream (`open`) rather than load, since bundles can be large. `path_of`
gives a local file when there is one (the local store, for zero-copy serving with Range) and None for a remote store
(S3/MinIO), whose callers then stream through `open` or hand out a presigned URL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from edgefleet.cloud.errors import Invalid

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def check_key(key: str) -> str:
    """A blob key must be a sha256 hex digest; anything else (a path, '..') is refused before it reaches storage."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise Invalid(f"invalid blob key {key!r}: expected 64 lowercase hex characters (a sha256 digest)")
    return key


@runtime_checkable
class BlobStore(Protocol):
    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its sha256 hex key."""
        ...

    def put_file(self, path: Path) -> str:
        """Store the file's bytes (streamed, not loaded whole); return its sha256 hex key."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A binary reader of the blob; raises NotFound when it does not exist."""
        ...

    def path_of(self, key: str) -> Path | None:
        """The blob's local file, or None when the store keeps blobs elsewhere; raises NotFound when missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Size in bytes; raises NotFound when the blob does not exist."""
        ...
