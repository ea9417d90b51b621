"""The answers the OpenAPI schema promises, one test per thing tests/cloud/test_api_fuzz.py found, on the real cloud.

Each test names what schemathesis sent and what came back before the fix. They run on one module-wide cloud on
SQLite (the fixes are in the HTTP layer, which no database reaches).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from edgefleet.cloud.api import create_app
from edgefleet.protos.api import ErrorBody
from tests.cloud_server import start_cloud_server


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    server = start_cloud_server(tmp_path_factory.mktemp("cloud"))
    try:
        yield server
    finally:
        server.stop()


def error_of(r: httpx.Response, status: int) -> ErrorBody:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = ErrorBody.model_validate_json(r.content)
    assert body.message.strip() and body.error.strip()
    return body


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(None).openapi()  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/api/v1/classes", "/api/v1/deployments", "/api/v1/enrollment-tokens"])
def test_a_json_body_that_is_not_utf8_is_422_naming_the_byte(cloud, path):
    # Was: 400 {"error": "http_error", "message": "There was an error parsing the body"}, a status no route
    # documents and a message that says nothing of what to fix (FastAPI's answer to a UnicodeDecodeError).
    r = cloud.client().post(path, content=b'{"note": "\xff"}', headers={"Content-Type": "application/json"})
    body = error_of(r, 422)
    assert body.error == "invalid"
    assert "not valid JSON" in body.message and "byte 10" in body.message and "UTF-8" in body.message


def test_a_broken_multipart_form_is_422(cloud):
    # Was: 400 "http_error" with Starlette's bare reason (e.g. "Missing boundary in multipart.").
    r = cloud.client().post("/api/v1/distill", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    body = error_of(r, 422)
    assert body.error == "invalid" and "form could not be read" in body.message and "boundary" in body.message


def _status_codes(openapi: dict, method: str, path: str) -> set[str]:
    return set(openapi["paths"][path][method]["responses"])


@pytest.mark.parametrize("method,path,codes", [
    # Was: 404s and 409s the routes answer (ErrorBody) but the schema did not list.
    ("get", "/api/v1/devices/{device_id}", {"404"}),
    ("get", "/api/v1/devices/{device_id}/desired", {"404"}),
    ("post", "/api/v1/devices/{device_id}/reset", {"404"}),
    ("delete", "/api/v1/tokens/{token_id}", {"404", "409"}),
    ("patch", "/api/v1/tokens/{token_id}", {"404", "409", "413"}),
    ("post", "/api/v1/deployments", {"404", "413"}),
    ("post", "/api/v1/classes", {"409", "413"}),
    ("post", "/api/v1/enroll", {"409", "413"}),
    ("get", "/api/v1/jobs/{job_id}", {"404"}),
    ("post", "/api/v1/jobs/{job_id}/cancel", {"404", "409"}),
    ("get", "/api/v1/jobs/{job_id}/report", {"404"}),
    ("get", "/api/v1/jobs/{job_id}/plot.svg", {"404"}),
    ("get", "/api/v1/models/{name}/versions/{version}/provenance", {"404"}),
    ("get", "/tuf/metadata/{name}", {"404"}),
    ("get", "/tuf/targets/{target_path}", {"206", "404", "416"}),
])
def test_the_schema_lists_every_error_a_route_answers(openapi, method, path, codes):
    assert codes | {"401", "403", "422"} <= _status_codes(openapi, method, path)
    for code in codes - {"206"}:
        content = openapi["paths"][path][method]["responses"][code]["content"]
        assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def test_every_route_that_takes_a_body_lists_the_413(openapi):
    # RequestLimits refuses any body over its route's cap; the schema said so only for the model upload.
    with_body = [(m, p) for p, item in openapi["paths"].items() for m, op in item.items() if "requestBody" in op]
    assert len(with_body) >= 9
    assert all("413" in openapi["paths"][p][m]["responses"] for m, p in with_body)
    assert openapi["paths"]["/api/v1/models"]["post"]["responses"]["413"]["description"] == "Larger than max_model_mb"


def test_a_bundle_is_documented_as_gzip(openapi):
    # Was: documented as application/json; the route answers application/gzip.
    ok = openapi["paths"]["/tuf/targets/{target_path}"]["get"]["responses"]["200"]["content"]
    assert list(ok) == ["application/gzip"]


def _request(sock: socket.socket, head: str, body: bytes) -> bytes:
    sock.sendall(head.encode() + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = sock.recv(65536)
        assert data, f"the connection closed before an answer; got {raw!r}"
        raw += data
    head_bytes, rest = raw.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n") if line.lower().startswith(
        b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head_bytes


def test_a_small_body_refused_before_it_is_read_keeps_the_connection(cloud):
    # Was: `Connection: close` on every refusal before the body was in. A client that sends the head and then the
    # body (urllib3 does) may have its body arrive at a closed socket; the reset that answers it can take the 401
    # with it (RFC 9112 9.6). The fuzzing saw it: ConnectionResetError reading a 401's body. A small declared rest
    # is drained now, and the same connection serves the next request.
    url = urlsplit(cloud.base_url)
    body = b'{"note": "no token"}'
    head = (f"POST /api/v1/enrollment-tokens HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        first = _request(sock, head, body)
        assert first.startswith(b"HTTP/1.1 401") and b"connection: close" not in first.lower(), first
        second = _request(sock, head.replace("POST /api/v1/enrollment-tokens", "POST /api/v1/enroll"), body)
        assert second.startswith(b"HTTP/1.1 401"), second


@pytest.mark.parametrize("header", ["bytes=0-1,x", "bytes=99999-", "bytes=5-3", "pages=1", "bytes=0-1,99999-", ""])
def test_a_range_that_cannot_be_served_is_a_416_error_body(cloud, header):
    # Was: Starlette's FileResponse answered these itself, in plain text (400 "Range header: start must be less
    # than end", 400 "Only support bytes range", an empty 416), on TUF metadata and, with several ranges, bundles.
    # An empty Range header (the fuzzing sent `Range:`) got FileResponse's 400 "Malformed range header." on both.
    r = cloud.client(token="").get("/tuf/metadata/timestamp.json", headers={"Range": header})
    assert error_of(r, 416).error == "range_not_satisfiable"
    assert r.headers["content-range"].startswith("bytes */")


def test_the_range_header_is_in_the_schema(openapi):
    for path in ("/tuf/metadata/{name}", "/tuf/targets/{target_path}"):
        op = openapi["paths"][path]["get"]
        assert any(p["in"] == "header" and p["name"] == "Range" for p in op["parameters"]), op["parameters"]
        assert "multipart/byteranges" in op["responses"]["206"]["content"]
