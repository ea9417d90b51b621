"""Schemathesis against the REST API: the real app under uvicorn on a real port, with each of the three tokens.

Theory: the OpenAPI schema is the contract a client codes against, so every answer must be in it. Schemathesis
generates requests from that schema (valid ones, and ones that break it on purpose), sends them over a socket to the
cloud that `start_cloud_server` runs, and checks each answer (`CHECKS`): never a 5xx, only documented status codes,
content types and headers, a body that fits the documented schema, and every 4xx an `ErrorBody` whose message a
person can act on.

Each role (admin, enrollment, device token) fuzzes a cloud of its own, seeded with one enrolled device, one model
deployed to it and a report and a telemetry batch from it, so that the lists the admin reads are not empty. A cloud
per role also keeps one role's run from spoiling another's: the admin's cases revoke tokens and reset devices by id.
Half of the cases (chosen by a hash of the case, so a run repeats exactly) aim their path parameters and body at
what the seed made (the device, its class, the model, the bundle, a metadata file): that reaches the answers past
"not found".

A role gets every phase (examples; coverage: deterministic boundary values, missing and wrong-typed fields,
unexpected methods; fuzzing: `MAX_EXAMPLES` generated cases, valid and invalid) on the operations it may use
(`OWNED`), and `DOOR_EXAMPLES` fuzzed cases on the others, which it may only be turned away from (401/403 before
the body is read, see cloud/api/limits.py): the same bodies fuzzed behind a 403 test nothing more.
`test_every_operation_is_owned` keeps a new route from being fuzzed only at the door. The admin's cases run twice,
on SQLite and on PostgreSQL (32-bit INTEGER, String(n) held by the database); the other roles on SQLite.

Cost, measured on the 2-core machine: about 2,100 requests, 50 s for the module (admin 15 s, admin on PostgreSQL
13 s, device 7 s, enrollment 5 s, the rest startup and collection). The knobs are MAX_EXAMPLES and DOOR_EXAMPLES.

The schema is built at collection (`create_app(...).openapi()`, no server needed) and `test_served_schema_is_fuzzed`
checks that the running cloud serves that same schema. The run is seeded and deterministic (`seed`, and
`generation.deterministic`: Hypothesis derandomized, no example database). The stateful phase (links between
operations) is off: the schema declares no links. Nothing is excluded: the multipart distillation upload is fuzzed
like the rest (its files and spec are generated from the form's schema; the route refuses what is not a teacher,
a transfer set and a spec before anything is queued, and no worker runs here).
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgefleet.cloud.api import create_app
from edgefleet.protos.api import ErrorBody
from edgefleet.protos.messages import ReportedState, TelemetryBatch
from tests.cloud_server import enroll_device, start_cloud_server, tiny_onnx
from tests.harness import PostgresDatabase

SEED = 20250107
MAX_EXAMPLES = 6  # fuzzing-phase cases per owned operation, on top of the examples and coverage phases
DOOR_EXAMPLES = 2  # fuzzing-phase cases per operation a role may not use (and no coverage phase there)
ROLES = ("admin", "enroll", "device")
DEVICE_ID = "fuzz-dev"
DEVICE_CLASS = "rpi4"
MODEL = "digits"
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)

# The operations each role may use. The admin's are all but the device's own reports and enrolling; the public
# ones (/healthz, TUF metadata) are fuzzed in full once, with the admin token.
_DEVICE_ONLY = {"POST /api/v1/devices/{device_id}/reported", "POST /api/v1/devices/{device_id}/telemetry"}
_ENROLL_ONLY = {"POST /api/v1/enroll"}
_APP_SCHEMA: dict[str, Any] = create_app(None).openapi()  # type: ignore[arg-type]  # the Fleet is for the routes
ALL_OPERATIONS = {f"{method.upper()} {path}" for path, item in _APP_SCHEMA["paths"].items() for method in item}
OWNED = {
    "admin": ALL_OPERATIONS - _DEVICE_ONLY - _ENROLL_ONLY,
    "enroll": _ENROLL_ONLY,
    "device": _DEVICE_ONLY | {"GET /api/v1/devices/{device_id}/desired", "GET /tuf/targets/{target_path}"},
}


def _schema(role: str) -> schemathesis.BaseSchema:
    door = sorted(ALL_OPERATIONS - OWNED[role])
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
        # Unexpected methods: two per operation show the 405 is an ErrorBody; all seven cost a fifth of the run.
        "phases": {"stateful": {"enabled": False}, "coverage": {"unexpected-methods": ["PUT", "DELETE"]}},
        "operations": [{"include-name": door, "phases": {"coverage": {"enabled": False}},
                        "generation": {"max-examples": DOOR_EXAMPLES}}] if door else [],
    })
    return schemathesis.openapi.from_dict(_APP_SCHEMA, config=config)


SCHEMAS = {role: _schema(role) for role in ROLES}
# (role, operation) -> statuses answered, for test_every_role_got_past_the_door.
SEEN: dict[tuple[str, str], Counter[int]] = {}


def error_body_check(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx is an ErrorBody with a code and a message (what to do next), and never a stack trace."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = ErrorBody.model_validate_json(response.content)
    except ValueError as exc:
        raise AssertionError(f"{response.status_code} is not an ErrorBody: {response.text[:200]!r} ({exc})") from None
    assert body.error.strip(), f"{response.status_code} ErrorBody without an error code: {response.text[:200]!r}"
    assert body.message.strip(), f"{response.status_code} ErrorBody without a message: {response.text[:200]!r}"
    assert "Traceback" not in response.text, response.text[:500]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, error_body_check]


class FuzzCloud:
    """One role's cloud, seeded, its token, and what its cases may aim at."""

    def __init__(self, data_dir: Any, role: str, db_url: str | None = None) -> None:
        self.role = role
        self.label = role if db_url is None else f"{role} on PostgreSQL"  # for SEEN
        self.server = start_cloud_server(data_dir, db_url=db_url)
        self.session = requests.Session()  # one connection where the server keeps it open
        admin = self.server.client()
        mine = None
        try:
            device = enroll_device(admin, DEVICE_ID, DEVICE_CLASS)
            mine = self.server.client(token=device.device_token)
            r = admin.post("/api/v1/models", params={"name": MODEL}, content=tiny_onnx(),
                           headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            r = admin.post("/api/v1/deployments", json={"model": MODEL, "device_id": DEVICE_ID})
            assert r.status_code == 201, r.text
            self.bundle_path = r.json()["bundles"][0]["target_path"]
            generation = mine.get(f"/api/v1/devices/{DEVICE_ID}/desired").json()["payload"]["generation"]
            for channel, msg in (("reported", ReportedState(device_id=DEVICE_ID, generation=generation,
                                                            reported_at=NOW)),
                                 ("telemetry", TelemetryBatch(device_id=DEVICE_ID, seq=1, sent_at=NOW))):
                r = mine.post(f"/api/v1/devices/{DEVICE_ID}/{channel}", content=msg.to_wire(),
                              headers={"Content-Type": "application/json"})
                assert r.status_code == 204, r.text
            r = admin.post("/api/v1/enrollment-tokens", json={"note": "fuzz"})
            assert r.status_code == 201, r.text
            self.token = {"admin": self.server.admin_token, "enroll": r.json()["token"],
                          "device": device.device_token}[role]
        except BaseException:
            self.stop()
            raise
        finally:
            admin.close()
            if mine is not None:
                mine.close()

    def aim(self, case: schemathesis.Case) -> None:
        """For half the cases, path parameters and body fields that name what the seed made."""
        params = case.path_parameters or {}
        body = case.body if isinstance(case.body, dict) else {}
        key = json.dumps([case.operation.label, params, body], sort_keys=True, default=repr).encode()
        if zlib.crc32(key) % 2:
            return
        name = ("timestamp.json" if case.path.startswith("/tuf/") else
                DEVICE_CLASS if case.path.startswith("/api/v1/classes/") else MODEL)
        known: dict[str, Any] = {"device_id": DEVICE_ID, "version": 1, "target_path": self.bundle_path, "name": name}
        for field in params.keys() & known.keys():
            params[field] = known[field]
        # A body's device_id follows the path's (reports); an enrollment's is a new device, named from the key.
        fields: dict[str, Any] = {"device_class": DEVICE_CLASS, "model": MODEL, "schema_version": 1,
                                  "device_id": DEVICE_ID if params else f"fuzz-{zlib.crc32(key):08x}"}
        for field, value in fields.items():
            if field in body and type(body[field]) is type(value):
                body[field] = value

    def stop(self) -> None:
        self.session.close()
        self.server.stop()


def _fuzz(case: schemathesis.Case, cloud: FuzzCloud) -> None:
    cloud.aim(case)
    headers = {"Authorization": f"Bearer {cloud.token}"}
    response = case.call(base_url=cloud.server.base_url, session=cloud.session, headers=headers, timeout=30)
    SEEN.setdefault((cloud.label, case.operation.label), Counter())[response.status_code] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)


