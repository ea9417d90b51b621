"""The cloud's TUF repository and desired-state signer: layout, keys, versions, reopen, expiry refresh, threads."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Key, Signature
from tuf.api.metadata import Metadata, Root, Timestamp

from edgefleet.cloud.errors import CloudError, Invalid
from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.protos.messages import DesiredModel, DesiredState

ROLES = ("root", "targets", "snapshot", "timestamp")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(repo: TufRepository) -> set[str]:
    return {p.name for p in repo.metadata_dir.iterdir()}


def test_first_start_makes_keys_0600_and_version_1_metadata(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    assert names(repo) == {"1.root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"}
    assert repo.versions == dict.fromkeys(ROLES, 1)
    assert mode(repo.keys_dir) == 0o700
    for role in ROLES:
        assert mode(repo.keys_dir / f"{role}.pem") == 0o600
    root = Metadata[Root].from_dict(repo.root())
    assert root.signed.consistent_snapshot is True
    keyids = [root.signed.roles[r].keyids[0] for r in ROLES]
    assert len(set(keyids)) == 4, "one key per role"
    assert all(root.signed.get_key(k).keytype == "ed25519" for k in keyids)
    root.verify_delegate("root", root)


def test_add_target_bumps_targets_snapshot_timestamp(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    data = b"bundle bytes" * 100
    info = repo.add_target("bundles/digits/v1/rpi4.tar.gz", data)
    assert (info.length, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert repo.versions == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert {"2.targets.json", "2.snapshot.json"} <= names(repo)
    assert repo.get_target("bundles/digits/v1/rpi4.tar.gz") == info

    # timestamp pins the exact snapshot bytes (version, length, sha256); snapshot pins the targets version
    ts = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())["signed"]["meta"]["snapshot.json"]
    snap_bytes = (repo.metadata_dir / "2.snapshot.json").read_bytes()
    assert ts == {"version": 2, "length": len(snap_bytes), "hashes": {"sha256": hashlib.sha256(snap_bytes).hexdigest()}}
    assert json.loads(snap_bytes)["signed"]["meta"]["targets.json"]["version"] == 2

    assert repo.add_target("bundles/digits/v1/rpi4.tar.gz", data) == info
    assert repo.versions["targets"] == 2, "same bytes again: no new version"
    repo.add_target("bundles/digits/v1/rpi4.tar.gz", data + b"!")
    assert repo.versions == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 3}


@pytest.mark.parametrize("bad", ["", "/abs/x", "../x", "a/../b", "a//b", "a/./b", "a b", "a/", "x\\y", "%2e%2e/x"])
def test_bad_target_paths_are_refused(tmp_path: Path, bad: str):
    repo = TufRepository(tmp_path / "tuf")
    with pytest.raises(Invalid, match="invalid TUF target path"):
        repo.add_target(bad, b"x")
    assert repo.versions["targets"] == 1


def test_reopen_keeps_keys_and_continues_versions(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    repo.add_target("a.tar.gz", b"a")
    keys_before = {role: (repo.keys_dir / f"{role}.pem").read_bytes() for role in ROLES}
    root_before, versions = repo.root(), repo.versions

    again = TufRepository(tmp_path / "tuf")
    assert again.root() == root_before
    assert again.versions == versions
    assert {role: (again.keys_dir / f"{role}.pem").read_bytes() for role in ROLES} == keys_before
    again.add_target("b.tar.gz", b"b")
    assert again.versions == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 3}
    assert again.get_target("a.tar.gz") is not None and again.get_target("b.tar.gz") is not None
    assert TufRepository(tmp_path / "tuf").versions == again.versions


def test_reopen_refuses_metadata_altered_on_disk(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    repo.add_target("a.tar.gz", b"a")
    path = repo.metadata_dir / "2.targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["targets"]["a.tar.gz"]["length"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(CloudError, match="fails its signature check"):
        TufRepository(tmp_path / "tuf")


def test_reopen_refuses_a_key_root_does_not_trust(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    (repo.keys_dir / "snapshot.pem").write_bytes(CryptoSigner.generate_ed25519().private_bytes)
    with pytest.raises(CloudError, match="snapshot key .* is not the one 1.root.json trusts"):
        TufRepository(tmp_path / "tuf")


def test_refresh_resigns_only_what_is_past_half_its_expiry(tmp_path: Path):
    clock = Clock()
    repo = TufRepository(tmp_path / "tuf", timestamp_expiry_s=3600, snapshot_expiry_s=7200, targets_expiry_s=100_000,
                         root_expiry_s=200_000, clock=clock)
    assert repo.refresh_timestamp() is False
    assert repo.refresh_timestamp(force=True) is True
    assert repo.versions == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 2}

    clock.now += timedelta(seconds=1801)  # past half of the timestamp's hour
    assert repo.refresh_timestamp() is True
    assert repo.versions == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 3}
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    assert ts.signed.expires == (clock.now + timedelta(seconds=3600)).replace(microsecond=0)

    clock.now += timedelta(seconds=3601)  # snapshot (2 h) now past half too
    assert repo.refresh_timestamp() is True
    assert repo.versions == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 4}

    clock.now += timedelta(seconds=100_001)  # root and targets past half: root 2 is signed by the same root key
    assert repo.refresh_timestamp() is True
    assert repo.versions == {"root": 2, "targets": 2, "snapshot": 3, "timestamp": 5}
    root1 = Metadata[Root].from_bytes((repo.metadata_dir / "1.root.json").read_bytes())
    root2 = Metadata[Root].from_bytes((repo.metadata_dir / "2.root.json").read_bytes())
    root1.verify_delegate("root", root2)
    assert repo.root()["signed"]["version"] == 2


def test_old_versions_are_pruned_but_roots_kept(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf", keep_versions=3)
    for i in range(5):
        repo.add_target(f"t{i}.tar.gz", bytes([i]))
    assert repo.versions["targets"] == 6
    assert names(repo) == {"1.root.json", "timestamp.json", "4.snapshot.json", "5.snapshot.json", "6.snapshot.json",
                           "4.targets.json", "5.targets.json", "6.targets.json"}


def test_concurrent_add_target_loses_nothing(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    errors: list[BaseException] = []

    def add(worker: int) -> None:
        try:
            for i in range(5):
                repo.add_target(f"bundles/w{worker}/v{i}.tar.gz", f"{worker}-{i}".encode())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert repo.versions["targets"] == 41
    reopened = TufRepository(tmp_path / "tuf")
    assert all(reopened.get_target(f"bundles/w{w}/v{i}.tar.gz") for w in range(8) for i in range(5))


def test_desired_state_signer_key_is_0600_and_reused(tmp_path: Path):
    first = DesiredStateSigner(tmp_path / "keys")
    assert mode(first.key_path) == 0o600
    second = DesiredStateSigner(tmp_path / "keys")
    assert second.public_keys() == first.public_keys()
    (key,) = first.public_keys()
    assert key["keyid"] == first.keyid and key["keytype"] == "ed25519" and key["scheme"] == "ed25519"

    first.key_path.chmod(0o644)
    DesiredStateSigner(tmp_path / "keys")
    assert mode(first.key_path) == 0o600, "a loosened key file is tightened on load"


def test_desired_state_signature_covers_canonical_json_of_the_payload(tmp_path: Path):
    signer = DesiredStateSigner(tmp_path / "keys")
    now = datetime.now(timezone.utc)
    state = DesiredState(device_id="dev-1", device_class="rpi4", generation=3, issued_at=now,
                         expires_at=now + timedelta(hours=1),
                         models=[DesiredModel(name="digits", version=2, bundle_target="bundles/digits/v2/rpi4.tar.gz")])
    signed = signer.sign(state)
    (key_dict,) = signer.public_keys()
    body = dict(key_dict)
    key = Key.from_dict(body.pop("keyid"), body)
    (sig,) = signed.signatures
    # over the model's JSON dict, and over the dict decoded from the wire: the same canonical bytes
    for payload in (state.model_dump(mode="json"), json.loads(signed.to_wire())["payload"]):
        key.verify_signature(Signature(sig.keyid, sig.sig), encode_canonical(payload).encode())


def test_first_start_interrupted_before_timestamp_starts_again_with_the_same_keys(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    keyids = repo.root()["signed"]["roles"]["targets"]["keyids"]
    (repo.metadata_dir / "timestamp.json").unlink()
    again = TufRepository(tmp_path / "tuf")
    assert again.versions == dict.fromkeys(ROLES, 1)
    assert again.root()["signed"]["roles"]["targets"]["keyids"] == keyids

    again.add_target("a.tar.gz", b"a")
    (again.metadata_dir / "timestamp.json").unlink()  # after a commit, a lost timestamp is not silently reset
    with pytest.raises(CloudError, match="timestamp.json is missing"):
        TufRepository(tmp_path / "tuf")
