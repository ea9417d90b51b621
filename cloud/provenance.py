"""Bundle provenance: the cloud's provenance key, the predicate a bundle's statement carries, and its signing.

Theory: `ProvenanceSigner` holds an ed25519 key of its own, `{keys_dir}/provenance.pem` (PKCS#8, 0600, made on first
start; not the desired-state key, so that rotating one never touches the other), and writes its public half beside
it, `provenance.pub.pem`, for operators to hand to `fleet models provenance --key` out of band. It signs in-toto
statements as DSSE envelopes (`common/dsse.py`).

`predicate(...)` is pure: it turns what the registry and the distillation job recorded into a
`protos.provenance.ProvenancePredicate`. Everything in it is fixed when the model version is made (the version's
`created_at` stands for the build time), so a rebuild of a bundle gives the same statement, and ed25519 the same
signature: bundles stay byte-for-byte deterministic (cloud/bundles.py).

Quantisation settings are the ones `cloud/distill/artifacts.py` applies (`make_int8`, `make_fp16`, the onnx2tf
script); change them together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from datetime import datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from edgefleet.cloud.distill.artifacts import CALIBRATION_SAMPLES
from edgefleet.cloud.errors import CloudError
from edgefleet.common import dsse
from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.protos.messages import DeviceClassInfo
from edgefleet.protos.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    Builder,
    BuiltModel,
    Distillation,
    DsseEnvelope,
    ProvenanceKey,
    ProvenancePredicate,
    Quantization,
    ResourceDescriptor,
    SourceModel,
    Statement,
    Student,
    Target,
    TransferSet,
)

log = logging.getLogger(__name__)

KEY_FILE = "provenance.pem"
PUBLIC_KEY_FILE = "provenance.pub.pem"
_QUANTIZATION: dict[tuple[str, str], tuple[str, dict[str, Any], bool]] = {
    # (precision, runtime): (tool, settings, calibrated on transfer rows)
    ("int8", "onnxruntime"): ("onnxruntime.quantization.quantize_static", {
        "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process", "format": "QDQ",
        "per_channel": True, "activation_type": "QInt8", "weight_type": "QInt8", "calibrate_method": "MinMax"}, True),
    ("fp16", "onnxruntime"): ("onnxruntime.transformers.float16.convert_float_to_float16",
                              {"keep_io_types": True}, False),
    ("int8", "litert"): ("onnx2tf", {"quant_type": "per-channel", "integer": "full", "io": "float32"}, True),
    ("fp16", "litert"): ("onnx2tf", {"io": "float32"}, False),
}


def builder_version() -> str:
    try:
        return pkg_version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


class ProvenanceSigner:
    def __init__(self, key_dir: Path) -> None:
        self.key_path = Path(key_dir) / KEY_FILE
        self.public_path = Path(key_dir) / PUBLIC_KEY_FILE
        self._lock = threading.Lock()
        self._private = self._load_or_create()
        self.key = dsse.key_of(self._private.public_key())
        self._write_public()

    def _load_or_create(self) -> Ed25519PrivateKey:
        self.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key_path.exists():
            fresh = Ed25519PrivateKey.generate()
            pem = fresh.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            # exclusive: a second process starting at the same moment keeps the first one's key
            if atomic_write_bytes(self.key_path, pem, 0o600, exclusive=True):
                log.info("made provenance key %s (keyid %s)", self.key_path, dsse.key_of(fresh.public_key()).keyid)
                return fresh
        if stat.S_IMODE(self.key_path.stat().st_mode) & 0o077:
            log.warning("provenance key %s was readable by others; setting mode 0600", self.key_path)
            os.chmod(self.key_path, 0o600)
        try:
            loaded = load_pem_private_key(self.key_path.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise CloudError(f"provenance key {self.key_path} is unreadable ({exc}): restore it from backup") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise CloudError(f"provenance key {self.key_path} is not an ed25519 key: restore it from backup")
        return loaded

    def _write_public(self) -> None:
        pem = self._private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        try:
            if not self.public_path.is_file() or self.public_path.read_bytes() != pem:
                atomic_write_bytes(self.public_path, pem, 0o644)
        except OSError as exc:  # a convenience copy; the API serves the key too
            log.warning("cannot write %s: %s", self.public_path, exc)

    def public_keys(self) -> list[ProvenanceKey]:
        return [self.key]

    def sign(self, statement: Statement) -> DsseEnvelope:
        with self._lock:
            return dsse.sign(statement.to_wire(), PAYLOAD_TYPE, self._private)


def statement(subjects: dict[str, str], predicate: dict[str, Any]) -> Statement:
    """An in-toto statement of our predicate type about `subjects` ({name: sha256})."""
    return Statement(subject=[ResourceDescriptor(name=n, digest={"sha256": d}) for n, d in subjects.items()],
                     predicate_type=PREDICATE_TYPE, predicate=predicate)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def predicate(
    *,
    name: str,
    version: int,
    sha256_hex: str,
    size_bytes: int,
    created_at: datetime,
    precision: str,
    runtime: str,
    fmt: str,
    model_file: str,
    device_class: DeviceClassInfo,
    target_path: str,
    job: dict[str, Any] | None,
    job_id: int | None = None,
    teacher_ref: tuple[str, int] | None = None,
    transfer_size: int | None = None,
) -> ProvenancePredicate:
    """The build facts of one bundle. `job`: the distillation job that built the version (its `spec`, `inputs`
    and `result` as stored), None for a pushed model; `teacher_ref`: a pushed (name, version) with the teacher's
    bytes, when there is one."""
    model = BuiltModel(name=name, version=version, sha256=sha256_hex, size_bytes=size_bytes, precision=precision,
                       runtime=runtime, format=fmt, file=model_file, created_at=created_at)
    target = Target(device_class=device_class.name, runtime=runtime,
                    execution_providers=list(device_class.execution_providers), target_path=target_path)
    base = dict(builder=Builder(version=builder_version()), built_at=created_at, model=model, target=target)
    if job_id is None:
        source = SourceModel(role="pushed", name=name, version=version, sha256=sha256_hex, size_bytes=size_bytes)
        return ProvenancePredicate(source=source, **base)
    job = job or {}
    inputs = job.get("inputs") or {}
    result = job.get("result") or {}
    report = result.get("report") or {}
    teacher = report.get("teacher") or {}
    source = SourceModel(role="teacher", name=teacher_ref[0] if teacher_ref else None,
                         version=teacher_ref[1] if teacher_ref else None,
                         sha256=inputs.get("teacher", ""), size_bytes=teacher.get("size_bytes"))
    transfer = None
    if inputs.get("data"):
        transfer = TransferSet(sha256=inputs["data"], size_bytes=transfer_size, samples=report.get("n_samples"),
                               train_rows=report.get("n_train"), val_rows=report.get("n_val"),
                               heldout_rows=report.get("n_heldout"), has_labels=report.get("has_labels"))
    distillation = Distillation(job_id=job_id, spec=(job.get("spec") or {}).get("distill") or {},
                                teacher_output_kind=report.get("teacher_output_kind"), transfer_set=transfer,
                                student=_student(report, result, device_class.name, version))
    quantization = None
    if (precision, runtime) in _QUANTIZATION:
        tool, settings, calibrated = _QUANTIZATION[(precision, runtime)]
        n_train = report.get("n_train")  # calibration takes up to CALIBRATION_SAMPLES of the training rows
        rows = min(CALIBRATION_SAMPLES, n_train) if calibrated and isinstance(n_train, int) else None
        quantization = Quantization(precision=precision, tool=tool, settings=settings, calibration_rows=rows)
    return ProvenancePredicate(source=source, distillation=distillation, quantization=quantization, **base)


def _student(report: dict[str, Any], result: dict[str, Any], device_class: str, version: int) -> Student | None:
    chosen = ((report.get("classes") or {}).get(device_class) or {}).get("chosen")
    if not chosen:
        return None
    students = report.get("students") or []
    trained: dict[str, Any] = next((s for s in students if s.get("candidate") == chosen.get("candidate")), {})
    recorded = (result.get("provenance") or {}).get(str(version)) or {}
    return Student(candidate=chosen["candidate"], family=chosen.get("family"), width_mult=chosen.get("width_mult"),
                   depth=chosen.get("depth"), hidden=trained.get("hidden") or [], epochs=trained.get("epochs"),
                   best_epoch=trained.get("best_epoch"), sha256=recorded.get("student_sha256"),
                   accuracy=chosen.get("accuracy"), agreement=chosen.get("agreement"))


__all__ = ["KEY_FILE", "PUBLIC_KEY_FILE", "ProvenanceSigner", "predicate", "sha256", "statement"]
