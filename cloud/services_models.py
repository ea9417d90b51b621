"""The model registry and its bundles, in the `Fleet` facade: push, list, show, pull, and the per-class bundle builds.
Mixed into `Fleet`.

Theory: a pushed model is validated (ONNX checker, an ONNX Runtime session) and stored in the blob store under its
sha256; its row records the signature (inputs and outputs with their full shapes). Bundles are built lazily, once per
(model, version, class): the archive goes into the blob store under its sha256 (the key the TUF target route serves),
is added as a TUF target, then recorded. Builds are deterministic, so two builders racing produce the same bytes and
the same target.

Pulling a version back (`model_artifact`) answers the bytes as stored: without a class, the uploaded (or distilled)
model file itself; with a class, the model file inside that class's bundle, which is what the class's devices run
(ONNX or TFLite), building the bundle first when no deployment has. Either is streamed, never read whole.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from edgefleet.cloud.bundles import build_bundle, model_file_for, read_npz, target_path
from edgefleet.cloud.errors import CloudError, Invalid, NotFound, UnknownClass
from edgefleet.cloud.registry import validate_model
from edgefleet.protos.api import ModelVersionView
from edgefleet.protos.messages import TensorSpec, check_name

if TYPE_CHECKING:
    from edgefleet.cloud.blobs import BlobStore
    from edgefleet.cloud.db.models import Bundle, ModelVersion
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store
    from edgefleet.cloud.trust import TufRepository
    from edgefleet.protos.messages import DeviceClassInfo

log = logging.getLogger(__name__)
_CHUNK_BYTES = 256 * 1024


def _now() -> datetime:
    # Whole seconds, like the rest of the facade: stored times then read the same in every JSON round trip.
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass(frozen=True)
class ModelArtifact:
    """A model file to stream back: `chunks()` opens the blob (or the bundle) and closes it when the stream ends."""

    filename: str
    sha256: str
    size_bytes: int
    blob_key: str
    member: str | None = None  # the bundle member holding the model; None: the blob is the model file itself

    def chunks(self, blobs: BlobStore) -> Iterator[bytes]:
        with blobs.open(self.blob_key) as f:
            yield from _member_chunks(f, self.member, self.blob_key) if self.member else _read_chunks(f)


class ModelsFacade:
    """Needs `settings`, `store`, `blobs`, `tuf`, `count()`, `_class()` and `_bundle_provenance()` from `Fleet`."""

    if TYPE_CHECKING:
        settings: Settings
        store: Store
        blobs: BlobStore
        tuf: TufRepository

        def count(self, name: str, by: int = 1) -> None: ...
        def _class(self, name: str) -> DeviceClassInfo: ...
        def _bundle_provenance(self, model: ModelVersion, cls: DeviceClassInfo, model_bytes: bytes,
                               model_file: str, target: str) -> bytes: ...

    # ------------------------------------------------------------------------------------------------ models

    def push_model(self, name: str, data: bytes) -> ModelVersionView:
        try:
            check_name(name)
        except ValueError as exc:
            raise Invalid(f"model {exc}") from None
        try:
            info = validate_model(data, max_bytes=self.settings.max_model_bytes)
        except CloudError:
            self.count("refused_models")
            raise
        key = self.blobs.put_bytes(data)
        row = self.store.add_model_version(
            name, sha256=key, size_bytes=info.size_bytes, opset=info.opset,
            inputs=[s.to_dict() for s in info.inputs], outputs=[s.to_dict() for s in info.outputs], now=_now(),
        )
        log.info("model %s v%d stored (%d bytes, sha256 %s)", name, row.version, row.size_bytes, key)
        return _model_view(row)

    def list_models(self) -> list[ModelVersionView]:
        return [_model_view(r) for r in self.store.list_model_versions()]

    def model_versions(self, name: str) -> list[ModelVersionView]:
        """Every version of one model, oldest first; `NotFound` for a name never pushed."""
        views = [_model_view(r) for r in self.store.list_model_versions() if r.name == name]
        if not views:
            raise NotFound(f"no model {name!r}; `fleet models` lists the models in the registry")
        return views

    def _model_version(self, name: str, version: int | None) -> ModelVersion:
        row = self.store.get_model_version(name, version)
        if row is None:
            if version is None or self.store.get_model_version(name) is None:
                raise NotFound(f"no model {name!r}; push it first (`fleet models push`) or check `fleet models`")
            raise NotFound(f"model {name!r} has no version {version}; `fleet models show {name}` lists its versions")
        return row

    def get_model(self, name: str, version: int | None = None) -> ModelVersionView:
        """One version (the latest when `version` is None), with its signature."""
        return _model_view(self._model_version(name, version))

    def model_artifact(self, name: str, version: int, device_class: str | None = None) -> ModelArtifact:
        """What `fleet models pull` downloads: the stored model file, or the one the class runs (from its bundle,
        built first when missing, as a deployment would)."""
        model = self._model_version(name, version)
        ext = Path(model_file_for(model.format or "onnx")).suffix
        if device_class is None:
            return ModelArtifact(filename=f"{name}-v{version}{ext}", sha256=model.sha256, size_bytes=model.size_bytes,
                                 blob_key=model.sha256)
        try:
            cls = self._class(device_class)
        except UnknownClass as exc:  # a name in the URL that names nothing: 404, with the same hint
            raise NotFound(exc.message) from None
        bundle = self._ensure_bundle(model, cls)
        manifest = bundle.manifest or {}
        member = manifest.get("model_file") or model_file_for(model.format or "onnx")
        entry = next((f for f in manifest.get("files", []) if f.get("path") == member), None)
        if entry is None:
            raise CloudError(f"bundle {bundle.target_path} lists no {member} in its manifest; rebuild it")
        return ModelArtifact(filename=f"{name}-v{version}-{cls.name}{Path(member).suffix}", sha256=entry["sha256"],
                             size_bytes=entry["size"], blob_key=bundle.sha256, member=member)

    # ------------------------------------------------------------------------------------------------ bundles

    def _ensure_bundle(self, model: ModelVersion, cls: DeviceClassInfo) -> Bundle:
        if model.built_for_class and model.built_for_class != cls.name:
            # A distilled variant was chosen against this class's budgets and calibration (and may be int8 or
            # TFLite for its runtime): on another class it would break the budgets it was picked for.
            raise Invalid(f"{model.name} v{model.version} was built for class {model.built_for_class}, not "
                          f"{cls.name}; deploy the version built for {cls.name} (`fleet models` shows each "
                          f"version's class), or distill for {cls.name}")
        existing = self.store.get_bundle(model.name, model.version, cls.name)
        if existing is not None:
            return existing
        with self.blobs.open(model.sha256) as f:
            model_bytes = f.read()
        expected = None
        if model.smoke_sha256:
            with self.blobs.open(model.smoke_sha256) as f:
                expected = read_npz(f.read())
        path = target_path(model.name, model.version, cls.name)
        # The signed statement of how the model was made goes into the bundle (services_provenance.py).
        provenance = self._bundle_provenance(model, cls, model_bytes, model_file_for(model.format or "onnx"), path)
        try:
            archive, manifest = build_bundle(
                model_bytes, name=model.name, version=model.version, device_class=cls,
                inputs=[TensorSpec.model_validate(s) for s in model.inputs],
                outputs=[TensorSpec.model_validate(s) for s in model.outputs],
                created_at=model.created_at,  # the model's time, not now: rebuilding gives the same bytes
                precision=model.precision or "fp32", runtime=model.runtime or "onnxruntime",
                model_format=model.format or "onnx", expected=expected, provenance=provenance,
            )
        except Invalid as exc:
            raise Invalid(f"cannot build a bundle of {model.name} v{model.version} for class {cls.name}: "
                          f"{exc.message}") from None
        key = self.blobs.put_bytes(archive)
        self.tuf.add_target(path, archive)
        return self.store.add_bundle(model=model.name, version=model.version, device_class=cls.name,
                                     target_path=path, sha256=key, size_bytes=len(archive),
                                     manifest=manifest.to_dict(), now=_now())


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK_BYTES):
        yield chunk


def _member_chunks(archive: BinaryIO, member: str, where: str) -> Iterator[bytes]:
    """One member of one of our bundles, read in one streaming pass over the archive."""
    try:
        with tarfile.open(fileobj=archive, mode="r|gz") as tar:
            for info in tar:
                if info.name == member and info.isreg():
                    handle = tar.extractfile(info)
                    assert handle is not None  # a regular file always has one
                    yield from _read_chunks(handle)
                    return
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CloudError(f"bundle blob {where} is unreadable ({exc}); rebuild it") from None
    raise CloudError(f"bundle blob {where} has no {member}; rebuild it")


def _model_view(row: ModelVersion) -> ModelVersionView:
    return ModelVersionView(name=row.name, version=row.version, sha256=row.sha256, size_bytes=row.size_bytes,
                            opset=row.opset, inputs=row.inputs, outputs=row.outputs, created_at=row.created_at,
                            precision=row.precision, runtime=row.runtime, format=row.format,
                            built_for_class=row.built_for_class, job_id=row.job_id)


__all__ = ["ModelArtifact", "ModelsFacade"]
