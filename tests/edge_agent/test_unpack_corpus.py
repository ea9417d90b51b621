"""edge_agent/unpack.py against the hostile-archive corpus (tests/edge_agent/hostile_archives.py).

Every case is refused with a BundleError naming what is wrong, writes nothing outside the staging directory, and
costs at most MEMORY_BOUND of Python memory (tracemalloc peak) however large the archive says it is: the bombs
inflate to 64 MiB, and before the guard tarfile read a pax header or GNU long name of that size whole into memory
(a 261 KB archive cost 666 MB). Timings are not asserted here; bench/hostile_archives.py measures them.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from edgefleet.edge_agent.errors import BundleError
from edgefleet.edge_agent.unpack import MAX_PAX_BYTES, UnpackLimits, unpack_bundle
from tests.edge_agent import hostile_archives as corpus

# The guard's own buffers (a 256 KiB inflate step, a 64 KiB read) plus tarfile's and the 1 MiB write chunk.
MEMORY_BOUND = 8 * 1024 * 1024


def tree(root: Path) -> dict[str, int]:
    """Every path under `root` (links not followed) with its file type bits."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = stat.S_IFMT(path.lstat().st_mode)
    return out


def unpack_measured(archive: Path, staging: Path, limits: UnpackLimits) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        unpack_bundle(archive, staging, limits)
        error = None
    except BaseException as exc:  # noqa: BLE001 - handed back to the test to judge
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.id for c in corpus.CASES])
def test_hostile_archive_is_refused_within_bounds(tmp_path, case):
    work = tmp_path / "work"
    outside = tmp_path / "outside"  # what the escaping cases aim at
    outside.mkdir()
    work.mkdir()
    archive = work / "bundle.tar.gz"
    archive.write_bytes(case.build(outside))
    staging = work / "stage"
    before = tree(tmp_path)

    error, peak = unpack_measured(archive, staging, case.limits)

    assert peak < MEMORY_BOUND, f"{case.id}: {peak / 2**20:.1f} MiB of Python memory ({error!r})"
    assert isinstance(error, BundleError), f"{case.id}: {error!r}"
    assert case.expected in str(error), f"{case.id}: {error}"
    after = tree(tmp_path)
    new = set(after) - set(before)
    assert all(p == "work/stage" or p.startswith("work/stage/") for p in new), sorted(new)
    assert all(after[p] in (stat.S_IFREG, stat.S_IFDIR) for p in new), {p: after[p] for p in new}
    assert not any(outside.iterdir()) and not Path("/etc/evil").exists()


def test_the_corpus_covers_every_kind_of_attack():
    ids = " ".join(c.id for c in corpus.CASES)
    for kind in ("dotdot", "absolute", "symlink", "hardlink", "device", "fifo", "bomb", "duplicate",
                 "huge declared size", "manifest", "pax", "too many members", "CVE-2024-6232"):
        assert kind in ids, kind
    assert len(corpus.CASES) >= 12


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax path", "gnu long name"])
def test_long_names_written_by_tarfile_still_unpack(tmp_path, fmt):
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(corpus.good_with_long_names(fmt))
    manifest = unpack_bundle(archive, tmp_path / "stage")
    assert ("smoke/" + "n" * 194) in {f.path for f in manifest.files}
    assert (tmp_path / "stage" / "smoke" / ("n" * 194)).read_bytes() == b"notes"


def test_a_bomb_after_the_end_of_archive_is_never_inflated(tmp_path):
    """tarfile and the guard both stop at the end-of-archive block: 64 MiB of zeros behind it cost nothing."""
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(corpus.good_then_zeros())
    error, peak = unpack_measured(archive, tmp_path / "stage", UnpackLimits(max_total_bytes=1024 * 1024))
    assert error is None and peak < MEMORY_BOUND


def test_compressed_size_is_capped_before_reading(tmp_path):
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(corpus.gz(corpus.good_tar(), corpus.END))
    with pytest.raises(BundleError, match=r"limits.bundle_max_mb"):
        unpack_bundle(archive, tmp_path / "stage", UnpackLimits(max_archive_bytes=archive.stat().st_size - 1))


def test_a_pax_header_at_the_cap_is_read_and_one_byte_over_is_not(tmp_path):
    filler = b"x" * (MAX_PAX_BYTES - len(corpus.pax_record(b"comment", b"")) - 1)
    record = corpus.pax_record(b"comment", filler)
    while len(record) > MAX_PAX_BYTES:
        filler = filler[:-1]
        record = corpus.pax_record(b"comment", filler)
    files = corpus.kit.bundle_files()
    ok = corpus.gz(corpus.pax(record), corpus.good_tar(files), corpus.END)
    (tmp_path / "ok.tar.gz").write_bytes(ok)
    unpack_bundle(tmp_path / "ok.tar.gz", tmp_path / "ok")
    over = corpus.gz(corpus.pax(record + b"9 a=bcd\n"), corpus.good_tar(files), corpus.END)
    (tmp_path / "over.tar.gz").write_bytes(over)
    with pytest.raises(BundleError, match=f"at most {MAX_PAX_BYTES} are allowed"):
        unpack_bundle(tmp_path / "over.tar.gz", tmp_path / "over")
