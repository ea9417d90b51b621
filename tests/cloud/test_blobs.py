"""cloud/blobs/local.py: the content-addressed store, atomic writes, and keys that cannot escape the folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edgefleet.cloud.blobs import BlobStore, LocalBlobStore
from edgefleet.cloud.errors import Invalid, NotFound


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def test_local_store_implements_the_protocol(store):
    assert isinstance(store, BlobStore)


def test_put_bytes_is_keyed_by_sha256_and_reads_back(store):
    data = b"bundle bytes \x00\x01" * 100
    key = store.put_bytes(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert store.exists(key) and store.size(key) == len(data)
    with store.open(key) as f:
        assert f.read() == data
    path = store.path_of(key)
    assert path is not None and path.read_bytes() == data
    assert path.parent.name == key[:2]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_same_bytes_twice_is_one_blob(store):
    assert store.put_bytes(b"x") == store.put_bytes(b"x")
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_put_file_streams_and_agrees_with_put_bytes(store, tmp_path: Path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one 1 MiB chunk, not a multiple of it
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    key = store.put_file(src)
    assert key == hashlib.sha256(data).hexdigest() == store.put_bytes(data)
    assert store.size(key) == len(data)
    assert not list(store.root.rglob(".tmp-*")), "temporary files must not remain"


def test_put_file_of_missing_file(store, tmp_path: Path):
    with pytest.raises(Invalid, match="no such file"):
        store.put_file(tmp_path / "missing.bin")
    assert not list(store.root.rglob(".tmp-*"))


def test_missing_blob_is_not_found(store):
    key = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(key)
    for call in (store.open, store.size, store.path_of):
        with pytest.raises(NotFound):
            call(key)


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "", "a" * 63, "g" * 64, "/" + "a" * 63])
def test_keys_that_are_not_digests_are_refused(store, key):
    with pytest.raises(Invalid, match="blob key"):
        store.open(key)
    with pytest.raises(Invalid):
        store.exists(key)


def test_a_leftover_temp_file_is_not_a_blob(store):
    # A crash between write and rename leaves a .tmp-* file; the key's blob must still count as missing.
    data = b"half written"
    key = hashlib.sha256(data).hexdigest()
    (store.root / key[:2]).mkdir(parents=True, exist_ok=True)
    (store.root / key[:2] / ".tmp-crash").write_bytes(data[:4])
    assert not store.exists(key)
    assert store.put_bytes(data) == key and store.exists(key)