def _cloud(role: str):
    @pytest.fixture(scope="module", name=f"{role}_cloud")
    def fixture(tmp_path_factory: pytest.TempPathFactory):
        cloud = FuzzCloud(tmp_path_factory.mktemp(f"fuzz-{role}"), role)
        try:
            yield cloud
        finally:
            cloud.stop()

    return fixture


admin_cloud = _cloud("admin")
enroll_cloud = _cloud("enroll")
device_cloud = _cloud("device")


@pytest.fixture(scope="module")
def admin_pg_cloud(tmp_path_factory: pytest.TempPathFactory):
    db = PostgresDatabase().create()
    try:
        cloud = FuzzCloud(tmp_path_factory.mktemp("fuzz-admin-pg"), "admin", db.url)
        try:
            yield cloud
        finally:
            cloud.stop()
    finally:
        db.drop()


@SCHEMAS["admin"].parametrize()
def test_admin_token(case: schemathesis.Case, admin_cloud: FuzzCloud) -> None:
    _fuzz(case, admin_cloud)


@SCHEMAS["admin"].parametrize()
def test_admin_token_on_postgresql(case: schemathesis.Case, admin_pg_cloud: FuzzCloud) -> None:
    """The same cases on PostgreSQL, where INTEGER is 32-bit and String(n) is held to n by the database."""
    _fuzz(case, admin_pg_cloud)


