"""edge_agent/unpack.py: a good bundle unpacks; every kind of garbage is refused with BundleError naming it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from edgefleet.edge_agent.errors import BundleError
from edgefleet.edge_agent.unpack import UnpackLimits, check_tree, unpack_bundle
from tests.edge_agent import agent_testkit as kit


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(data)
    return path


def good_members():
    return [kit.file_member(n, d) for n, d in kit.bundle_files().items()]


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def test_good_bundle_unpacks_and_checks(tmp_path):
    dest = tmp_path / "stage"
    manifest = unpack_bundle(write(tmp_path, kit.make_bundle()), dest)
    assert manifest.name == "digits" and manifest.version == 1
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "manifest.json", "model.onnx", "smoke/expected.npz", "smoke/input.npz"]
    check_tree(dest, manifest)


def test_directory_entries_are_tolerated(tmp_path):
    d = tarfile.TarInfo("smoke")
    d.type = tarfile.DIRTYPE
    unpack_bundle(write(tmp_path, kit.tar_gz([(d, None)] + good_members())), tmp_path / "stage")


GARBAGE = [
    ("dotdot", lambda: good_members() + [kit.file_member("../evil", b"x")], "'..' is not allowed"),
    ("nested dotdot", lambda: good_members() + [kit.file_member("smoke/../../evil", b"x")], "'..' is not allowed"),
    ("absolute", lambda: good_members() + [kit.file_member("/etc/evil", b"x")], "absolute paths"),
    ("dot part", lambda: good_members() + [kit.file_member("./model2.onnx", b"x")], "'.' or empty path parts"),
    ("backslash", lambda: good_members() + [kit.file_member("a\\b", b"x")], "backslashes"),
    ("symlink", lambda: good_members() + [special("link", tarfile.SYMTYPE, "/etc/passwd")], "is a symlink"),
    ("hardlink", lambda: good_members() + [special("hard", tarfile.LNKTYPE, "model.onnx")], "is a hard link"),
    ("chardev", lambda: good_members() + [special("dev", tarfile.CHRTYPE)], "is a device"),
    ("fifo", lambda: good_members() + [special("fifo", tarfile.FIFOTYPE)], "is a FIFO"),
    ("duplicate", lambda: good_members() + [kit.file_member("model.onnx", b"again")], "appears more than once"),
    ("case duplicate", lambda: good_members() + [kit.file_member("MODEL.onnx", b"again")], "appears more than once"),
    ("extra file", lambda: good_members() + [kit.file_member("extra.bin", b"x")], "'extra.bin' is not listed"),
    ("missing file", lambda: [m for m in good_members() if m[0].name != "smoke/input.npz"],
     "'smoke/input.npz' is listed in the manifest but missing"),
    ("no manifest", lambda: [m for m in good_members() if m[0].name != "manifest.json"], "no manifest.json"),
]


@pytest.mark.parametrize("case,members,expected", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_refused(tmp_path, case, members, expected):
    with pytest.raises(BundleError) as info:
        unpack_bundle(write(tmp_path, kit.tar_gz(members())), tmp_path / "stage")
    assert expected in str(info.value)
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_huge_member_refused_by_header_before_reading(tmp_path):
    info = tarfile.TarInfo("model.onnx")
    info.size = 10 * 1024 * 1024
    # The header claims 10 MiB; the cap is 1 MiB, so nothing is read or written.
    data = kit.tar_gz([(info, b"\0" * info.size)])
    with pytest.raises(BundleError, match="exceeds the unpacked size cap"):
        unpack_bundle(write(tmp_path, data), tmp_path / "stage", UnpackLimits(max_total_bytes=1024 * 1024))
    assert not (tmp_path / "stage" / "model.onnx").exists()


def test_member_count_cap(tmp_path):
    members = [kit.file_member(f"f{i}", b"x") for i in range(10)]
    with pytest.raises(BundleError, match="more than 5 members"):
        unpack_bundle(write(tmp_path, kit.tar_gz(members)), tmp_path / "stage", UnpackLimits(max_members=5))


@pytest.mark.parametrize("data", [b"", b"not gzip at all", b"\x1f\x8b\x08\x00garbage-after-magic" * 3])
def test_non_gzip_bytes(tmp_path, data):
    with pytest.raises(BundleError, match="not a valid gzip tar"):
        unpack_bundle(write(tmp_path, data), tmp_path / "stage")


def test_plain_tar_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in good_members():
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="not a valid gzip tar"):
        unpack_bundle(write(tmp_path, buf.getvalue()), tmp_path / "stage")


def test_truncated_archive(tmp_path):
    data = kit.make_bundle()
    with pytest.raises(BundleError):
        unpack_bundle(write(tmp_path, data[: len(data) // 2]), tmp_path / "stage")


def test_hash_mismatch_names_the_file(tmp_path):
    files = kit.bundle_files()
    files["model.onnx"] = files["model.onnx"][:-1] + bytes([files["model.onnx"][-1] ^ 1])  # same size, one bit
    with pytest.raises(BundleError, match="'model.onnx' has sha256"):
        unpack_bundle(write(tmp_path, kit.make_bundle(files)), tmp_path / "stage")


def test_size_mismatch(tmp_path):
    files = kit.bundle_files()
    files["model.onnx"] += b"\0"
    with pytest.raises(BundleError, match="'model.onnx' is .* bytes; the manifest says"):
        unpack_bundle(write(tmp_path, kit.make_bundle(files)), tmp_path / "stage")


def test_manifest_edited_to_invalid(tmp_path):
    files = kit.bundle_files()
    manifest = json.loads(files["manifest.json"])
    manifest["version"] = 0
    files["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(BundleError, match="manifest.json: invalid Manifest: version"):
        unpack_bundle(write(tmp_path, kit.make_bundle(files)), tmp_path / "stage")


def test_manifest_not_json(tmp_path):
    files = kit.bundle_files()
    files["manifest.json"] = b"\xff\xfe not json"
    with pytest.raises(BundleError, match="manifest.json"):
        unpack_bundle(write(tmp_path, kit.make_bundle(files)), tmp_path / "stage")


def test_staging_must_be_empty(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "x").write_bytes(b"")
    with pytest.raises(BundleError, match="not empty"):
        unpack_bundle(write(tmp_path, kit.make_bundle()), tmp_path / "stage")


def test_cloud_built_bundle_unpacks_and_passes_the_smoke_test(tmp_path):
    """The agent reads what cloud/bundles.py writes (the format in docs/internals.md)."""
    bundles = pytest.importorskip("edgefleet.cloud.bundles")
    from edgefleet.common.runtimes import make_runtime
    from edgefleet.edge_agent.apply import smoke_test
    from edgefleet.protos.messages import DeviceClassInfo, TensorSpec

    cls = DeviceClassInfo(name="x86-cpu", cores=4, memory_mb=1024, runtimes=["onnxruntime"], idle_watts=1,
                          active_watts=5)
    spec = [TensorSpec(name="x", dtype="float32", shape=[None, 3])]
    data, manifest = bundles.build_bundle(kit.affine_model(), name="digits", version=1, device_class=cls, inputs=spec,
                                          outputs=[TensorSpec(name="y", dtype="float32", shape=[None, 3])],
                                          created_at=kit.T0)
    got = unpack_bundle(write(tmp_path, data), tmp_path / "stage")
    assert got == manifest
    smoke_test(make_runtime("onnxruntime"), tmp_path / "stage", got)
