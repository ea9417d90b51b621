"""cloud/api: the real app under uvicorn on a real port (tests/cloud_server.py), on SQLite and PostgreSQL.

The main flow (token, enroll, push, deploy, desired state, bundle download with Range, reports) runs on both
databases; the garbage a client can send (tokens, bodies, uploads, ranges, paths) gets `ErrorBody` answers with
the right status, never a stack trace.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import httpx
import pytest

from edgefleet.cloud.api import create_app
from edgefleet.protos.api import (
    DeploymentView,
    DeviceView,
    ErrorBody,
    ModelVersionView,
    StatsView,
)
from edgefleet.protos.messages import ReportedState, SignedDesiredState, TelemetryBatch
from tests.cloud_server import enroll_device as enroll
from tests.cloud_server import serve_app, start_cloud_server, tiny_onnx

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def error_of(r: httpx.Response, status: int) -> ErrorBody:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = ErrorBody.model_validate_json(r.content)
    assert "Traceback" not in r.text
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cloud(tmp_path, db_url):
    server = start_cloud_server(tmp_path / "cloud", db_url=db_url, max_model_mb=0.05)  # 50 KiB: easy to exceed
    try:
        yield server
    finally:
        server.stop()


def test_main_flow(cloud):
    admin = cloud.client()
    anon = cloud.client(token="")
    assert anon.get("/healthz").json() == {"ok": True}
    assert "/api/v1/models" in anon.get("/openapi.json").json()["paths"]
    assert anon.get("/docs").status_code == 200

    dev = enroll(admin, "dev-1")
    other = enroll(admin, "dev-2")
    assert dev.desired_state_url.startswith(cloud.base_url)

    model = tiny_onnx()
    r = admin.post("/api/v1/models", params={"name": "digits"}, content=model,
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    pushed = ModelVersionView.model_validate_json(r.content)
    assert (pushed.name, pushed.version, pushed.sha256) == ("digits", 1, hashlib.sha256(model).hexdigest())
    assert [m.version for m in map(ModelVersionView.model_validate, admin.get("/api/v1/models").json())] == [1]

    r = admin.post("/api/v1/deployments", json={"model": "digits", "device_id": "dev-1"})
    assert r.status_code == 201, r.text
    deployment = DeploymentView.model_validate_json(r.content)
    assert deployment.devices == ["dev-1"]
    bundle = deployment.bundles[0]

    # The device reads its own desired state; the admin may too; another device may not.
    mine = cloud.client(token=dev.device_token)
    r = mine.get("/api/v1/devices/dev-1/desired")
    assert r.status_code == 200, r.text
    doc = SignedDesiredState.model_validate_json(r.content)
    assert doc.payload.device_id == "dev-1"
    assert [(m.name, m.version, m.bundle_target) for m in doc.payload.models] == [("digits", 1, bundle.target_path)]
    assert admin.get("/api/v1/devices/dev-1/desired").status_code == 200
    assert "dev-2" in error_of(cloud.client(token=other.device_token).get("/api/v1/devices/dev-1/desired"),
                               403).message

    # TUF: metadata is public, the bundle needs a token and honours Range.
    assert anon.get("/tuf/metadata/timestamp.json").json()["signed"]["_type"] == "timestamp"
    assert anon.get("/tuf/metadata/1.root.json").status_code == 200
    url = f"/tuf/targets/{bundle.target_path}"
    error_of(anon.get(url), 401)
    full = mine.get(url)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    assert hashlib.sha256(full.content).hexdigest() == bundle.sha256 and len(full.content) == bundle.size_bytes
    part = mine.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(full.content)}"
    resume = mine.get(url, headers={"Range": "bytes=100-"})
    assert resume.status_code == 206 and full.content[:100] + resume.content == full.content
    assert mine.get(url, headers={"Range": "bytes=-5"}).content == full.content[-5:]
    bad = mine.get(url, headers={"Range": f"bytes={len(full.content)}-"})
    assert error_of(bad, 416).error == "range_not_satisfiable"
    assert bad.headers["content-range"] == f"bytes */{len(full.content)}"
    error_of(mine.get(url, headers={"Range": "pages=1-2"}), 416)
    error_of(mine.get("/tuf/targets/bundles/nope/v1/rpi4.tar.gz"), 404)

    # Reports over HTTP: the device's own only.
    report = ReportedState(device_id="dev-1", generation=doc.payload.generation, reported_at=NOW)
    assert mine.post("/api/v1/devices/dev-1/reported", content=report.to_wire(),
                     headers={"Content-Type": "application/json"}).status_code == 204
    error_of(mine.post("/api/v1/devices/dev-2/reported", json=report.to_dict()), 403)
    error_of(mine.post("/api/v1/devices/dev-1/reported",
                       json=report.model_copy(update={"device_id": "dev-2"}).to_dict()), 422)
    batch = TelemetryBatch(device_id="dev-1", seq=1, sent_at=NOW)
    assert mine.post("/api/v1/devices/dev-1/telemetry", json=batch.to_dict()).status_code == 204
    assert mine.post("/api/v1/devices/dev-1/telemetry", json=batch.to_dict()).status_code == 204  # replay: ok

    device = DeviceView.model_validate_json(admin.get("/api/v1/devices/dev-1").content)
    assert device.reported_generation == doc.payload.generation
    assert {d["device_id"] for d in admin.get("/api/v1/devices").json()} == {"dev-1", "dev-2"}
    assert any(row["device_id"] == "dev-1" for row in admin.get("/api/v1/status").json())
    assert len(admin.get("/api/v1/deployments").json()) == 1
    assert any(c["name"] == "rpi4" for c in admin.get("/api/v1/classes").json())
    StatsView.model_validate_json(admin.get("/api/v1/stats").content)


def test_tokens_are_checked(cloud):
    admin = cloud.client()
    dev = enroll(admin, "dev-t")
    assert "Bearer" in error_of(cloud.client(token="").get("/api/v1/models"), 401).message
    r = httpx.get(f"{cloud.base_url}/api/v1/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert "Bearer <token>" in error_of(r, 401).message
    assert error_of(cloud.client(token="efa_not-a-real-token").get("/api/v1/models"), 401).error == "unauthorized"
    # A device token on admin routes, and for enrolling.
    device = cloud.client(token=dev.device_token)
    for path in ("/api/v1/models", "/api/v1/devices", "/api/v1/stats", "/api/v1/status"):
        assert error_of(device.get(path), 403).error == "forbidden"
    error_of(device.post("/api/v1/enroll", json={"device_id": "x", "device_class": "rpi4"}), 403)
    error_of(admin.post("/api/v1/enroll", json={"device_id": "x", "device_class": "rpi4"}), 403)
    # The admin may read, but not report as, a device.
    error_of(admin.post("/api/v1/devices/dev-t/reported",
                        json=ReportedState(device_id="dev-t", generation=0, reported_at=NOW).to_dict()), 403)


def test_bad_bodies_name_the_field(cloud):
    admin = cloud.client()
    r = admin.post("/api/v1/deployments", content=b"{not json", headers={"Content-Type": "application/json"})
    assert "not valid JSON" in error_of(r, 422).message
    r = admin.post("/api/v1/enrollment-tokens", json={"note": "x", "ttl": 5})
    body = error_of(r, 422)
    assert "ttl" in body.message and body.detail == {"unknown_fields": ["ttl"]}
    r = admin.post("/api/v1/enrollment-tokens", json={"ttl_s": -1})
    assert "ttl_s" in error_of(r, 422).message
    r = admin.post("/api/v1/deployments", json={"model": "digits"})
    assert "exactly one target" in error_of(r, 422).message
    tok = admin.post("/api/v1/enrollment-tokens", json={}).json()["token"]
    r = admin.post("/api/v1/enroll", headers=bearer(tok),
                   json={"device_id": "bad/id", "device_class": "rpi4", "extra": 1})
    body = error_of(r, 422)
    assert body.error == "invalid" and "device_id" in body.message
    assert {f["field"] for f in body.detail["fields"]} >= {"body.device_id", "body.extra"}
    r = admin.post("/api/v1/enroll", headers=bearer(tok), json={"device_id": "d", "device_class": "toaster"})
    assert error_of(r, 422).error == "unknown_class"
    error_of(admin.get("/api/v1/devices/nobody"), 404)
    assert error_of(admin.get("/api/v1/nowhere"), 404).error == "not_found"
    assert error_of(admin.delete("/api/v1/models"), 405).error == "method_not_allowed"


def test_uploads_are_checked(cloud):
    admin = cloud.client()
    r = admin.post("/api/v1/models", params={"name": "junk"}, content=b"this is not onnx" * 10,
                   headers={"Content-Type": "application/octet-stream"})
    body = error_of(r, 422)
    assert body.error == "model_invalid" and body.message
    assert error_of(admin.post("/api/v1/models", params={"name": "junk"}, content=b""), 422).error == "model_invalid"
    assert "name" in error_of(admin.post("/api/v1/models", params={"name": "Bad Name"}, content=b"x"), 422).message
    error_of(admin.post("/api/v1/models", content=tiny_onnx()), 422)  # no name
    # Over max_model_mb (50 KiB): refused from Content-Length, and while streaming a chunked body.
    big = b"\0" * (200 * 1024)
    assert "max_model_mb" in error_of(admin.post("/api/v1/models", params={"name": "big"}, content=big), 413).message

    def chunks():
        for _ in range(64):
            yield b"\0" * 8192

    r = admin.post("/api/v1/models", params={"name": "big"}, content=chunks())
    assert error_of(r, 413).error == "too_large"
    assert admin.get("/api/v1/models").json() == []


def test_tuf_metadata_names_are_strict(cloud):
    anon = cloud.client(token="")
    for name in ("..%2F..%2Fadmin.token", "%2E%2E", ".hidden.json", "root.pem", "1.root.json.bak"):
        r = anon.get(f"/tuf/metadata/{name}")
        assert r.status_code == 404, (name, r.status_code)
        assert "admin" not in r.text or "efa_" not in r.text
    assert anon.get("/tuf/metadata/../admin.token").status_code == 404
    error_of(anon.get("/tuf/metadata/99.root.json"), 404)  # ngclient reads this as "no newer root"
    assert anon.get("/tuf/metadata/timestamp.json").headers["cache-control"] == "no-store"


class _BrokenFleet:
    """A Fleet whose every call fails in an unexpected way."""

    def authenticate(self, token):
        from edgefleet.cloud.auth import Principal

        return Principal(kind="admin")

    def list_models(self):
        raise RuntimeError("secret internal detail")


@pytest.fixture
def broken():
    server = serve_app(create_app(_BrokenFleet()))
    try:
        yield server
    finally:
        server.stop()


def test_unexpected_errors_are_500_error_bodies_without_details(broken):
    r = httpx.get(f"{broken.base_url}/api/v1/models", headers=bearer("x"))
    body = error_of(r, 500)
    assert body.error == "internal" and "secret" not in r.text


def test_openapi_documents_the_upload_body_and_bearer_auth(broken):
    spec = httpx.get(f"{broken.base_url}/openapi.json").json()
    upload = spec["paths"]["/api/v1/models"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert any("HTTPBearer" in s for s in spec["components"]["securitySchemes"])
    assert "ErrorBody" in json.dumps(spec)


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-9", 100, (0, 10)),
    ("bytes=90-", 100, (90, 100)),
    ("bytes=90-500", 100, (90, 100)),  # an end past the file is clipped (RFC 9110 14.1.2)
    ("bytes=-10", 100, (90, 100)),
    ("bytes=-500", 100, (0, 100)),
    ("bytes=0-1,5-6", 100, None),  # several ranges: each checked, then FileResponse answers multipart/byteranges
    ("bytes=0-1,x", 100, ValueError),  # was passed on to FileResponse: its plain-text 400, not an ErrorBody
    ("bytes=0-1,200-", 100, ValueError),  # and its plain-text 416
    ("bytes=100-", 100, ValueError),
    ("bytes=5-2", 100, ValueError),
    ("bytes=-0", 100, ValueError),
    ("bytes=-", 100, ValueError),
    ("items=0-9", 100, ValueError),
    ("bytes=a-b", 100, ValueError),
])
def test_parse_range(header, size, expected):
    from edgefleet.cloud.api.routes_tuf import parse_range

    if expected is ValueError:
        with pytest.raises(ValueError):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == expected


class _RemoteBlobFleet:
    """A Fleet whose blob store has no local files (as S3 would): bundles stream through `open`."""

    DATA = bytes(range(256)) * 40

    def __init__(self) -> None:
        import io
        from types import SimpleNamespace

        sha = hashlib.sha256(self.DATA).hexdigest()
        self.tuf = SimpleNamespace(get_target=lambda path: SimpleNamespace(sha256=sha))
        self.blobs = SimpleNamespace(size=lambda key: len(self.DATA), path_of=lambda key: None,
                                     open=lambda key: io.BytesIO(self.DATA))

    def authenticate(self, token):
        from edgefleet.cloud.auth import Principal

        return Principal(kind="device", device_id="d")


def test_bundles_from_a_remote_blob_store_support_range():
    server = serve_app(create_app(_RemoteBlobFleet()))
    data = _RemoteBlobFleet.DATA
    url = f"{server.base_url}/tuf/targets/bundles/m/v1/rpi4.tar.gz"
    try:
        full = httpx.get(url, headers=bearer("x"))
        assert full.status_code == 200 and full.content == data
        part = httpx.get(url, headers={**bearer("x"), "Range": "bytes=1000-"})
        assert part.status_code == 206 and part.content == data[1000:]
        assert part.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        error_of(httpx.get(url, headers={**bearer("x"), "Range": "bytes=99999-"}), 416)
    finally:
        server.stop()


def test_no_enrollment_token_can_take_a_device_id_over(cloud, tmp_path):
    """Neither another enrollment token nor the one that enrolled the device re-enrolls it: only the device's own
    key does (cloud/enrollment.py), or an operator's reset."""
    from edgefleet.edge_agent.identity import DeviceKey
    from edgefleet.protos.messages import EnrollRequest

    admin = cloud.client()
    first = admin.post("/api/v1/enrollment-tokens", json={"note": "a"}).json()["token"]
    second = admin.post("/api/v1/enrollment-tokens", json={"note": "b"}).json()["token"]
    key = DeviceKey.load_or_create(tmp_path / "kiosk")

    def signed() -> bytes:
        from datetime import datetime, timezone

        return EnrollRequest(device_id="kiosk-1", device_class="rpi4", public_key=key.public_key,
                             proof=key.proof("kiosk-1", "rpi4", datetime.now(timezone.utc))).to_wire()

    json_headers = {"Content-Type": "application/json"}
    original = admin.post("/api/v1/enroll", headers={**bearer(first), **json_headers}, content=signed())
    assert original.status_code == 200, original.text
    body = {"device_id": "kiosk-1", "device_class": "rpi4"}
    for token in (second, first):  # a copied config holds the enrollment token, not the device key
        taken = error_of(admin.post("/api/v1/enroll", headers=bearer(token), json=body), 409)
        assert taken.error == "enrollment_refused" and "fleet devices reset kiosk-1" in taken.message
    device_token = original.json()["device_token"]
    assert cloud.client(token=device_token).get("/api/v1/devices/kiosk-1/desired").status_code in (200, 404)
    # The device itself (its key), with any valid enrollment token, re-enrolls: the device token rotates.
    again = admin.post("/api/v1/enroll", headers={**bearer(second), **json_headers}, content=signed())
    assert again.status_code == 200, again.text
    assert cloud.client(token=device_token).get("/api/v1/devices/kiosk-1/desired").status_code == 401
    shown = admin.get("/api/v1/devices/kiosk-1").json()
    assert shown["enrollments_refused"] == 2 and shown["has_device_key"] is True
    # The identity routes: reset, and token ids within the database's range.
    assert admin.post("/api/v1/devices/kiosk-1/reset").json()["reset_pending"] is True
    assert error_of(admin.delete(f"/api/v1/tokens/{2**31}"), 422).message
    assert error_of(admin.delete("/api/v1/tokens/123456"), 404).message
    assert cloud.client(token=device_token).get("/api/v1/tokens").status_code == 401
