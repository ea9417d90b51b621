"""CloudClient against a real HTTP server on a real socket: resumable downloads, error mapping."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.errors import AgentError, BundleError, CloudUnavailable, EnrollError
from edgefleet.protos.messages import EnrollRequest
from tests.harness import free_port

BLOB = bytes(range(256)) * 4000  # ~1 MB


class _Handler(http.server.BaseHTTPRequestHandler):
    cut_after: int | None = None  # close the connection after this many body bytes (first request only)
    requests: list[dict] = []
    body = BLOB

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        type(self).requests.append({"path": self.path, "range": self.headers.get("Range"),
                                    "auth": self.headers.get("Authorization")})
        if self.path == "/boom":
            self.send_response(503)
            self.end_headers()
            return
        if self.path == "/missing":
            self.send_response(404)
            self.end_headers()
            return
        data = type(self).body
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        payload = data[start:]
        cut = type(self).cut_after
        if cut is not None:
            type(self).cut_after = None
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(payload)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        body = json.dumps({"error": "unauthorized", "message": "enrollment token expired: ask for a new one"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.requests = []
    _Handler.cut_after = None
    _Handler.body = BLOB
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_whole(server, tmp_path: Path):
    client = CloudClient(server, token="dev-token")
    out = client.download("/tuf/targets/b.tar.gz", tmp_path / "b.tar.gz", max_bytes=len(BLOB))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(BLOB).digest()
    assert _Handler.requests[0]["auth"] == "Bearer dev-token"
    assert _Handler.requests[0]["range"] is None


def test_download_resumes_with_range_after_a_cut(server, tmp_path: Path):
    _Handler.cut_after = 300_000
    client = CloudClient(server, token="t")
    with pytest.raises(CloudUnavailable):
        client.download("/b", tmp_path / "b", max_bytes=len(BLOB))
    part = tmp_path / "b.part"
    assert part.exists() and 0 < part.stat().st_size < len(BLOB)
    have = part.stat().st_size
    client.download("/b", tmp_path / "b", max_bytes=len(BLOB))
    assert (tmp_path / "b").read_bytes() == BLOB
    assert _Handler.requests[-1]["range"] == f"bytes={have}-"


def test_download_longer_than_trusted_length_is_refused(server, tmp_path: Path):
    client = CloudClient(server)
    with pytest.raises(BundleError, match="trusted length"):
        client.download("/b", tmp_path / "b", max_bytes=1000)
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "b.part").exists()


def test_errors_are_wrapped(server, tmp_path: Path):
    client = CloudClient(server)
    with pytest.raises(CloudUnavailable, match="503"):
        client.download("/boom", tmp_path / "x", max_bytes=10)
    with pytest.raises(BundleError, match="does not exist"):
        client.download("/missing", tmp_path / "x", max_bytes=10)
    with pytest.raises(EnrollError, match="enrollment token expired"):
        client.enroll(EnrollRequest(device_id="d1", device_class="rpi4"), "bad")


def test_unreachable_cloud_is_cloud_unavailable(tmp_path: Path):
    client = CloudClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(CloudUnavailable, match="cannot reach the cloud"):
        client.desired_state_raw("/api/v1/devices/d1/desired")
    assert issubclass(CloudUnavailable, AgentError)
