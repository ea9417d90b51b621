"""Which model answers an offloaded request: `VariantResolver.resolve(name, version) -> Resolution`.

Theory: an app calls a model by the name and version its device runs, and never changes that call when the
request goes to the cloud. What the cloud runs for it is the model's *cloud variant*, chosen by the setting
`offload_serves`:

- "teacher" (the default): for a version a distillation job built (`ModelVersion.job_id` set), the teacher that
  job distilled from (`Job.inputs["teacher"]`, an ONNX blob): the cloud has the cores to run the big model, and the
  device fell back to the cloud exactly because it could not. It answers under the student's name and version.
- "version": the version's own ONNX file, so that cloud and device answers agree bit for bit. A TFLite variant
  cannot run on ONNX Runtime: its teacher answers instead, and the resolution says so (`note`).

A pushed version (no job) is its own ONNX file either way. `version` None is the latest version of the name.
Resolutions are kept for `ttl_s` (2 s): the hot path reads a dict, not the database, and a newly pushed version is
served within two seconds. Sessions are keyed by the blob's sha256 (see pool.py), so the teacher of many students
is loaded once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from edgefleet.cloud.errors import NotFound

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import ModelVersion

Serves = Literal["teacher", "version"]
Variant = Literal["teacher", "version"]
# 2 s: a push shows up in the cloud's answers within the time a person takes to switch windows; the database is
# read at most once per model and TTL, not per request.
RESOLVE_TTL_S = 2.0


@dataclass(frozen=True)
class Resolution:
    """What answers (name, version): the blob `sha256` of an ONNX file, under the name and version asked for."""

    name: str
    version: str  # the version that answers, as OIP spells it ("3"): the asked one, or the latest
    sha256: str  # blob key of the ONNX bytes to run
    variant: Variant  # "teacher": the distillation's teacher; "version": the version's own file
    versions: tuple[str, ...]  # every version of the name, oldest first (OIP model metadata)
    note: str | None = None  # why the variant differs from what the setting asked for


class VariantResolver:
    """Resolves (name, version) against the registry of `fleet` (`.store`, `.blobs`), caching for `ttl_s`."""

    def __init__(self, fleet: object, serves: Serves = "teacher", *, ttl_s: float = RESOLVE_TTL_S) -> None:
        if serves not in ("teacher", "version"):
            raise ValueError(f"serves must be 'teacher' or 'version', not {serves!r}")
        self.fleet = fleet
        self.serves: Serves = serves
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str | None], tuple[float, Resolution | NotFound]] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, version: str | None) -> Resolution:
        key = (name, version)
        hit = self._cache.get(key)  # a dict read is atomic under the GIL: no lock on the hot path
        now = time.monotonic()
        if hit is None or hit[0] < now:
            # A miss (a typo'd name, a version not yet pushed) is cached too: a client hammering a wrong name must
            # not turn every request into a database query.
            try:
                value: Resolution | NotFound = self._lookup(name, version)
            except NotFound as exc:
                value = exc
            with self._lock:
                if len(self._cache) > 4096:  # names come from clients: bound what they can make us keep
                    self._cache.clear()
                self._cache[key] = (now + self.ttl_s, value)
            hit = (0.0, value)
        if isinstance(hit[1], NotFound):
            raise NotFound(hit[1].message)
        return hit[1]

    def cached(self, name: str, version: str | None) -> Resolution | None:
        """The resolution when the cache holds a fresh one, else None: never touches the database (an event loop
        asks this to know whether `resolve` would block)."""
        hit = self._cache.get((name, version))
        if hit is None or hit[0] < time.monotonic() or isinstance(hit[1], NotFound):
            return None
        return hit[1]

    def onnx(self, resolution: Resolution) -> bytes:
        """The ONNX bytes of a resolution, from the blob store."""
        blobs = self.fleet.blobs  # type: ignore[attr-defined]
        try:
            with blobs.open(resolution.sha256) as f:
                return f.read()
        except NotFound:
            raise NotFound(f"the {resolution.variant} file of {resolution.name} v{resolution.version} (blob "
                           f"{resolution.sha256[:12]}) is missing from the blob store; push the model again") from None

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------------------------------------ lookups

    def _lookup(self, name: str, version: str | None) -> Resolution:
        store = self.fleet.store  # type: ignore[attr-defined]
        number: int | None = None
        if version is not None and version != "":
            try:
                number = int(version)
            except ValueError:
                raise NotFound(f"model {name!r} has no version {version!r}: versions are whole numbers; GET "
                               f"/v2/models/{name} lists them") from None
        rows = [r for r in store.list_model_versions() if r.name == name]
        if not rows:
            raise NotFound(f"no model {name!r}; push it first (`fleet models push`) or check `fleet models`")
        row = rows[-1] if number is None else next((r for r in rows if r.version == number), None)
        if row is None:
            raise NotFound(f"model {name!r} has no version {version}; its versions are "
                           f"{', '.join(str(r.version) for r in rows)}")
        versions = tuple(str(r.version) for r in rows)
        sha, variant, note = self._variant(row)
        return Resolution(name=name, version=str(row.version), sha256=sha, variant=variant, versions=versions,
                          note=note)

    def _variant(self, row: ModelVersion) -> tuple[str, Variant, str | None]:
        fmt = row.format or "onnx"
        if row.job_id is None:
            return row.sha256, "version", None  # a pushed model: fp32 ONNX, the only file there is
        wants_teacher = self.serves == "teacher" or fmt != "onnx"
        if not wants_teacher:
            return row.sha256, "version", None
        teacher = self._teacher(row.job_id)
        if teacher is not None:
            note = None if self.serves == "teacher" else (
                f"{row.name} v{row.version} is a {fmt} file, which ONNX Runtime cannot run; its teacher answers")
            return teacher, "teacher", note
        if fmt == "onnx":
            return row.sha256, "version", f"the teacher of job {row.job_id} is gone; the version itself answers"
        raise NotFound(f"{row.name} v{row.version} is a {fmt} file and the teacher of job {row.job_id} is gone, so "
                       "the cloud has nothing it can run for it; push an ONNX version or distill again")

    def _teacher(self, job_id: int) -> str | None:
        job = self.fleet.store.get_job(job_id)  # type: ignore[attr-defined]
        sha = (job.inputs or {}).get("teacher") if job is not None else None
        return sha if isinstance(sha, str) and sha else None


__all__ = ["RESOLVE_TTL_S", "Resolution", "Serves", "VariantResolver"]
