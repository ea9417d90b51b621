"""cloud/api/limits.py and the integer ranges of the request views, against the real cloud over real sockets.

The body tests speak HTTP/1.1 over a raw socket: the request's headers go first, then a sender thread streams the
body from one reused 64 KiB buffer while the test waits for the answer. `sent` counts the bytes the kernel took
from the sender; the cloud cannot have read more than that, so "sent is a few MiB of a 256 MiB body" shows the cloud
answered without reading the body (socket buffers on loopback hold up to ~10 MiB). Before limits.py a JSON or form
route read the whole body before checking the token: these tests then see no answer at all (the cloud waits for a
body that is never sent), `sent` equal to the whole body, or a connection kept open to drain it.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from edgefleet.protos.api import MAX_TOKEN_TTL_S
from edgefleet.protos.limits import INT32_MAX
from tests.cloud_server import start_cloud_server, tiny_onnx

BIG = 256 * 1024 * 1024  # the body an attacker claims or streams
READ_BOUND = 32 * 1024 * 1024  # at most this much may leave the sender: the cap plus loopback socket buffers
CHUNK = b"\0" * (64 * 1024)
ANSWER_TIMEOUT_S = 20  # a bound on waiting for the answer, not a timing assertion


@dataclass
class Exchange:
    status: int
    headers: dict[str, str]
    body: dict
    sent: int
    closed: bool  # the cloud closed the connection after answering
    errors: list[str] = field(default_factory=list)


def exchange(base_url: str, method: str, path: str, headers: dict[str, str], *, length: int | None = BIG,
             chunked: bool = False, send_bytes: int = BIG) -> Exchange:
    """Send the head of a request, stream up to `send_bytes` of body in a thread, and read the answer. A multipart
    Content-Type gets a valid part head first, so the form parser reads on into the file's (endless) bytes."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=ANSWER_TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    head = [f"{method} {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    elif length is not None:
        head.append(f"Content-Length: {length}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    stop = threading.Event()

    ctype = headers.get("Content-Type", "")
    prefix = b""
    if "boundary=" in ctype:
        prefix = (f"--{ctype.split('boundary=')[1]}\r\nContent-Disposition: form-data; name=\"teacher\"; "
                  'filename="t.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()

    def send_body() -> None:
        nonlocal sent
        frame = (f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n") if chunked else CHUNK
        try:
            if prefix:
                sock.sendall((f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n") if chunked else prefix)
                sent += len(prefix)
            while sent < send_bytes and not stop.is_set():
                sock.sendall(frame)
                sent += len(CHUNK)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the cloud closed the connection: what a refusal should do

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = sock.recv(65536)
            assert data, f"the connection closed before an answer; got {raw!r}"
            raw += data
        head_bytes, rest = raw.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        got = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(rest) < int(got.get("content-length", "0")):
            data = sock.recv(65536)
            assert data, "the connection closed in the middle of the answer"
            rest += data
        try:
            closed = sock.recv(65536) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    finally:
        stop.set()
        sock.close()
        sender.join(ANSWER_TIMEOUT_S)
    return Exchange(status, got, json.loads(rest) if rest else {}, sent, closed)


def assert_refused_unread(x: Exchange, status: int, error: str) -> None:
    assert x.status == status, x
    assert x.body["error"] == error, x.body
    assert x.headers.get("connection") == "close", x.headers
    assert x.closed, "the cloud kept the connection open to drain the body"
    assert x.sent < READ_BOUND, f"{x.sent} bytes of the body left the sender before the {status}"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    # 1 MB models and 1 MB transfer sets: the distillation form's cap is 3 MiB, the JSON cap the default 512 KiB.
    server = start_cloud_server(tmp_path_factory.mktemp("cloud"), max_model_mb=1, max_transfer_mb=1)
    try:
        yield server
    finally:
        server.stop()


ROUTES = [
    ("POST", "/api/v1/deployments", "application/json"),
    ("POST", "/api/v1/enroll", "application/json"),
    ("POST", "/api/v1/devices/dev-1/reported", "application/json"),
    ("POST", "/api/v1/enrollment-tokens", "application/json"),
    ("POST", "/api/v1/distill", "multipart/form-data; boundary=xyz"),
    ("POST", "/api/v1/models?name=big", "application/octet-stream"),
]


@pytest.mark.parametrize("method,path,ctype", ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize("auth", [None, "Bearer efa_not-a-token", "Basic YWRtaW46YWRtaW4="])
def test_no_or_bad_token_is_401_before_the_body_is_read(cloud, method, path, ctype, auth):
    headers = {"Content-Type": ctype} | ({"Authorization": auth} if auth else {})
    x = exchange(cloud.base_url, method, path, headers)
    assert_refused_unread(x, 401, "unauthorized")
    assert x.headers.get("www-authenticate") == "Bearer"


def test_a_token_of_the_wrong_kind_is_403_before_the_body_is_read(cloud):
    enroll_token = cloud.client().post("/api/v1/enrollment-tokens", json={}).json()["token"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {enroll_token}"}
    x = exchange(cloud.base_url, "POST", "/api/v1/deployments", headers)
    assert_refused_unread(x, 403, "forbidden")
    form = headers | {"Content-Type": "multipart/form-data; boundary=x"}
    x = exchange(cloud.base_url, "POST", "/api/v1/distill", form)
    assert_refused_unread(x, 403, "forbidden")


def test_three_bodies_without_a_token_at_once_cost_no_memory(cloud):
    """The attack as found: three 256 MiB bodies in parallel. The cloud runs in this process: its RSS must not
    grow by anything like one body while they are refused (before limits.py it grew by several times that)."""
    rss = [_rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss.append(_rss_bytes())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[Exchange] = []
    threads = [threading.Thread(target=lambda: results.append(exchange(
        cloud.base_url, "POST", "/api/v1/deployments", {"Content-Type": "application/json"}, chunked=True)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ANSWER_TIMEOUT_S * 2)
    done.set()
    sampler.join(5)
    assert max(rss) - rss[0] < 64 * 1024 * 1024, f"RSS grew by {(max(rss) - rss[0]) / 2**20:.0f} MiB"
    assert len(results) == 3
    for x in results:
        assert_refused_unread(x, 401, "unauthorized")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def admin_headers(cloud, ctype: str) -> dict[str, str]:
    return {"Content-Type": ctype, "Authorization": f"Bearer {cloud.admin_token}"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_json_body_over_max_json_body_kb_is_413_and_read_no_further(cloud, chunked):
    x = exchange(cloud.base_url, "POST", "/api/v1/deployments", admin_headers(cloud, "application/json"),
                 chunked=chunked)
    assert_refused_unread(x, 413, "too_large")
    assert "max_json_body_kb" in x.body["message"] and "512 KiB" in x.body["message"]
    assert x.body["detail"]["limit_bytes"] == 512 * 1024


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_distillation_form_is_capped_while_it_streams(cloud, chunked):
    x = exchange(cloud.base_url, "POST", "/api/v1/distill",
                 admin_headers(cloud, "multipart/form-data; boundary=xyz"), chunked=chunked)
    assert_refused_unread(x, 413, "too_large")
    assert "max_model_mb + 2 x max_transfer_mb" in x.body["message"]  # the transfer set and an optional test set
    assert x.body["detail"]["limit_bytes"] == 4 * 1024 * 1024


def test_a_chunked_model_upload_stops_at_max_model_mb(cloud):
    x = exchange(cloud.base_url, "POST", "/api/v1/models?name=big", admin_headers(cloud, "application/octet-stream"),
                 chunked=True)
    assert_refused_unread(x, 413, "too_large")
    assert "max_model_mb" in x.body["message"]


def test_bodies_within_the_caps_still_work(cloud):
    with cloud.client() as admin:
        r = admin.post("/api/v1/models", params={"name": "fits"}, content=tiny_onnx())
        assert r.status_code == 201, r.text
        # A reported state of nearly MAX_MESSAGE_BYTES is under the JSON cap: it is the route that answers.
        r = admin.post("/api/v1/deployments", json={"model": "fits", "device_class": "rpi4", "pad": "x" * 250_000})
        assert r.status_code == 422 and "pad" in r.json()["message"], r.text
        # Two requests on one kept-alive connection: the cap is per request.
        assert admin.get("/api/v1/models").status_code == 200


# -- integer and text ranges: a value the database cannot hold is a 422 naming the field --------------------------


@pytest.fixture
def db_cloud(tmp_path, db_url):
    server = start_cloud_server(tmp_path / "cloud", db_url=db_url)
    try:
        yield server
    finally:
        server.stop()


def field_error(r: httpx.Response, where: str) -> None:
    assert r.status_code == 422, f"{r.status_code} {r.text}"
    body = r.json()
    assert body["error"] == "invalid" and body["message"].startswith(where), body
    assert where in {f["field"] for f in body["detail"]["fields"]}


def test_out_of_range_values_are_422_naming_the_field_on_both_databases(db_cloud):
    with db_cloud.client() as admin:
        # Path and query parameters: jobs.id is INTEGER. The largest id reaches SQL and is simply not there.
        for tail in ("", "/logs", "/report", "/plot.svg"):
            field_error(admin.get(f"/api/v1/jobs/{INT32_MAX + 1}{tail}"), "path.job_id")
            assert admin.get(f"/api/v1/jobs/{INT32_MAX}{tail}").status_code == 404
        field_error(admin.post(f"/api/v1/jobs/{2**63}/cancel"), "path.job_id")
        assert admin.post(f"/api/v1/jobs/{INT32_MAX}/cancel").status_code == 404
        field_error(admin.get("/api/v1/jobs/0"), "path.job_id")
        field_error(admin.get("/api/v1/jobs/1/logs", params={"since": INT32_MAX + 1}), "query.since")
        assert admin.get("/api/v1/jobs/1/logs", params={"since": INT32_MAX}).status_code == 404

        # Body fields: model_versions.version is INTEGER; the largest version reaches SQL and is not there.
        assert admin.post("/api/v1/models", params={"name": "m"}, content=tiny_onnx()).status_code == 201
        deploy = {"model": "m", "device_class": "rpi4"}
        field_error(admin.post("/api/v1/deployments", json=deploy | {"version": INT32_MAX + 1}), "body.version")
        field_error(admin.post("/api/v1/deployments", json=deploy | {"version": 10**30}), "body.version")
        r = admin.post("/api/v1/deployments", json=deploy | {"version": INT32_MAX})
        assert r.status_code == 404 and "no version" in r.json()["message"], r.text
        field_error(admin.post("/api/v1/deployments", json=deploy | {"label": "k=" + "v" * 200, "device_class": None}),
                    "body.label")
        field_error(admin.post("/api/v1/deployments", json=deploy | {"model": "m" * 65}), "body.model")

        # A token's lifetime must give an expiry both databases hold (1e11 s overflowed datetime into a 500).
        field_error(admin.post("/api/v1/enrollment-tokens", json={"ttl_s": 10**11}), "body.ttl_s")
        field_error(admin.post("/api/v1/enrollment-tokens", json={"note": "n" * 201}), "body.note")
        r = admin.post("/api/v1/enrollment-tokens", json={"ttl_s": MAX_TOKEN_TTL_S, "note": "n" * 200})
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        r = admin.post("/api/v1/enroll", headers={"Authorization": f"Bearer {token}"},
                       json={"device_id": "far-future", "device_class": "rpi4"})
        assert r.status_code == 200, r.text  # the stored expiry reads back and is honoured
        assert admin.get("/api/v1/stats").status_code == 200


def test_max_json_body_kb_cannot_go_below_the_largest_message(tmp_path):
    from edgefleet.cloud.errors import Invalid
    from edgefleet.cloud.settings import Settings
    from edgefleet.protos.messages import MAX_MESSAGE_BYTES

    assert Settings(data_dir=tmp_path).max_json_body_bytes == 512 * 1024
    assert Settings(data_dir=tmp_path, max_json_body_kb=MAX_MESSAGE_BYTES // 1024).max_json_body_bytes \
        == MAX_MESSAGE_BYTES
    with pytest.raises(Invalid, match="max_json_body_kb"):
        Settings(data_dir=tmp_path, max_json_body_kb=MAX_MESSAGE_BYTES // 1024 - 1)
