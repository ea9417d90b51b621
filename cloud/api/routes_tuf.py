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
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse, StreamingResponse

from edgefleet.cloud.api.deps import DeviceOrAdminDep, FleetDep
from edgefleet.cloud.api.handlers import error_response, error_responses
from edgefleet.cloud.errors import NotFound

router = APIRouter(prefix="/tuf", tags=["tuf"])

# TUF metadata file names: "timestamp.json", "3.root.json", "12.targets.json", and delegated roles later.
_METADATA_NAME_RE = re.compile(r"^(?:[0-9]{1,10}\.)?[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.json$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Range (RFC 9110 14.2), checked here first (`_refuse_range`), then served by FileResponse or `_stream`.
RangeHeader = Annotated[str | None, Header(alias="Range", description="bytes=START-END, bytes=START- or bytes=-N")]
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_SEVERAL_RANGES = {"multipart/byteranges": _BINARY}  # FileResponse's answer to several ranges
_CHUNK_BYTES = 256 * 1024


@router.get("/metadata/{name}", responses={
    206: {"description": "The requested range(s) of the file", "content": {"application/json": {}, **_SEVERAL_RANGES}},
    **error_responses(404, 416)})
def metadata(name: str, fleet: FleetDep, range_: RangeHeader = None) -> Response:
    """A TUF metadata file (public: every file is signed, and the agent checks the signatures)."""
    if not _METADATA_NAME_RE.match(name):
        raise NotFound(f"{name!r} is not a TUF metadata file name (e.g. timestamp.json, 1.root.json)")
    path = fleet.tuf.metadata_dir / name
    if not path.is_file():
        raise NotFound(f"no TUF metadata file {name}")
    if (refused := _refuse_range(range_, path.stat().st_size)) is not None:
        return refused
    cache = "no-store" if name == "timestamp.json" else "public, max-age=31536000, immutable"
    return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single `bytes=` range; None when it asks for several (Starlette's FileResponse
    answers those, once each is checked here: its own refusals are plain text, not an ErrorBody).

    Raises ValueError when the range, or any of several, cannot be satisfied or is malformed.
    """
    if "," in header:
        unit, _, ranges = header.strip().partition("=")
        for part in ranges.split(","):
            parse_range(f"{unit}={part.strip()}", size)
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
    if start >= size:
        raise ValueError(f"range starts at byte {start} but the file has {size} bytes")
    if last and int(last) < start:
        raise ValueError(f"range {start}-{last} ends before it starts")
    return start, end


def _refuse_range(header: str | None, size: int) -> Response | None:
    """A 416 ErrorBody for a Range header that cannot be served; None when there is none or it can. An empty one
    is malformed: FileResponse would refuse it in plain text."""
    if header is None:
        return None
    try:
        parse_range(header, size)
    except ValueError as exc:
        return error_response(416, "range_not_satisfiable", f"{exc}; download from byte 0 again",
                              headers={"Content-Range": f"bytes */{size}"})
    return None


def _stream(fh, start: int, end: int) -> Iterator[bytes]:
    with fh:
        fh.seek(start)
        left = end - start
        while left > 0 and (chunk := fh.read(min(_CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk


_BUNDLE = {"application/gzip": _BINARY}


@router.get("/targets/{target_path:path}", response_class=Response, responses={
    200: {"description": "The bundle", "content": _BUNDLE},
    206: {"description": "The requested range(s) of the bundle", "content": _BUNDLE | _SEVERAL_RANGES},
    **error_responses(404, 416)})
def target(target_path: str, fleet: FleetDep, who: DeviceOrAdminDep, range_: RangeHeader = None) -> Response:
    """A bundle, by its TUF target path; supports `Range` for resumable downloads."""
    # What TUF signed is what we serve: the blob store keys a bundle by the same sha256 the targets role lists.
    info = fleet.tuf.get_target(target_path)
    if info is None:
        raise NotFound(f"no signed bundle {target_path!r}; a deployment builds and signs bundles")
    size = fleet.blobs.size(info.sha256)
    if (refused := _refuse_range(range_, size)) is not None:
        return refused
    span = parse_range(range_, size) if range_ is not None else None
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
