"""TUF routes: the repository's metadata (public: it is signed) and the targets, i.e. the bundles (device or admin).

Metadata: `GET /tuf/metadata/{file}` serves a file of `TufRepository.metadata_dir` byte for byte. The name must look
like TUF metadata (`timestamp.json`, `{N}.root.json`, ...): no '/', no leading dot, so no path traversal. A missing
file is a 404, which tuf.ngclient reads as "no newer root". `timestamp.json` is never cached; versioned files
never change, so caches may keep them.

Targets: `GET /tuf/targets/{path}` looks the path up in the signed targets metadata (`TufRepository.get_target`:
only bundles a deployment built and signed are there, and the path never reaches the file system), then serves
the blob with that sha256 from the blob store (`Fleet` stores each bundle under its sha256). Range
requests (RFC 9110 14) are how agents resume interrupted downloads: a local blob goes through Starlette's
`FileResponse`, which answers 206 with Content-Range (checked in starlette 1.x); a range that cannot be satisfied
is refused here first as a 416 `ErrorBody` with `Content-Range: bytes */{size}`, so the agent knows to start over.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from edgefleet.cloud.api.deps import DeviceOrAdminDep, FleetDep
from edgefleet.cloud.api.handlers import error_response
from edgefleet.cloud.errors import NotFound

router = APIRouter(prefix="/tuf", tags=["tuf"])

# TUF metadata file names: "timestamp.json", "3.root.json", "12.targets.json", and delegated roles later.
_METADATA_NAME_RE = re.compile(r"^(?:[0-9]{1,10}\.)?[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.json$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK_BYTES = 256 * 1024


@router.get("/metadata/{name}")
def metadata(name: str, fleet: FleetDep) -> Response:
    """A TUF metadata file (public: every file is signed, and the agent checks the signatures)."""
    if not _METADATA_NAME_RE.match(name):
        raise NotFound(f"{name!r} is not a TUF metadata file name (e.g. timestamp.json, 1.root.json)")
    path = fleet.tuf.metadata_dir / name
    if not path.is_file():
        raise NotFound(f"no TUF metadata file {name}")
    cache = "no-store" if name == "timestamp.json" else "public, max-age=31536000, immutable"
    return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single `bytes=` range; None when it asks for several (served whole).

    Raises ValueError when the range cannot be satisfied or is malformed.
    """
    if "," in header:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(f"malformed Range header {header!r}; use bytes=START- or bytes=START-END")
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise ValueError("a suffix range of 0 bytes selects nothing")
        return max(0, size - n), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        raise ValueError(f"range starts at byte {start} but the file has {size} bytes")
    return start, end


def _stream(fh, start: int, end: int) -> Iterator[bytes]:
    with fh:
        fh.seek(start)
        left = end - start
        while left > 0 and (chunk := fh.read(min(_CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk


@router.get("/targets/{target_path:path}")
def target(target_path: str, request: Request, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """A bundle, by its TUF target path; supports `Range` for resumable downloads."""
    # What TUF signed is what we serve: the blob store keys a bundle by the same sha256 the targets role lists.
    info = fleet.tuf.get_target(target_path)
    if info is None:
        raise NotFound(f"no signed bundle {target_path!r}; a deployment builds and signs bundles")
    size = fleet.blobs.size(info.sha256)
    header = request.headers.get("range")
    span = None
    if header:
        try:
            span = parse_range(header, size)
        except ValueError as exc:
            return error_response(416, "range_not_satisfiable", f"{exc}; download from byte 0 again",
                                  headers={"Content-Range": f"bytes */{size}"})
    path = fleet.blobs.path_of(info.sha256)
    if path is not None:
        # An ETag from the content hash: If-Range then resumes only a download of these exact bytes.
        return FileResponse(path, media_type="application/gzip", headers={"ETag": f'"{info.sha256}"'})
    # A remote blob store: stream through `open`, one range at most.
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{info.sha256}"'}
    if span is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(_stream(fleet.blobs.open(info.sha256), 0, size), media_type="application/gzip",
                                 headers=headers)
    start, end = span
    headers |= {"Content-Range": f"bytes {start}-{end - 1}/{size}", "Content-Length": str(end - start)}
    return StreamingResponse(_stream(fleet.blobs.open(info.sha256), start, end), status_code=206,
                             media_type="application/gzip", headers=headers)
