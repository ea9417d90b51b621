"""Offline verification of a bundle's provenance, and the provenance key the CLI pins.

Theory: the cloud signs, per bundle, an in-toto statement in a DSSE envelope (`protos/provenance.py`). The CLI trusts
a key only if it was pinned: `fleet login` fetches the cloud's provenance key once (the same trust step as saving
the admin token) into `provenance-keys.json` next to cli.toml, and `--key FILE` names one obtained out of band
(`{data_dir}/keys/provenance.pub.pem` on the cloud, or the JSON of `GET /api/v1/provenance/keys`). A key is never
taken from the answer being checked, so a cloud whose key changed after login, or a server in between, fails.

`verify_bundle` takes the cloud's view and the archive bytes and returns what it verified, or raises `Unverified`;
it never downloads. In order, so that nothing unverified is read:
1. the envelope over the archive: payloadType, a signature under a pinned key, in-toto Statement v1, our predicate
2. the archive's sha256 equals the statement's subject named by the bundle's target path
3. now the archive is the signed one and may be opened: the model member's sha256 equals the statement's; the
   manifest lists `provenance.dsse.json` with the sha256 of that member
4. that in-bundle envelope verifies under the same keys, about the same model digest, with the same predicate
5. the copy of it the cloud served is the one in the archive
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.common import dsse
from edgefleet.common.errors import SignatureError
from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.fleet.config import config_path
from edgefleet.fleet.errors import ConfigError, Unverified
from edgefleet.protos.messages import Manifest
from edgefleet.protos.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    PROVENANCE_FILE,
    BundleProvenanceView,
    DsseEnvelope,
    ProvenanceKey,
    ProvenanceKeysView,
    ProvenancePredicate,
    Statement,
)

PINNED_FILE = "provenance-keys.json"
_MANIFEST = "manifest.json"
_RELOGIN = "run `fleet login` again (it pins the cloud's provenance key) or pass --key FILE"


class VerifiedBundle(BaseModel):
    """What `fleet models provenance --json` prints per bundle: every field here was checked."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: int
    device_class: str
    target_path: str
    bundle_sha256: str
    keyid: str
    statement: dict[str, Any]
    predicate: ProvenancePredicate


# -- pinned keys -------------------------------------------------------------------------------------------------


def pinned_path(env: Mapping[str, str] | None = None) -> Path:
    return config_path(env).parent / PINNED_FILE


def save_pinned(url: str, keys: list[ProvenanceKey], path: Path | None = None) -> Path:
    path = path or pinned_path()
    body = {"url": url, "pinned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "keys": [k.to_dict() for k in keys]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, (json.dumps(body, indent=1) + "\n").encode(), 0o644)  # public keys
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def load_pinned(url: str, path: Path | None = None) -> list[ProvenanceKey]:
    """The keys `fleet login` pinned for `url`; Unverified when there are none for it."""
    path = path or pinned_path()
    try:
        data = json.loads(path.read_bytes())
        pinned_url, keys = data["url"], [ProvenanceKey.model_validate(k) for k in data["keys"]]
    except FileNotFoundError:
        raise Unverified(f"no provenance key is pinned ({path} does not exist): {_RELOGIN}") from None
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"{path} is unreadable ({type(exc).__name__}): {_RELOGIN}") from None
    if pinned_url.rstrip("/") != url.rstrip("/"):
        raise Unverified(f"the pinned provenance key is for {pinned_url}, not {url}: {_RELOGIN}")
    if not keys:
        raise Unverified(f"{path} pins no key: {_RELOGIN}")
    return keys


