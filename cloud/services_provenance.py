"""Provenance of bundles: the part of the `Fleet` facade (mixed into it) that signs a statement into every bundle it
builds and serves `GET /api/v1/models/{name}/versions/{v}/provenance` and `GET /api/v1/provenance/keys`.

Theory: `_bundle_provenance` runs inside `Fleet._ensure_bundle`, before the archive is made: it gathers what the
registry recorded about the version (and, for a distilled variant, what its job recorded: spec, teacher and
transfer-set blobs, report, the student's hash) into a predicate, and signs a statement about the model file. The
envelope goes into the bundle, so the manifest's hashes and TUF's signature over the archive cover it, and nothing
is stored anywhere else: no table, no migration. A version whose job is still running is refused for a moment
(`Unavailable`), since its facts are written when the job ends.

`bundle_provenance` reads each bundle back from the blob store, takes the envelope out of it and signs, over the
same predicate, a statement whose subject is the archive itself: ed25519 signatures are deterministic, so asking
twice gives the same bytes. Bundles built before provenance existed are answered with no envelopes.
"""

from __future__ import annotations

import base64
import tarfile
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

from edgefleet.cloud.errors import CloudError, NotFound, Unavailable
from edgefleet.cloud.provenance import ProvenanceSigner, predicate, sha256, statement
from edgefleet.protos.provenance import (
    PROVENANCE_FILE,
    BundleProvenanceView,
    DsseEnvelope,
    ProvenanceKeysView,
    Statement,
)

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import Bundle, ModelVersion
    from edgefleet.protos.messages import DeviceClassInfo

_SIGNER_LOCK = threading.Lock()
# 1 MiB: an envelope is a few KiB; a member larger than this in our own bundle is not ours.
_MAX_ENVELOPE_BYTES = 1024 * 1024


class ProvenanceFacade:
    """Mixed into `Fleet`; uses its settings, store, blobs and classes, and `_ensure_bundle`."""

    @property
    def provenance_signer(self) -> ProvenanceSigner:
        """The provenance key, loaded (or made) once per Fleet."""
        signer: ProvenanceSigner | None = getattr(self, "_provenance_signer", None)
        if signer is None:
            with _SIGNER_LOCK:
                signer = getattr(self, "_provenance_signer", None)
                if signer is None:
                    signer = ProvenanceSigner(self.settings.keys_dir)
                    self._provenance_signer = signer
        return signer

    def provenance_keys(self) -> ProvenanceKeysView:
        return ProvenanceKeysView(keys=self.provenance_signer.public_keys())

    # ------------------------------------------------------------------------------------------------ at build

    def _bundle_provenance(self, model: ModelVersion, cls: DeviceClassInfo, model_bytes: bytes, model_file: str,
                           target: str) -> bytes:
        """The signed envelope (JSON bytes) a new bundle carries as PROVENANCE_FILE."""
        job: dict[str, Any] | None = None
        teacher_ref = transfer_size = None
        if model.job_id is not None:
            row = self.store.get_job(model.job_id)
            if row is not None and row.state in ("queued", "running"):
                raise Unavailable(f"{model.name} v{model.version} was built by job {model.job_id}, which is still "
                                  f"{row.state}; its provenance is complete once the job ends: retry when `fleet "
                                  f"jobs show {model.job_id}` says succeeded")
            if row is not None:
                job = {"spec": row.spec, "inputs": row.inputs, "result": row.result}
                teacher_ref = self._pushed_as(row.inputs.get("teacher"))
                if row.inputs.get("data") and self.blobs.exists(row.inputs["data"]):
                    transfer_size = self.blobs.size(row.inputs["data"])
        facts = predicate(
            name=model.name, version=model.version, sha256_hex=model.sha256, size_bytes=model.size_bytes,
            created_at=model.created_at, precision=model.precision or "fp32", runtime=model.runtime or "onnxruntime",
            fmt=model.format or "onnx", model_file=model_file, device_class=cls, target_path=target, job=job,
            job_id=model.job_id, teacher_ref=teacher_ref, transfer_size=transfer_size)
        signed = self.provenance_signer.sign(statement({model_file: sha256(model_bytes)}, facts.to_dict()))
        return signed.to_wire()

    def _pushed_as(self, sha: str | None) -> tuple[str, int] | None:
        """The first pushed version (not a variant) with these bytes: the teacher's name in the registry."""
        if not sha:
            return None
        for row in self.store.list_model_versions():
            if row.sha256 == sha and row.job_id is None and row.built_for_class is None:
                return row.name, row.version
        return None

    # ------------------------------------------------------------------------------------------------ served

    def bundle_provenance(self, name: str, version: int, device_class: str | None = None) -> list[BundleProvenanceView]:
        """Per bundle of the version: the envelope in it and one over the archive. With `device_class`, that class's
        bundle is built first if missing (as a deployment would); without, the bundles built so far."""
        model = self.store.get_model_version(name, version)
        if model is None:
            raise NotFound(f"model {name!r} has no version {version}; `fleet models` lists the versions")
        if device_class is not None:
            bundles = [self._ensure_bundle(model, self._class(device_class))]
        else:
            classes = sorted(self._classes())
            bundles = [b for c in classes if (b := self.store.get_bundle(name, version, c)) is not None]
            if not bundles and model.built_for_class:
                bundles = [self._ensure_bundle(model, self._class(model.built_for_class))]
            if not bundles:
                raise NotFound(f"{name} v{version} has no bundle yet: deploy it, or name a class "
                               f"(`fleet models provenance {name} --version {version} --class CLASS`) to build one")
        return [self._bundle_view(b) for b in bundles]

    def _bundle_view(self, bundle: Bundle) -> BundleProvenanceView:
        with self.blobs.open(bundle.sha256) as f:
            embedded = _embedded_envelope(f, bundle.target_path)
        view = dict(model=bundle.model, version=bundle.version, device_class=bundle.device_class,
                    target_path=bundle.target_path, bundle_sha256=bundle.sha256, size_bytes=bundle.size_bytes)
        if embedded is None:
            return BundleProvenanceView(**view)
        inner = Statement.model_validate_json(base64.b64decode(embedded.payload))
        subjects = {s.name: s.digest["sha256"] for s in inner.subject}
        # The blob key is the archive's sha256 as built: a blob damaged since then fails the verifier's check.
        outer = statement({bundle.target_path: bundle.sha256, **subjects}, inner.predicate)
        return BundleProvenanceView(**view, envelope=self.provenance_signer.sign(outer), embedded=embedded)


def _embedded_envelope(archive: BinaryIO, where: str) -> DsseEnvelope | None:
    """The envelope inside one of our bundles (read in one pass, never whole), or None for a bundle built before
    provenance was recorded."""
    try:
        with tarfile.open(fileobj=archive, mode="r|gz") as tar:
            for member in tar:
                if member.name != PROVENANCE_FILE:
                    continue
                handle = tar.extractfile(member) if member.isreg() and member.size <= _MAX_ENVELOPE_BYTES else None
                if handle is None:
                    raise CloudError(f"bundle {where}: {PROVENANCE_FILE} is not a small regular file; rebuild it")
                return DsseEnvelope.model_validate_json(handle.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CloudError(f"bundle {where} in the blob store is unreadable ({exc}); rebuild it") from None
    return None


__all__ = ["ProvenanceFacade"]
