"""Key rotation on the cloud: cloud/trust/repository.py (TUF roles, offline root), cloud/trust/desired.py (the
desired-state key chain), cloud/trust/rotation.py, and `Fleet.refresh_expiring` re-signing after a key change.

What agents make of it is tests/edge_agent/test_trust_rotation.py; here: versions, signatures, files, refusals,
crash recovery and a second process seeing the change.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from edgefleet.cloud.errors import CloudError, Conflict, Invalid
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.cloud.trust import desired as desired_module
from edgefleet.cloud.trust import root_rotation as root_rotation_module
from edgefleet.cloud.trust.keys import load_signer
from edgefleet.cloud.trust.rotation import publish_desired_keys, rotate_desired, sign_root_file, take_root_offline
from edgefleet.edge_agent.trust import DesiredStateVerifier
from edgefleet.protos.messages import DESIRED_KEYS_TARGET, DesiredState, EnrollRequest

ROLES = ("root", "targets", "snapshot", "timestamp")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def root_md(repo: TufRepository, version: int) -> Metadata[Root]:
    return Metadata[Root].from_bytes((repo.metadata_dir / f"{version}.root.json").read_bytes())


def latest(repo: TufRepository, role: str) -> Metadata:
    name = "timestamp.json" if role == "timestamp" else f"{repo.versions[role]}.{role}.json"
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def follows(repo: TufRepository, version: int) -> bool:
    """Root `version` is signed by the threshold of the root before it and by its own (TUF 5.3.4)."""
    new, old = root_md(repo, version), root_md(repo, version - 1)
    return new.signed.get_root_verification_result(old.signed, new.signed_bytes, new.signatures).verified


# ------------------------------------------------------------------------------------------------ TUF, online root


@pytest.mark.parametrize("role", ROLES)
def test_rotate_key_publishes_the_next_root_and_signs_with_the_new_key(tmp_path: Path, role: str):
    repo = TufRepository(tmp_path / "tuf")
    repo.add_target("a.tar.gz", b"a")
    old = repo.keyids()[role]
    new = repo.rotate_key(role)
    assert repo.versions["root"] == 2 and follows(repo, 2)
    assert repo.keyids()[role] == [new] and new not in old
    assert load_signer(repo.keys_dir / f"{role}.pem").public_key.keyid == new
    assert not list(repo.keys_dir.glob("*.next.pem"))
    if role != "root":
        root2 = root_md(repo, 2)
        root2.verify_delegate(role, latest(repo, role))  # what the rotation re-signed carries the new signature
        if role == "timestamp":
            assert set(latest(repo, role).signatures) == {new}  # the commit after root 2: the new key alone
    repo.add_target("b.tar.gz", b"b")
    again = TufRepository(tmp_path / "tuf")
    assert again.versions == repo.versions and again.get_target("b.tar.gz") is not None


def test_a_rotation_stopped_after_root_is_written_is_completed_on_reopen(tmp_path: Path, monkeypatch):
    repo = TufRepository(tmp_path / "tuf")

    def power_cut(staged: Path, path: Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(root_rotation_module, "promote", power_cut)
    with pytest.raises(OSError):
        repo.rotate_key("snapshot")
    assert (repo.keys_dir / "snapshot.next.pem").exists() and (repo.metadata_dir / "2.root.json").exists()
    monkeypatch.undo()
    again = TufRepository(tmp_path / "tuf")
    assert again.versions["root"] == 2 and not (repo.keys_dir / "snapshot.next.pem").exists()
    again.add_target("a.tar.gz", b"a")
    root_md(again, 2).verify_delegate("snapshot", latest(again, "snapshot"))


def test_a_second_process_sees_the_rotation_before_it_signs(tmp_path: Path):
    serving = TufRepository(tmp_path / "tuf")
    cli = TufRepository(tmp_path / "tuf")  # `edgefleet-cloud keys rotate` while `serve` runs
    new = cli.rotate_key("targets")
    assert serving.versions["root"] == 2  # a read reloads: timestamp.json changed on disk
    serving.add_target("a.tar.gz", b"a")
    assert set(latest(serving, "targets").signatures) == {new}
    root_md(serving, 2).verify_delegate("targets", latest(serving, "targets"))


# ------------------------------------------------------------------------------------------------ offline root


@pytest.fixture
def offline(tmp_path: Path) -> tuple[TufRepository, Path]:
    key_file = tmp_path / "usb" / "root.pem"
    key_file.parent.mkdir()
    take_root_offline(TufRepository(tmp_path / "tuf"), key_file)
    return TufRepository(tmp_path / "tuf", offline_root=True), key_file


def test_take_root_offline_moves_the_key_and_the_flag_is_enforced(tmp_path: Path, offline):
    repo, key_file = offline
    assert not (repo.keys_dir / "root.pem").exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert load_signer(key_file).public_key.keyid == repo.keyids()["root"][0]
    assert repo.root_online is False
    with pytest.raises(Conflict, match="offline already"):
        take_root_offline(repo, tmp_path / "again.pem")
    (repo.keys_dir / "root.pem").write_bytes(key_file.read_bytes())
    with pytest.raises(CloudError, match="tuf_offline_root is set, but .* holds the root key"):
        TufRepository(tmp_path / "tuf", offline_root=True)
    with pytest.raises(CloudError, match="no TUF repository .* yet"):
        TufRepository(tmp_path / "new", offline_root=True)


def test_offline_root_still_signs_online_roles_and_refuses_to_rotate_here(tmp_path: Path, offline, caplog):
    repo, _ = offline
    repo.add_target("a.tar.gz", b"a")
    assert repo.refresh_timestamp(force=True) is True
    with pytest.raises(Invalid, match="root key is offline: run `edgefleet-cloud keys export-root"):
        repo.rotate_key("targets")

    clock = Clock()
    aging = TufRepository(tmp_path / "tuf", offline_root=True, clock=clock)
    clock.now += timedelta(days=200)  # past half of root's 365 days: root cannot be re-signed here
    with caplog.at_level(logging.WARNING, logger="edgefleet.cloud.trust.repository"):
        assert aging.refresh_timestamp() is True  # timestamp/snapshot are stale by now, and re-signed
        assert aging.refresh_timestamp() is False  # root alone stays stale, but is no reason to re-sign
    assert aging.versions["root"] == 1
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "expires" in caplog.records[0].message and "export-root" in caplog.records[0].message


def test_export_sign_import_with_a_staged_key(tmp_path: Path, offline):
    repo, key_file = offline
    exported = tmp_path / "next.json"
    exported.write_bytes(repo.export_root(rotate=["timestamp"]))
    with pytest.raises(Invalid, match=r"needs 1 signature\(s\) by root v1's root keys \(has 0\)"):
        repo.import_root(exported.read_bytes())
    summary = sign_root_file(exported, [key_file])
    assert summary["version"] == 2 and summary["signed_by"] == repo.keyids()["root"]
    assert repo.import_root(exported.read_bytes()) == 2
    assert follows(repo, 2) and load_signer(repo.keys_dir / "timestamp.pem").public_key.keyid == \
        repo.keyids()["timestamp"][0]
    with pytest.raises(Invalid, match="root v2 does not follow the current root v2"):
        repo.import_root(exported.read_bytes())


def test_import_refuses_a_root_naming_a_key_this_cloud_does_not_hold(tmp_path: Path, offline):
    repo, key_file = offline
    first = tmp_path / "first.json"
    first.write_bytes(repo.export_root(rotate=["targets"]))
    (tmp_path / "second.json").write_bytes(repo.export_root(rotate=["targets"]))  # a new staged key replaces it
    sign_root_file(first, [key_file])
    with pytest.raises(Invalid, match="lists a targets key .* this cloud does not hold"):
        repo.import_root(first.read_bytes())
    with pytest.raises(Invalid, match="not TUF root metadata"):
        repo.import_root(b"{}")
    with pytest.raises(Invalid, match="cannot stage a key for 'root'"):
        repo.export_root(rotate=["root"])


def test_an_offline_root_key_rotation_needs_both_keys(tmp_path: Path, offline):
    repo, old_key = offline
    new_key = tmp_path / "usb" / "root-2.pem"
    fresh = CryptoSigner.generate_ed25519()
    new_key.write_bytes(fresh.private_bytes)
    exported = tmp_path / "next.json"
    exported.write_bytes(repo.export_root(root_keys=[fresh.public_key]))
    sign_root_file(exported, [old_key])
    with pytest.raises(Invalid, match=r"and 1 by its own \(has 0\)"):
        repo.import_root(exported.read_bytes())
    sign_root_file(exported, [new_key])
    assert repo.import_root(exported.read_bytes()) == 2 and repo.keyids()["root"] == [fresh.public_key.keyid]
    third = tmp_path / "third.json"
    third.write_bytes(repo.export_root())
    sign_root_file(third, [old_key])  # the rotated-out key alone no longer counts
    with pytest.raises(Invalid, match="not signed enough"):
        repo.import_root(third.read_bytes())


def test_import_into_an_online_root_refuses_to_drop_the_root_key_it_holds(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    fresh = CryptoSigner.generate_ed25519()
    md = Metadata[Root].from_bytes(repo.export_root(root_keys=[fresh.public_key]))
    md.sign(load_signer(repo.keys_dir / "root.pem"))
    md.sign(fresh, append=True)
    with pytest.raises(Invalid, match="take that key offline first"):
        repo.import_root(md.to_bytes())


# ------------------------------------------------------------------------------------------------ desired-state key


def sample_state() -> DesiredState:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return DesiredState(device_id="dev-1", device_class="rpi4", generation=1, issued_at=now,
                        expires_at=now + timedelta(hours=1))


def test_desired_key_rotation_in_two_steps(tmp_path: Path):
    signer = DesiredStateSigner(tmp_path / "keys")
    old = signer.keyid
    assert signer.documents() == [] and [k["keyid"] for k in signer.public_keys()] == [old]
    with pytest.raises(Conflict, match="no desired-state key rotation is under way"):
        signer.finish_rotation()

    v1 = signer.start_rotation().payload
    new = load_signer(signer.next_key_path).public_key.keyid
    assert (v1.version, [k["keyid"] for k in v1.keys], v1.revoked) == (1, [old, new], [])
    assert signer.signing_keyids() == {old, new} and signer.rotating
    assert {s.keyid for s in signer.sign(sample_state()).signatures} == {old, new}
    with pytest.raises(Conflict, match="already under way"):
        signer.start_rotation()

    v2 = signer.finish_rotation().payload
    assert (v2.version, [k["keyid"] for k in v2.keys], v2.revoked) == (2, [new], [old])
    assert signer.keyid == new and not signer.next_key_path.exists() and not signer.rotating
    assert [s.keyid for s in signer.sign(sample_state()).signatures] == [new]
    # the chain is what an agent enrolled before the rotation walks
    verifier = DesiredStateVerifier([{**load_signer(signer.key_path).public_key.to_dict(), "keyid": new}])
    assert verifier.update_keys([d.to_dict() for d in signer.documents()]) and verifier.ring.version == 2
    assert DesiredStateSigner(tmp_path / "keys").public_keys() == signer.public_keys()


def test_a_finish_stopped_before_the_key_moved_is_completed_on_reopen(tmp_path: Path, monkeypatch):
    signer = DesiredStateSigner(tmp_path / "keys")
    signer.start_rotation()
    new = load_signer(signer.next_key_path).public_key.keyid

    def power_cut(staged: Path, path: Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(desired_module, "promote", power_cut)
    with pytest.raises(OSError):
        signer.finish_rotation()
    monkeypatch.undo()
    again = DesiredStateSigner(tmp_path / "keys")
    assert again.keyid == new and again.signing_keyids() == {new} and not again.next_key_path.exists()


def test_another_process_sees_a_desired_key_rotation(tmp_path: Path):
    serving = DesiredStateSigner(tmp_path / "keys")
    cli = DesiredStateSigner(tmp_path / "keys")
    cli.start_rotation()
    assert len(serving.sign(sample_state()).signatures) == 2
    cli.finish_rotation()
    assert serving.signing_keyids() == cli.signing_keyids() and len(serving.public_keys()) == 1


def test_key_lists_are_published_as_tuf_targets_once(tmp_path: Path):
    repo = TufRepository(tmp_path / "tuf")
    signer = DesiredStateSigner(tmp_path / "keys")
    assert publish_desired_keys(signer, repo) == 0
    rotate_desired(signer, repo, finish=False)
    rotate_desired(signer, repo, finish=True)
    versions = repo.versions
    assert publish_desired_keys(signer, repo) == 2 and repo.versions == versions  # nothing new to sign
    targets = latest(repo, "targets").signed.targets
    for doc in signer.documents():
        target = targets[DESIRED_KEYS_TARGET.format(version=doc.payload.version)]
        assert target.custom == doc.to_dict()


def test_refresh_resigns_every_document_after_the_keys_changed(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    fleet = Fleet.from_settings(settings)
    published: list = []
    fleet.publish = lambda device_id, doc: published.append((device_id, doc))
    try:
        for device in ("dev-1", "dev-2"):
            fleet.enroll(EnrollRequest(device_id=device, device_class="rpi4"))
        assert fleet.refresh_expiring() == 0  # fresh documents, signed by the one key
        cli = DesiredStateSigner(settings.keys_dir)  # `edgefleet-cloud keys rotate`, another process
        cli.start_rotation()
        published.clear()
        assert fleet.refresh_expiring() == 2 and fleet.refresh_expiring() == 0
        assert {d for d, _ in published} == {"dev-1", "dev-2"}
        assert all(len(doc.signatures) == 2 for _, doc in published)
        assert len(fleet.enroll(EnrollRequest(device_id="dev-3", device_class="rpi4")).desired_state_keys) == 2
        cli.finish_rotation()  # documents signed by both still verify, but carry the revoked key: re-signed
        published.clear()
        assert fleet.refresh_expiring() == 3
        assert all([s.keyid for s in doc.signatures] == [cli.keyid] for _, doc in published)
    finally:
        fleet.close()
