"""How the agent downloads a bundle: `apply.Fetcher` over HTTP (the cloud's TUF targets route, resumable with
Range) or over the gRPC agent channel (`FetchArtifact` from an offset), both resuming from the `dest.part` an
earlier try left.

Theory: a download that breaks (the network, the cloud restarting, the agent itself) leaves its bytes in
`{dest}.part`, and the next try asks for the rest: over HTTP with `Range: bytes={have}-`, over gRPC with
`FetchRequest.offset = have`. Neither ever writes past the trusted length TUF gave for the target (a longer answer is
refused and its bytes deleted), and neither trusts what it wrote: the executor verifies the whole file against
TUF's length and hashes before unpacking (apply.py), and drops a download that fails, so a resumed file that came
out wrong is fetched again from zero, never installed.

With transport = "grpc" the agent fetches over its channel (`GrpcBundleFetcher`); when the channel cannot serve
(the cloud unreachable on it, or no gRPC link, as in tests that give their own link) it takes HTTP, which every
agent also reaches for enrollment and TUF metadata, and logs that it did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from edgefleet.edge_agent.cloud_client import CloudApi
from edgefleet.edge_agent.errors import AgentError, BundleError, CloudUnavailable

log = logging.getLogger(__name__)


class ArtifactSource(Protocol):
    def fetch_artifact(self, target: str, offset: int) -> Iterator[tuple[int, bytes, int]]:
        """(offset, data, bundle size) chunks of `target` from `offset` (link_grpc.GrpcLink)."""
        ...


class HttpBundleFetcher:
    """apply.Fetcher over the cloud's TUF targets endpoint, resumable with Range."""

    def __init__(self, client: CloudApi, targets_url: str, max_bytes: int) -> None:
        self.client = client
        self.targets_url = targets_url.rstrip("/") + "/"
        self.max_bytes = max_bytes

    def fetch(self, target_path: str, dest: Path, *, expected_length: int | None = None) -> None:
        url = self.targets_url + quote(target_path)
        self.client.download(url, dest, max_bytes=expected_length if expected_length is not None else self.max_bytes)


class GrpcBundleFetcher:
    """apply.Fetcher over the agent channel's `FetchArtifact`, resuming from `dest.part`; `fallback` (HTTP) when
    the channel cannot serve. `source()` is the daemon's current link, or None (then HTTP at once)."""

    def __init__(self, source: Callable[[], ArtifactSource | None], fallback: HttpBundleFetcher | None,
                 max_bytes: int) -> None:
        self.source = source
        self.fallback = fallback
        self.max_bytes = max_bytes
        self.fetched_over_grpc = 0  # downloads finished over the channel (tests and logs read them)

    def fetch(self, target_path: str, dest: Path, *, expected_length: int | None = None) -> None:
        source = self.source()
        if source is None or not hasattr(source, "fetch_artifact"):
            return self._fall_back(target_path, dest, expected_length, "the link is not the gRPC channel")
        try:
            self._fetch(source, target_path, dest, expected_length if expected_length is not None
                        else self.max_bytes)
        except CloudUnavailable as exc:
            if self.fallback is None:
                raise
            self._fall_back(target_path, dest, expected_length, str(exc))

    def _fall_back(self, target_path: str, dest: Path, expected_length: int | None, why: str) -> None:
        if self.fallback is None:
            raise CloudUnavailable(f"download of {target_path} over the gRPC channel failed ({why}) and no HTTP "
                                   "fallback is configured; retrying later")
        log.info("downloading %s over HTTP: %s", target_path, why)
        self.fallback.fetch(target_path, dest, expected_length=expected_length)

    def _fetch(self, source: ArtifactSource, target_path: str, dest: Path, limit: int) -> None:
        import grpc

        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > limit:
            part.unlink()
            have = 0
        if have and have == limit:
            os.replace(part, dest)
            return
        written = have
        try:
            with open(part, "ab" if have else "wb") as fh:
                for offset, data, size in source.fetch_artifact(target_path, have):
                    if size > limit:
                        raise BundleError(f"bundle {target_path} is {size} bytes on the cloud, over its trusted "
                                          f"length of {limit} bytes; refusing it")
                    if offset != written:
                        raise CloudUnavailable(f"download of {target_path}: a chunk at byte {offset} where "
                                               f"{written} was due; retrying")
                    written += len(data)
                    if written > limit:
                        raise BundleError(f"download of {target_path} exceeds the trusted length of {limit} bytes")
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BundleError:
            part.unlink(missing_ok=True)
            raise
        except grpc.RpcError as exc:
            _raise_for(exc, target_path, part)
        os.replace(part, dest)
        self.fetched_over_grpc += 1
        log.info("downloaded %s over the gRPC channel: %d bytes%s", target_path, written,
                 f" (resumed at byte {have})" if have else "")


def _raise_for(exc: Any, target_path: str, part: Path) -> None:
    """A FetchArtifact failure as the agent's errors; the bytes already in `part` stay for the next try unless
    they cannot be right."""
    code = exc.code().name if callable(getattr(exc, "code", None)) and exc.code() is not None else "UNKNOWN"
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    if code == "NOT_FOUND":
        raise BundleError(f"bundle {target_path} does not exist on the cloud (NOT_FOUND: {details})") from None
    if code == "OUT_OF_RANGE":  # our partial file is longer than the bundle: it is not this bundle's start
        part.unlink(missing_ok=True)
        raise CloudUnavailable(f"download of {target_path}: the partial file did not match ({details}); "
                               "restarting") from None
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        raise AgentError(f"download of {target_path} refused ({code}): {details}") from None
    raise CloudUnavailable(f"download of {target_path} over the gRPC channel interrupted ({code}): {details}") from None


__all__ = ["GrpcBundleFetcher", "HttpBundleFetcher"]
