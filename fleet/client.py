"""`FleetClient`: a method per REST endpoint of the cloud (`/api/v1`, docs/internals.md), returning `protos.api` views.

Theory: the client is the only place where httpx meets the CLI. Transport failures become `CloudUnreachable`, an
`ErrorBody` answer becomes `AuthError` (401/403), `Rejected` (4xx) or `ServerError` (5xx) carrying the server's own
message, and a 2xx body that does not parse as the expected view becomes `ServerError` (usually a URL that points at
something other than an edgefleet cloud, or a CLI and cloud of different versions). The cloud answers every error
as an `ErrorBody`, so a 4xx without one (a plain web server's HTML 404, another API's JSON) is not the cloud: that is
`ServerError` too, saying to check the URL; only 401/403 (a token problem whoever says it) and 413 (a proxy's body
limit in front of the cloud) keep their own meaning. Callers never see httpx types.

Uploads stream the file in chunks with an explicit Content-Length (so the server can refuse an oversized model
before reading it) and report progress through a callback; the CLI draws the bar. Downloads stream into a temp
file next to the destination, are checked against the sha256 the cloud sent, and only then take its name.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from edgefleet.common.fsutil import staged_file
from edgefleet.fleet.config import DEFAULT_TIMEOUT_S, LOGIN_HINT
from edgefleet.fleet.errors import AuthError, CloudUnreachable, FleetError, Rejected, ServerError
from edgefleet.protos.api import (
    ClassesView,
    DeploymentView,
    DeployRequest,
    DeviceClassInfo,
    DeviceStatusRow,
    DeviceView,
    EnrollmentTokenRequest,
    EnrollmentTokenView,
    ErrorBody,
    ModelEfficiencyView,
    ModelVersionView,
    StatsView,
    TokenExpiryRequest,
    TokenView,
)
from edgefleet.protos.distill import DistillReport
from edgefleet.protos.jobs import ClassDetailView, DistillSubmit, JobLogView, JobView, RefitView
from edgefleet.protos.provenance import BundleProvenanceView, ProvenanceKeysView

T = TypeVar("T")
API = "/api/v1"
UPLOAD_CHUNK_BYTES = 256 * 1024
Progress = Callable[[int, int], None]  # (bytes sent or received, total bytes)
SHA256_HEADER = "X-Edgefleet-Sha256"


@dataclass(frozen=True)
class PulledModel:
    """A model file `pull_model` wrote: where, how big, its (checked) sha256, and the name the cloud gave it."""

    path: Path
    size_bytes: int
    sha256: str
    filename: str


class FleetClient:
    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "edgefleet-fleet-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._mapped():
            response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @contextmanager
    def _streamed(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives (`iter_bytes`); an error status is raised like `_request`'s."""
        with self._mapped(), self._http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                raise self._error(response)
            yield response

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """httpx's exceptions, raised inside the block, as ours (the one place they are mapped)."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise CloudUnreachable(
                f"the cloud at {self.url} did not answer in time ({type(exc).__name__}): is it overloaded, or "
                "is the URL right? (raise timeout_s in cli.toml or EDGEFLEET_TIMEOUT_S for big uploads)"
            ) from None
        except httpx.TransportError as exc:
            raise CloudUnreachable(
                f"cannot reach the cloud at {self.url}: is `edgefleet-cloud serve` running? "
                f"({type(exc).__name__}: {exc or 'no detail'})"
            ) from None
        except httpx.InvalidURL as exc:
            raise CloudUnreachable(f"cannot reach the cloud at {self.url}: invalid URL ({exc})") from None
        except httpx.HTTPError as exc:  # decoding, redirects: the server spoke, but not sensibly
            raise ServerError(f"the cloud at {self.url} answered badly ({type(exc).__name__}: {exc})") from None

    def _error(self, response: httpx.Response) -> FleetError:
        status = response.status_code
        where = f"{response.request.method} {response.request.url.path}"
        try:
            body = ErrorBody.model_validate_json(response.content)
            message, code = body.message, body.error
        except ValidationError:
            text = response.text.strip().splitlines()
            message, code = (text[0][:200] if text else response.reason_phrase or "no message"), None
            if status not in (401, 403, 413):  # those keep their meaning whoever says them (see the docstring)
                kind = response.headers.get("content-type", "no content type").split(";")[0]
                said = f"{self.url} answered {status} {response.reason_phrase} ({kind}) to {where}, not an edgefleet"
                if status >= 500:  # a proxy in front of a cloud that is down says this too
                    return ServerError(f"{said} answer: if a proxy fronts the cloud, see its log and the cloud's; "
                                       "else check --url and EDGEFLEET_URL", status_code=status)
                return ServerError(f"{said} error: is it the cloud's URL? Check --url and EDGEFLEET_URL, or "
                                   f"{LOGIN_HINT} again", status_code=status)
        if status in (401, 403):
            return AuthError(f"{message} ({status} from {where}): {LOGIN_HINT} with an admin token",
                             status_code=status, code=code)
        if 400 <= status < 500:
            return Rejected(message, status_code=status, code=code)
        return ServerError(f"the cloud failed: {message} ({status} from {where}); see the cloud's log",
                           status_code=status, code=code)

    def _parse(self, response: httpx.Response, kind: Any) -> Any:
        try:
            return TypeAdapter(kind).validate_json(response.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise ServerError(
                f"the answer from {self.url}{response.request.url.path} is not what this CLI expects "
                f"({where}: {first.get('msg')}): is the URL an edgefleet cloud of the same version?"
            ) from None

    def _get(self, path: str, kind: type[T] | Any) -> Any:
        return self._parse(self._request("GET", path), kind)

    def _post(self, path: str, body: BaseModel, kind: Any) -> Any:
        return self._parse(self._request("POST", path, json=body.model_dump(mode="json")), kind)

    # -- endpoints -----------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._get("/healthz", dict[str, Any])

    def list_devices(self) -> list[DeviceView]:
        return self._get(f"{API}/devices", list[DeviceView])

    def get_device(self, device_id: str) -> DeviceView:
        return self._get(f"{API}/devices/{_segment(device_id)}", DeviceView)

    def list_classes(self) -> list[DeviceClassInfo]:
        # The table in docs/internals.md says a bare list; ClassesView wraps one. Accept both shapes.
        data = self._get(f"{API}/classes", list[DeviceClassInfo] | ClassesView)
        return data.classes if isinstance(data, ClassesView) else data

    def add_class(self, info: DeviceClassInfo) -> DeviceClassInfo:
        return self._post(f"{API}/classes", info, DeviceClassInfo)

    def push_model(self, name: str, source: Path | bytes, *, on_progress: Progress | None = None) -> ModelVersionView:
        if isinstance(source, (bytes, bytearray)):
            total, content = len(source), _chunks_of(bytes(source), on_progress)
        else:
            try:
                total = source.stat().st_size
            except OSError as exc:
                raise Rejected(f"cannot read {source}: {exc.strerror or exc}") from None
            content = _file_chunks(source, total, on_progress)
        response = self._request(
            "POST",
            f"{API}/models",
            params={"name": name},
            content=content,
            # An explicit length keeps httpx from chunked encoding, so the cloud can answer 413 up front.
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
        )
        return self._parse(response, ModelVersionView)

    def list_models(self) -> list[ModelVersionView]:
        return self._get(f"{API}/models", list[ModelVersionView])

    def model_versions(self, name: str) -> list[ModelVersionView]:
        return self._get(f"{API}/models/{_segment(name)}/versions", list[ModelVersionView])

    def get_model(self, name: str, version: int) -> ModelVersionView:
        return self._get(f"{API}/models/{_segment(name)}/versions/{version}", ModelVersionView)

    def pull_model(self, name: str, version: int, dest: Path | None = None, *, device_class: str | None = None,
                   on_progress: Progress | None = None) -> PulledModel:
        """Download a version's model file (or, with `device_class`, the one that class runs) to `dest` (default:
        the cloud's file name in the current folder). Written only once its sha256 is the one the cloud sent."""
        params = {"device_class": device_class} if device_class else None
        path = f"{API}/models/{_segment(name)}/versions/{version}/file"
        with self._streamed("GET", path, params=params, headers={"Accept": "application/octet-stream"}) as response:
            expected = response.headers.get(SHA256_HEADER, "").lower()
            if len(expected) != 64 or response.headers.get("content-type", "").split(";")[0] != \
                    "application/octet-stream":
                raise ServerError(f"the answer from {self.url}{path} is not a model file (no {SHA256_HEADER} "
                                  "header or not application/octet-stream): is the URL an edgefleet cloud of the "
                                  "same version?")
            filename = _attachment_name(response.headers.get("content-disposition", "")) or f"{name}-v{version}"
            target = dest if dest is not None else Path(filename)
            total = int(response.headers.get("content-length") or 0)
            digest, got = hashlib.sha256(), 0
            try:
                with staged_file(target.parent, 0o644, hint=target.name) as staged:
                    with self._mapped():
                        for chunk in response.iter_bytes(UPLOAD_CHUNK_BYTES):
                            staged.file.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                            if on_progress:
                                on_progress(got, max(total, got))
                    if digest.hexdigest() != expected:
                        raise ServerError(f"the download of {name} v{version} has sha256 {digest.hexdigest()[:12]} "
                                          f"({got} bytes), the cloud said {expected[:12]}: nothing written; try "
                                          "again")
                    staged.commit(target)
            except OSError as exc:
                raise Rejected(f"cannot write {target}: {exc.strerror or exc}") from None
        return PulledModel(path=target, size_bytes=got, sha256=expected, filename=filename)

    def deploy(self, request: DeployRequest) -> DeploymentView:
        return self._post(f"{API}/deployments", request, DeploymentView)

    def list_deployments(self) -> list[DeploymentView]:
        return self._get(f"{API}/deployments", list[DeploymentView])

    def reset_device(self, device_id: str) -> DeviceView:
        return self._parse(self._request("POST", f"{API}/devices/{quote(device_id, safe='')}/reset"), DeviceView)

    def status(self) -> list[DeviceStatusRow]:
        return self._get(f"{API}/status", list[DeviceStatusRow])

    def create_enrollment_token(self, request: EnrollmentTokenRequest) -> EnrollmentTokenView:
        return self._post(f"{API}/enrollment-tokens", request, EnrollmentTokenView)

    def list_tokens(self, kind: str | None = None) -> list[TokenView]:
        params = {"kind": kind} if kind else None
        return self._parse(self._request("GET", f"{API}/tokens", params=params), list[TokenView])

    def revoke_token(self, token_id: int) -> TokenView:
        return self._parse(self._request("DELETE", f"{API}/tokens/{token_id}"), TokenView)

    def expire_token(self, token_id: int, ttl_s: int) -> TokenView:
        body = TokenExpiryRequest(ttl_s=ttl_s).model_dump_json().encode()
        response = self._request("PATCH", f"{API}/tokens/{token_id}", content=body,
                                 headers={"Content-Type": "application/json"})
        return self._parse(response, TokenView)

    def stats(self) -> StatsView:
        return self._get(f"{API}/stats", StatsView)

    def model_efficiency(self, name: str, window_s: int | None = None) -> ModelEfficiencyView:
        """Per class: the teacher against what edgefleet ships and routes (`fleet efficiency`)."""
        params = {"window_s": window_s} if window_s else None
        return self._parse(self._request("GET", f"{API}/models/{_segment(name)}/efficiency", params=params),
                           ModelEfficiencyView)

    # -- distillation and jobs -----------------------------------------------------------------------------------

    def submit_distill(self, teacher: Path, data: Path, spec: DistillSubmit, test: Path | None = None) -> JobView:
        try:
            with contextlib.ExitStack() as stack:
                files = {"teacher": (teacher.name, stack.enter_context(teacher.open("rb")), "application/octet-stream"),
                         "data": (data.name, stack.enter_context(data.open("rb")), "application/octet-stream")}
                if test is not None:
                    files["test"] = (test.name, stack.enter_context(test.open("rb")), "application/octet-stream")
                response = self._request(
                    "POST", f"{API}/distill", data={"spec": spec.model_dump_json(exclude_none=True)}, files=files)
        except OSError as exc:
            raise Rejected(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        return self._parse(response, JobView)

    def list_jobs(self, state: str | None = None) -> list[JobView]:
        params = {"state": state} if state else None
        return self._parse(self._request("GET", f"{API}/jobs", params=params), list[JobView])

    def get_job(self, job_id: int) -> JobView:
        return self._get(f"{API}/jobs/{job_id}", JobView)

    def job_logs(self, job_id: int, since: int = 0) -> JobLogView:
        return self._parse(self._request("GET", f"{API}/jobs/{job_id}/logs", params={"since": since}), JobLogView)

    def cancel_job(self, job_id: int) -> JobView:
        return self._parse(self._request("POST", f"{API}/jobs/{job_id}/cancel"), JobView)

    def job_report(self, job_id: int) -> DistillReport:
        return self._get(f"{API}/jobs/{job_id}/report", DistillReport)

    def job_plot(self, job_id: int) -> bytes:
        return self._request("GET", f"{API}/jobs/{job_id}/plot.svg").content

    def class_detail(self, name: str) -> ClassDetailView:
        return self._get(f"{API}/classes/{_segment(name)}", ClassDetailView)

    def refit_calibration(self, name: str, *, accept: bool = False) -> RefitView:
        params = {"accept": "true"} if accept else None
        return self._parse(self._request("POST", f"{API}/classes/{_segment(name)}/refit", params=params), RefitView)

    # -- provenance ----------------------------------------------------------------------------------------------

    def provenance(self, name: str, version: int, device_class: str | None = None) -> list[BundleProvenanceView]:
        params = {"device_class": device_class} if device_class else None
        response = self._request("GET", f"{API}/models/{_segment(name)}/versions/{version}/provenance", params=params)
        return self._parse(response, list[BundleProvenanceView])

    def provenance_keys(self) -> ProvenanceKeysView:
        return self._get(f"{API}/provenance/keys", ProvenanceKeysView)

    def download_target(self, target_path: str) -> bytes:
        """A TUF target (a bundle) as the cloud serves it to devices; the caller checks its digest."""
        return self._request("GET", f"/tuf/targets/{quote(target_path, safe='/')}",
                             headers={"Accept": "application/gzip"}).content


def _segment(value: str) -> str:
    return quote(value, safe="")


def _attachment_name(disposition: str) -> str | None:
    """The file name of a `Content-Disposition: attachment; filename="..."`, reduced to a plain name (no folders)."""
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename":
            name = Path(value.strip().strip('"')).name
            return name if name not in ("", ".", "..") else None
    return None


def _chunks_of(data: bytes, on_progress: Progress | None) -> Iterator[bytes]:
    for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
        chunk = data[start:start + UPLOAD_CHUNK_BYTES]
        yield chunk
        if on_progress:
            on_progress(start + len(chunk), len(data))


def _file_chunks(path: Path, total: int, on_progress: Progress | None) -> Iterator[bytes]:
    sent = 0
    with path.open("rb") as fh:
        while chunk := fh.read(UPLOAD_CHUNK_BYTES):
            sent += len(chunk)
            yield chunk
            if on_progress:
                on_progress(sent, total)


__all__ = ["FleetClient", "PulledModel"]