def load_key_file(path: Path) -> list[ProvenanceKey]:
    """Keys from a PEM public key, or JSON: one key, a list of keys, or the keys route's `{"keys": [...]}`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --key {path}: {exc.strerror or exc}") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return [dsse.key_from_pem(raw)]
        data = json.loads(raw)
        if isinstance(data, dict) and "keys" in data:
            return ProvenanceKeysView.model_validate(data).keys
        items = data if isinstance(data, list) else [data]
        keys = [ProvenanceKey.model_validate(k) for k in items]
        for key in keys:
            dsse.public_key(key)
        return keys
    except (SignatureError, ValueError, ValidationError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(f"--key {path} is neither a PEM ed25519 public key nor provenance key JSON ({reason})") \
            from None


# -- verification ------------------------------------------------------------------------------------------------


def _statement(envelope: DsseEnvelope, keys: list[ProvenanceKey], where: str) -> tuple[Statement, ProvenanceKey]:
    try:
        payload, key = dsse.verify(envelope, keys, PAYLOAD_TYPE)
    except SignatureError as exc:
        raise Unverified(f"{where}: {exc}") from None
    try:
        statement = Statement.model_validate_json(payload)
    except ValidationError as exc:
        raise Unverified(f"{where}: the signed payload is not an in-toto Statement v1 ({exc.errors()[0]['msg']})") \
            from None
    if statement.predicate_type != PREDICATE_TYPE:
        raise Unverified(f"{where}: predicateType is {statement.predicate_type!r}, not {PREDICATE_TYPE!r}")
    return statement, key


def _members(archive: bytes, names: list[str], where: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for name in names:
                try:
                    handle = tar.extractfile(tar.getmember(name))
                except KeyError:
                    continue
                if handle is not None:
                    found[name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise Unverified(f"{where}: the bundle is not a readable gzip tar ({exc})") from None
    return found


def verify_bundle(view: BundleProvenanceView, archive: bytes, keys: list[ProvenanceKey], *,
                  asked: tuple[str, int, str | None] | None = None) -> VerifiedBundle:
    """`asked`: the (name, version, class or None) the user asked for; a signed statement about anything else (an
    old bundle's, replayed) is refused even though its signature is good."""
    where = f"{view.model} v{view.version} for {view.device_class}"
    if view.envelope is None:
        raise Unverified(f"{where}: the bundle carries no provenance (built before the cloud recorded it)")
    outer, key = _statement(view.envelope, keys, f"{where}, the statement over the bundle")
    try:
        facts = ProvenancePredicate.model_validate(outer.predicate)
    except ValidationError as exc:
        raise Unverified(f"{where}: the predicate is not edgefleet provenance v1 ({exc.errors()[0]['msg']})") \
            from None
    if (facts.model.name, facts.model.version, facts.target.device_class, facts.target.target_path) != (
            view.model, view.version, view.device_class, view.target_path):
        raise Unverified(f"{where}: the signed statement is about {facts.model.name} v{facts.model.version} for "
                         f"{facts.target.device_class} ({facts.target.target_path}), not this bundle")
    if asked is not None and ((asked[0], asked[1]) != (facts.model.name, facts.model.version)
                              or asked[2] not in (None, facts.target.device_class)):
        wanted = f"{asked[0]} v{asked[1]}" + (f" for {asked[2]}" if asked[2] else "")
        raise Unverified(f"{where}: the cloud answered with a signed statement about {facts.model.name} "
                         f"v{facts.model.version} for {facts.target.device_class}, not {wanted} as asked")
    signed_digest = outer.digest_of(view.target_path)
    actual = hashlib.sha256(archive).hexdigest()
    if signed_digest != actual:
        raise Unverified(f"{where}: the bundle's sha256 is {actual[:16]}..., the signed statement says "
                         f"{(signed_digest or 'nothing')[:16]}...: the bundle is not the one that was signed")
    # The archive is the signed one from here on.
    got = _members(archive, [_MANIFEST, facts.model.file, PROVENANCE_FILE], where)
    model_digest = hashlib.sha256(got.get(facts.model.file, b"")).hexdigest()
    if facts.model.file not in got or outer.digest_of(facts.model.file) != model_digest:
        raise Unverified(f"{where}: {facts.model.file} in the bundle does not match the signed digest")
    if PROVENANCE_FILE not in got or _MANIFEST not in got:
        raise Unverified(f"{where}: the bundle lacks {PROVENANCE_FILE} or {_MANIFEST}")
    try:
        manifest = Manifest.model_validate_json(got[_MANIFEST])
        embedded = DsseEnvelope.model_validate_json(got[PROVENANCE_FILE])
    except ValidationError as exc:
        raise Unverified(f"{where}: the bundle's {_MANIFEST} or {PROVENANCE_FILE} does not parse "
                         f"({exc.errors()[0]['msg']})") from None
    listed = {f.path: f.sha256 for f in manifest.files}
    if listed.get(PROVENANCE_FILE) != hashlib.sha256(got[PROVENANCE_FILE]).hexdigest():
        raise Unverified(f"{where}: the manifest does not list {PROVENANCE_FILE} with its sha256")
    inner, _ = _statement(embedded, keys, f"{where}, the statement inside the bundle")
    if inner.digest_of(facts.model.file) != model_digest or inner.predicate != outer.predicate:
        raise Unverified(f"{where}: the statement inside the bundle and the one over it disagree")
    if view.embedded is not None and view.embedded != embedded:
        raise Unverified(f"{where}: the envelope the cloud served is not the one inside the bundle")
    return VerifiedBundle(model=view.model, version=view.version, device_class=view.device_class,
                          target_path=view.target_path, bundle_sha256=actual, keyid=key.keyid,
                          statement=outer.to_dict(), predicate=facts)


__all__ = ["PINNED_FILE", "VerifiedBundle", "load_key_file", "load_pinned", "pinned_path", "save_pinned",
           "verify_bundle"]
