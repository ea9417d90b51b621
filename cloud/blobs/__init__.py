"""Content-addressed artifact storage: the `BlobStore` protocol and its local-folder implementation."""

from edgefleet.cloud.blobs.base import BlobStore, check_key
from edgefleet.cloud.blobs.local import LocalBlobStore

__all__ = ["BlobStore", "LocalBlobStore", "check_key"]
