"""The `fleet` CLI through typer's CliRunner: against a real cloud (tests/cloud_server.py) for the happy paths and
the refusals the cloud makes, and against a closed port and a tiny real HTTP server for the error mapping that
no healthy cloud produces (5xx, non-JSON answers, wrong shapes).

Every error must be ONE line on stderr with the documented exit code: 2 usage/config/refused, 3 unreachable,
4 not authorised, 5 the cloud failed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.fleet.cli_runner import IsolatedCli as Cli
from tests.harness import http_server


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def closed_port() -> int:
    """A port nothing listens on: bound then closed, so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# A tiny real HTTP server that answers what a broken or foreign server would


class _Scripted(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], tuple[int, str, bytes]] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        key = (self.command, self.path.split("?")[0])
        auth = self.headers.get("Authorization", "")
        if auth != "Bearer good":
            status, ctype, body = 401, "application/json", json.dumps(
                {"error": "unauthorized", "message": "the token is unknown or expired"}).encode()
        else:
            status, ctype, body = self.routes.get(key, (404, "application/json", json.dumps(
                {"error": "not_found", "message": f"no route {key[1]}"}).encode()))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's method names

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    _Scripted.routes = {
        ("GET", "/api/v1/stats"): (200, "application/json", b'{"counters": {"malformed_messages": 3}}'),
        ("GET", "/api/v1/models"): (500, "text/plain", b"Internal Server Error\ntraceback..."),
        ("GET", "/api/v1/devices"): (200, "text/html", b"<html>not an edgefleet cloud</html>"),
        ("GET", "/api/v1/status"): (200, "application/json", b'[{"device_id": "d1"}]'),
        ("GET", "/api/v1/classes"): (200, "application/json", json.dumps({"classes": [{
            "name": "tiny", "cores": 1, "memory_mb": 64, "runtimes": ["onnxruntime"], "idle_watts": 0.1,
            "active_watts": 0.5}]}).encode()),
        ("POST", "/api/v1/models"): (413, "application/json", json.dumps(
            {"error": "too_large", "message": "the model is larger than the 1 MB limit\n(Content-Length 2)"}).encode()),
    }
    with http_server(_Scripted) as url:
        yield url


def test_unreachable_cloud_is_one_line_exit_3(cli):
    url = f"http://127.0.0.1:{closed_port()}"
    err = cli.fails(3, "--url", url, "--token", "t", "devices", "list")
    assert err.startswith(f"error: cannot reach the cloud at {url}: is `edgefleet-cloud serve` running?")
    assert "Connect" in err


