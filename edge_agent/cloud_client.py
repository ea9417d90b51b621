"""HTTP to the cloud: enroll, fetch the desired state, post reports, download bundles resumably.

Every httpx exception is wrapped where it enters: network trouble and 5xx become `CloudUnavailable` (retry with
backoff), a 4xx becomes `EnrollError` or `AgentError` carrying the server's own message. Downloads stream to a
`.part` file and resume with `Range: bytes=N-` after an interruption; the caller verifies the finished file against
TUF's trusted length and hashes (this module never decides what is trusted, it only refuses to read past the trusted
length so a hostile server cannot fill the disk).

`CloudApi` is the surface the daemon uses, so a unit test can hand it an in-memory cloud instead
(`tests/edge_agent/fakes.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import httpx

from edgefleet.edge_agent.errors import (
    AgentError,
    BundleError,
    CloudUnavailable,
    EnrollError,
    EnrollmentRefused,
    MessageRefused,
)
from edgefleet.protos.messages import (
    AgentChannelInfo,
    EnrollRequest,
    EnrollResponse,
    MessageError,
    ReportedState,
    TelemetryBatch,
    parse_message,
)

CHUNK_BYTES = 256 * 1024


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return resp.text[:200] or resp.reason_phrase


def _server_code(resp: httpx.Response) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return str(body.get("error")) if isinstance(body, dict) and body.get("error") else None


class CloudApi(Protocol):
    def enroll(self, req: EnrollRequest, enrollment_token: str) -> EnrollResponse: ...

    def set_token(self, token: str) -> None: ...

    def desired_state_raw(self, url: str) -> bytes | None: ...

    def agent_channel(self) -> AgentChannelInfo: ...

    def post_reported(self, msg: ReportedState) -> None: ...

    def post_telemetry(self, msg: TelemetryBatch) -> None: ...

    def download(self, url: str, dest: Path, *, max_bytes: int) -> Path: ...

    def close(self) -> None: ...


class CloudClient:
    """A small client of the cloud's device-facing endpoints. Thread-safe (httpx.Client is)."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 15.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def set_token(self, token: str) -> None:
        self._token = token

    def _headers(self, token: str | None = None) -> dict[str, str]:
        tok = token or self._token
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def _request(self, method: str, url: str, *, token: str | None = None, **kw) -> httpx.Response:
        if not url.startswith("http"):
            url = self.base_url + url
        try:
            resp = self._http.request(method, url, headers={**self._headers(token), **kw.pop("headers", {})}, **kw)
        except httpx.HTTPError as exc:
            raise CloudUnavailable(f"cannot reach the cloud at {url}: {exc.__class__.__name__}: {exc}") from exc
        if resp.status_code >= 500:
            raise CloudUnavailable(f"cloud answered {resp.status_code} for {method} {url}: {_server_message(resp)}")
        return resp

    def enroll(self, req: EnrollRequest, enrollment_token: str) -> EnrollResponse:
        resp = self._request("POST", "/api/v1/enroll", token=enrollment_token, content=req.to_wire(),
                             headers={"Content-Type": "application/json"})
        if resp.status_code == 409 and _server_code(resp) == "enrollment_refused":
            raise EnrollmentRefused(f"enrollment refused: {_server_message(resp)}")
        if resp.status_code != 200:
            # What to fix on this device, by what the cloud refused (the daemon logs it and retries slowly).
            if _server_code(resp) == "unknown_class":
                fix = "fix device_class in the agent config (to a class the cloud names), or ask the operator to add it"
            elif resp.status_code in (401, 403):
                fix = "fix enrollment_token in the agent config (the operator makes one with `fleet tokens create`)"
            else:
                fix = "fix what the cloud names in the agent config"
            raise EnrollError(f"enrollment refused ({resp.status_code}): {_server_message(resp)}; {fix}")
        try:
            return parse_message(resp.content, EnrollResponse)
        except MessageError as exc:
            raise EnrollError(f"the cloud's enrollment answer is not understood: {exc}") from None

    def desired_state_raw(self, url: str) -> bytes | None:
        """The signed desired-state document as bytes (verified by the caller), or None when none exists yet."""
        resp = self._request("GET", url)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise AgentError(f"fetching the desired state failed ({resp.status_code}): {_server_message(resp)}")
        return resp.content

    def agent_channel(self) -> AgentChannelInfo:
        """Where this cloud's gRPC agent channel is (`GET /api/v1/agent-channel`), for transport = "grpc" with no
        `[grpc] target`. AgentError when the cloud runs none."""
        resp = self._request("GET", "/api/v1/agent-channel")
        if resp.status_code != 200:
            raise AgentError(f"the cloud names no gRPC agent channel ({resp.status_code}): {_server_message(resp)}; "
                             "set [grpc] target in the agent config, or transport = \"mqtt\"")
        try:
            return parse_message(resp.content, AgentChannelInfo)
        except MessageError as exc:
            raise AgentError(f"the cloud's agent channel answer is not understood: {exc}") from None

    def post_reported(self, msg: ReportedState) -> None:
        self._post_json(f"/api/v1/devices/{msg.device_id}/reported", msg.to_wire())

    def post_telemetry(self, msg: TelemetryBatch) -> None:
        self._post_json(f"/api/v1/devices/{msg.device_id}/telemetry", msg.to_wire())

    def _post_json(self, path: str, body: bytes) -> None:
        resp = self._request("POST", path, content=body, headers={"Content-Type": "application/json"})
        if resp.status_code == 422:
            raise MessageRefused(f"POST {path} refused for good (422): {_server_message(resp)}")
        if resp.status_code >= 300:
            raise AgentError(f"POST {path} refused ({resp.status_code}): {_server_message(resp)}")

    def download(self, url: str, dest: Path, *, max_bytes: int) -> Path:
        """Stream `url` into `dest`, resuming a `dest.part` left by an earlier try. Returns `dest`.

        Reads at most `max_bytes` (the trusted length): a longer body is refused, not stored.
        """
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > max_bytes:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and have == max_bytes:
            os.replace(part, dest)
            return dest
        url = url if url.startswith("http") else self.base_url + url
        try:
            with self._http.stream("GET", url, headers={**self._headers(), **headers}) as resp:
                if resp.status_code >= 500:
                    raise CloudUnavailable(f"download of {url} failed: the cloud answered {resp.status_code}")
                if resp.status_code == 416 and have:
                    part.unlink(missing_ok=True)  # our partial file is longer than the target: start over
                    raise CloudUnavailable(f"download of {url}: partial file did not match; restarting")
                if resp.status_code == 404:
                    raise BundleError(f"bundle {url} does not exist on the cloud (404)")
                if resp.status_code not in (200, 206):
                    raise AgentError(f"download of {url} refused ({resp.status_code}): {resp.reason_phrase}")
                mode = "ab" if resp.status_code == 206 else "wb"
                written = have if resp.status_code == 206 else 0
                with open(part, mode) as fh:
                    for chunk in resp.iter_bytes(CHUNK_BYTES):
                        written += len(chunk)
                        if written > max_bytes:
                            fh.close()
                            part.unlink(missing_ok=True)
                            raise BundleError(f"download of {url} exceeds the trusted length of {max_bytes} bytes")
                        fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
        except httpx.HTTPError as exc:
            raise CloudUnavailable(f"download of {url} interrupted: {exc.__class__.__name__}: {exc}") from exc
        os.replace(part, dest)
        return dest
