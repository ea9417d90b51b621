"""Provenance of a bundle: an in-toto Statement v1 about the bundle's files, in a DSSE envelope, as typed models.

Theory: the cloud signs one statement per bundle at build time and puts the envelope in the bundle
(`PROVENANCE_FILE`, listed in the manifest's `files` like any member). That statement's subject is the model file:
a statement cannot name the digest of the archive that contains it. The admin route (`BundleProvenanceView`) adds a
second envelope over the same predicate whose subject is the archive itself (by its TUF target path) and the model
file, signed by the same key when asked (ed25519 is deterministic: the same bytes every time). A verifier checks
both signatures against a key it pinned, the archive's sha256, the model member's sha256, and that the two
predicates are the same.

The predicate (`PREDICATE_TYPE`) records how the bundle's model came to be, as a chain: `source` (the ONNX an
operator uploaded: a pushed model, or for a distilled variant its teacher) -> `distillation` (the job, the transfer
set, the spec, the chosen student) -> `quantization` (how the student became the variant's precision) -> `model`
(the version in the bundle) -> `target` (the bundle: class, runtime, TUF target path). A pushed model has no
distillation or quantization. The predicate models ignore fields they do not know (a newer cloud may record more);
envelopes and statements are strict. Imports nothing of cloud, agent or CLI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

# https://github.com/secure-systems-lab/dsse/blob/master/protocol.md and https://github.com/in-toto/attestation
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://edgefleet.dev/provenance/v1"
BUILDER_ID = "https://edgefleet.dev/cloud/bundle-builder/v1"
PROVENANCE_FILE = "provenance.dsse.json"  # the in-bundle envelope, next to manifest.json
# 4 signatures: one key signs today; room for a rotation's old and new key. 1 MiB of base64: a predicate is a few KiB.
MAX_SIGNATURES = 4
MAX_PAYLOAD_CHARS = 1024 * 1024


class _Wire(BaseModel):
    """Strict wire shapes whose JSON names follow the specs (`payloadType`, `_type`), not Python's."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_wire(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class DsseSignature(_Wire):
    keyid: str = Field(default="", max_length=128)  # a hint only: verifiers try every trusted key
    sig: str = Field(min_length=1, max_length=512)  # base64 of the signature over PAE(payloadType, payload)


class DsseEnvelope(_Wire):
    payload: str = Field(max_length=MAX_PAYLOAD_CHARS)  # base64 of the statement's bytes
    payload_type: str = Field(alias="payloadType", max_length=256)
    signatures: list[DsseSignature] = Field(min_length=1, max_length=MAX_SIGNATURES)


class ResourceDescriptor(_Wire):
    """in-toto's ResourceDescriptor, the part a subject uses: a name and its digests ({"sha256": hex})."""

    name: str = Field(min_length=1, max_length=1024)
    digest: dict[str, str] = Field(min_length=1, max_length=8)


class Statement(_Wire):
    """in-toto Statement v1. `predicate` stays a dict so that a verifier compares exactly what was signed."""

    type_: Literal["https://in-toto.io/Statement/v1"] = Field(default=STATEMENT_TYPE, alias="_type")
    subject: list[ResourceDescriptor] = Field(min_length=1, max_length=16)
    predicate_type: str = Field(alias="predicateType", max_length=256)
    predicate: dict[str, Any]

    def digest_of(self, name: str) -> str | None:
        """The sha256 the statement gives for subject `name`, or None when it names no such subject."""
        for s in self.subject:
            if s.name == name:
                return s.digest.get("sha256")
        return None


class ProvenanceKey(_Wire):
    """A public key in securesystemslib's form; `keyid` is the sha256 of the canonical JSON of the other fields."""

    keyid: str = Field(min_length=1, max_length=128)
    keytype: Literal["ed25519"] = "ed25519"
    scheme: Literal["ed25519"] = "ed25519"
    keyval: dict[str, str]  # {"public": 64 hex characters}


# ---------------------------------------------------------------------------------------------------------------
# The predicate


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Builder(_Fact):
    id: str = BUILDER_ID
    version: str  # edgefleet's version where the bundle was built


class SourceModel(_Fact):
    """The ONNX an operator uploaded, where the chain starts. For a distilled variant: its teacher, named when the
    same bytes were also pushed as a model version."""

    role: Literal["pushed", "teacher"]
    name: str | None = None
    version: int | None = None
    sha256: str
    size_bytes: int | None = None


class TransferSet(_Fact):
    sha256: str
    size_bytes: int | None = None
    samples: int | None = None
    train_rows: int | None = None
    val_rows: int | None = None
    heldout_rows: int | None = None
    has_labels: bool | None = None


class Student(_Fact):
    """The chosen candidate, trained in fp32 before the class's variant was made of it."""

    candidate: str
    family: str | None = None
    width_mult: float | None = None
    depth: int | None = None
    hidden: list[int] = Field(default_factory=list)
    epochs: int | None = None
    best_epoch: int | None = None
    sha256: str | None = None  # of the fp32 student ONNX (None: built before this was recorded)
    accuracy: float | None = None  # of the variant on the held-out rows
    agreement: float | None = None


class Distillation(_Fact):
    job_id: int
    spec: dict[str, Any] = Field(default_factory=dict)  # the DistillSpec: seed, epochs, temperature, alpha, ...
    teacher_output_kind: str | None = None
    transfer_set: TransferSet | None = None
    student: Student | None = None


class Quantization(_Fact):
    """How the fp32 student became the variant's precision."""

    precision: Literal["fp16", "int8"]
    tool: str  # e.g. "onnxruntime.quantization.quantize_static"
    settings: dict[str, Any] = Field(default_factory=dict)  # format QDQ, per_channel, types, calibration method
    calibration_rows: int | None = None  # transfer-set rows the activation ranges were calibrated on


class BuiltModel(_Fact):
    """The model version the bundle carries."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    precision: str
    runtime: str
    format: str
    file: str  # its member in the bundle (model.onnx, model.tflite)
    created_at: datetime


class Target(_Fact):
    device_class: str
    runtime: str
    execution_providers: list[str] = Field(default_factory=list)
    target_path: str  # the bundle's TUF target path


class ProvenancePredicate(_Fact):
    builder: Builder
    built_at: datetime  # the model version's time, not the clock's: a rebuild gives the same bytes
    source: SourceModel
    distillation: Distillation | None = None
    quantization: Quantization | None = None
    model: BuiltModel
    target: Target


# ---------------------------------------------------------------------------------------------------------------
# Admin views (GET /api/v1/models/{name}/versions/{v}/provenance, GET /api/v1/provenance/keys)


class BundleProvenanceView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str
    version: int
    device_class: str
    target_path: str
    bundle_sha256: str  # what the cloud says; a verifier trusts the signed subject, not this
    size_bytes: int
    envelope: DsseEnvelope | None = None  # subject: the archive and its model file (None: built before provenance)
    embedded: DsseEnvelope | None = None  # the envelope inside the bundle, as found there


class ProvenanceKeysView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    keys: list[ProvenanceKey]


__all__ = [
    "BUILDER_ID", "PAYLOAD_TYPE", "PREDICATE_TYPE", "PROVENANCE_FILE", "STATEMENT_TYPE", "Builder", "BuiltModel",
    "BundleProvenanceView", "Distillation", "DsseEnvelope", "DsseSignature", "ProvenanceKey", "ProvenanceKeysView",
    "ProvenancePredicate", "Quantization", "ResourceDescriptor", "SourceModel", "Statement", "Student", "Target",
    "TransferSet",
]