def test_env_configures_and_option_overrides_env(cli, scripted):
    dead = f"http://127.0.0.1:{closed_port()}"
    out = cli.ok("stats", "--json", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")
    assert json.loads(out.stdout)["counters"] == {"malformed_messages": 3}
    cli.fails(3, "--url", dead, "stats", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")
    cli.fails(4, "--token", "bad", "stats", EDGEFLEET_URL=scripted, EDGEFLEET_TOKEN="good")


def test_wrong_token_is_exit_4_with_the_servers_message_and_a_hint(cli, scripted):
    err = cli.fails(4, "--url", scripted, "--token", "bad", "stats")
    assert "the token is unknown or expired" in err and "fleet login" in err


def test_server_failure_and_foreign_answers_are_exit_5(cli, scripted):
    err = cli.fails(5, "--url", scripted, "--token", "good", "models", "list")
    assert "Internal Server Error" in err and "traceback" not in err
    err = cli.fails(5, "--url", scripted, "--token", "good", "devices", "list")
    assert "is the URL an edgefleet cloud" in err
    cli.fails(5, "--url", scripted, "--token", "good", "status")


@pytest.fixture
def plain_http(tmp_path) -> Iterator[str]:
    """`python -m http.server`: a real web server that is not the cloud (HTML 404s, a directory listing at /)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html>hello</html>")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    with http_server(partial(Quiet, directory=str(tmp_path / "site"))) as url:
        yield url


@pytest.fixture
def foreign_api() -> Iterator[str]:
    """Another JSON API (FastAPI, not edgefleet): its 404s are `{"detail": "Not Found"}`."""
    from fastapi import FastAPI

    from tests.cloud_server import serve_app

    other = FastAPI()

    @other.get("/hello")
    def hello() -> dict:
        return {"hello": "world"}

    server = serve_app(other)
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.mark.parametrize("server", ["plain_http", "foreign_api"])
@pytest.mark.parametrize("args", [("devices", "list"), ("stats",), ("deploy", "m", "--class", "rpi4"),
                                  ("models", "pull", "m", "--version", "1", "-o", "m.onnx")])
def test_a_url_that_is_not_the_cloud_is_exit_5_in_one_line(cli, request, server, args):
    url = request.getfixturevalue(server)
    err = cli.fails(5, "--url", url, "--token", "t", *args)
    # http.server answers a POST 501 (no such method), everything else 404; neither is an edgefleet ErrorBody.
    assert "not an edgefleet" in err and "--url" in err and ("404" in err or "501" in err)
    assert "{" not in err and "<html" not in err.lower()  # none of the server's raw body


def test_login_to_something_that_is_not_the_cloud_is_exit_5(cli, plain_http):
    err = cli.fails(5, "login", "--url", plain_http, "--token", "t")
    assert "is it the cloud's URL?" in err
    assert not cli.config_file.exists()


def test_refusal_message_is_the_servers_on_one_line_exit_2(cli, scripted, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"xx")
    err = cli.fails(2, "--url", scripted, "--token", "good", "models", "push", str(model), "--name", "m")
    assert err == "error: the model is larger than the 1 MB limit (Content-Length 2)"
    err = cli.fails(2, "--url", scripted, "--token", "good", "devices", "show", "nope")
    assert "no route /api/v1/devices/nope" in err


def test_classes_accepts_the_wrapped_view_too(cli, scripted):
    out = cli.ok("--url", scripted, "--token", "good", "classes", "list", "--json")
    assert [c["name"] for c in json.loads(out.stdout)] == ["tiny"]


def test_login_verifies_then_writes_0600(cli, scripted):
    cli.fails(4, "login", "--url", scripted, "--token", "bad")
    assert not cli.config_file.exists()
    out = cli.ok("login", "--url", scripted, "--token", "good")
    assert str(cli.config_file) in out.stdout
    assert cli.config_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(cli.ok("stats", "--json").stdout)["counters"]["malformed_messages"] == 3


def test_login_to_a_dead_cloud_suggests_no_verify(cli):
    url = f"http://127.0.0.1:{closed_port()}"
    err = cli.fails(3, "login", "--url", url, "--token", "t")
    assert "--no-verify" in err
    cli.ok("login", "--url", url, "--token", "t", "--no-verify")
    assert cli.config_file.exists()


def test_no_config_at_all_is_exit_2(cli):
    err = cli.fails(2, "devices", "list")
    assert "no cloud URL configured" in err and "fleet login" in err
    err = cli.fails(2, "devices", "list", EDGEFLEET_URL="http://127.0.0.1:9")
    assert "no token configured" in err


def test_bad_config_file_is_exit_2_naming_the_file(cli):
    cli.config_file.parent.mkdir(parents=True)
    cli.config_file.write_text('url = "http://a:1"\ntoken = [1, 2]\n')
    err = cli.fails(2, "status")
    assert str(cli.config_file) in err and "'token'" in err
    cli.config_file.write_text("url = = =")
    assert "not valid TOML" in cli.fails(2, "status")


def test_bad_url_option_is_exit_2(cli):
    assert "must look like http" in cli.fails(2, "--url", "cloud:8080", "--token", "t", "status")


def test_deploy_needs_exactly_one_target(cli):
    base = ("--url", f"http://127.0.0.1:{closed_port()}", "--token", "t", "deploy", "digits")
    for extra in ((), ("--device", "d1", "--class", "rpi4"), ("--class", "rpi4", "--label", "a=b")):
        result = cli(*base, *extra)
        assert result.exit_code == 2, result.stderr
        assert "exactly one target" in result.stderr
    result = cli(*base, "--label", "nolabel")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_push_nonexistent_file_is_a_usage_error(cli, tmp_path):
    result = cli("--url", "http://127.0.0.1:9", "--token", "t", "models", "push", str(tmp_path / "nope.onnx"),
                 "--name", "x")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_tokens_ttl_is_checked(cli):
    result = cli("--url", "http://127.0.0.1:9", "--token", "t", "tokens", "create", "--ttl", "soon")
    assert result.exit_code == 2 and "--ttl" in result.stderr


@pytest.mark.parametrize("args", [
    (), ("login",), ("devices",), ("devices", "list"), ("devices", "show"), ("classes", "list"), ("models",),
    ("models", "push"), ("models", "list"), ("deploy",), ("deployments", "list"), ("status",), ("stats",),
    ("tokens", "create"), ("tokens", "list"), ("tokens", "revoke"), ("tokens", "expire"), ("devices", "reset"),
])
def test_every_command_has_help_with_examples(cli, args):
    out = cli.ok(*args, "--help").stdout
    assert "Usage:" in out
    if args and args[-1] not in ("devices", "models"):
        assert "Examples:" in out and "$ fleet" in out or "TOKEN=$(fleet" in out
