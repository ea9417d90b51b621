"""The CLI's exception hierarchy. The client raises these; the CLI's main turns each into one line and an exit code.

    FleetError (exit 1)
    ├── ConfigError (exit 2)          no URL/token, unreadable or malformed cli.toml, bad EDGEFLEET_URL
    ├── CloudUnreachable (exit 3)     connection refused, DNS, timeout, TLS: httpx transport errors
    ├── AuthError (exit 4)            401/403: the server's message plus a hint to run `fleet login`
    ├── Rejected (exit 2)             400/404/409/413/422: the server's `ErrorBody.message`, as given
    ├── Unverified (exit 2)           provenance that does not verify: bad signature, wrong key, digest mismatch
    └── ServerError (exit 5)          5xx, or an answer that is not the `protos.api` view we expected

httpx exceptions are wrapped in `client.py`, where they enter our code (like httpx's own
`map_httpcore_exceptions`); nothing above the client sees an httpx type. Every message says what to do next.
"""

from __future__ import annotations


class FleetError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        # One line, always: a server message with newlines would break `2>` logs and the one-line contract.
        message = " ".join(str(message).split())
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code  # the server's machine-readable ErrorBody.error, when there was one


class ConfigError(FleetError):
    exit_code = 2


class CloudUnreachable(FleetError):
    exit_code = 3


class AuthError(FleetError):
    exit_code = 4


class Rejected(FleetError):
    exit_code = 2


class Unverified(FleetError):
    exit_code = 2


class ServerError(FleetError):
    exit_code = 5


__all__ = ["AuthError", "CloudUnreachable", "ConfigError", "FleetError", "Rejected", "ServerError", "Unverified"]