@SCHEMAS["enroll"].parametrize()
def test_enrollment_token(case: schemathesis.Case, enroll_cloud: FuzzCloud) -> None:
    _fuzz(case, enroll_cloud)


@SCHEMAS["device"].parametrize()
def test_device_token(case: schemathesis.Case, device_cloud: FuzzCloud) -> None:
    _fuzz(case, device_cloud)


def test_every_operation_is_owned():
    """Every operation is fuzzed in full by some role; a new route is not left to the door-only cases."""
    assert set().union(*OWNED.values()) == ALL_OPERATIONS
    assert all(OWNED[role] <= ALL_OPERATIONS for role in ROLES), "OWNED names an operation the schema lacks"


def test_served_schema_is_fuzzed(tmp_path):
    """The cloud that `edgefleet-cloud serve` runs serves the schema fuzzed above."""
    server = start_cloud_server(tmp_path / "cloud")
    try:
        served = server.client(token="").get("/openapi.json")
        assert served.status_code == 200
        assert served.json() == _APP_SCHEMA
    finally:
        server.stop()


_ROLE_TESTS = ("test_admin_token", "test_enrollment_token", "test_device_token")  # one per role of ROLES


@pytest.fixture(scope="module", autouse=True)
def every_role_got_past_the_door(request):
    """After the module's tests: the fuzzing reached the routes, each role with 2xx answers where it may act, not
    only 401s and 403s. Checked whenever the three role tests were selected (a teardown error if not), so a run of
    one of them alone (`-k device`) checks nothing rather than skipping a test."""
    yield
    selected = {getattr(item, "originalname", item.name) for item in request.session.items
                if item.module is request.module}
    if set(_ROLE_TESTS) <= selected:
        check_every_role_got_past_the_door()


def check_every_role_got_past_the_door() -> None:
    assert {role for role, _ in SEEN} >= set(ROLES), f"roles fuzzed: {sorted({role for role, _ in SEEN})}"
    ok = {role: {op for (r, op), seen in SEEN.items() if r == role and any(200 <= s < 300 for s in seen)}
          for role in ROLES}
    assert {"GET /api/v1/devices", "GET /api/v1/devices/{device_id}", "GET /api/v1/status",
            "POST /api/v1/enrollment-tokens", "GET /tuf/targets/{target_path}"} <= ok["admin"], ok["admin"]
    # The generated enrollments are refused one field or another short of valid (422, each with its field named):
    # the fuzz reaches the route and its validation, and a successful enrollment is tests/cloud/test_api.py's job.
    assert sum(SEEN[("enroll", "POST /api/v1/enroll")].values()) >= MAX_EXAMPLES // 2
    assert ok["device"] >= {"GET /api/v1/devices/{device_id}/desired", "POST /api/v1/devices/{device_id}/reported",
                            "GET /tuf/targets/{target_path}"}, ok["device"]
    total = sum(sum(seen.values()) for seen in SEEN.values())
    print(f"fuzzed {total} requests over {len(SEEN)} (role, operation) pairs")
