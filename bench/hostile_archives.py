"""What a hostile bundle costs the agent to refuse, and what the same archives cost Python's tarfile unguarded.

    .venv/bin/python bench/hostile_archives.py [--json] [--raw-timeout-s 30] [--good-mb 64]

Three parts, every figure from this machine and this Python (printed with them):

  corpus   every case of tests/edge_agent/hostile_archives.py through `unpack_bundle`: seconds to the refusal,
           tracemalloc peak, compressed size, and the first words of the BundleError
  raw      archives of the CVE-2024-6232 class and the extended-header bombs read by plain
           `tarfile.open(path, "r:gz")` (iterating the members, nothing extracted), each in a child process
           stopped after --raw-timeout-s, with its peak RSS; then the same archive through `unpack_bundle`
  good     a good bundle with a --good-mb random file: plain tarfile extraction against `unpack_bundle`, so the
           guard's cost on the path that matters is visible

On CPython before 3.11.10 / 3.12.6 the raw pax rows grow quadratically with the header's size (measured on 3.11.7:
16 KiB of digits about 0.8 s, 64 KiB about 13 s); on a fixed Python they are fast, and `unpack_bundle` refuses them
either way before tarfile parses them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.edge_agent.errors import BundleError  # noqa: E402
from edgefleet.edge_agent.unpack import UnpackLimits, unpack_bundle  # noqa: E402
from tests.edge_agent import hostile_archives as corpus  # noqa: E402

# VmHWM, not ru_maxrss: after exec, ru_maxrss still counts the parent's pages from before it.
RAW_CHILD = r"""
import json, sys, tarfile, time
t0 = time.perf_counter()
try:
    with tarfile.open(sys.argv[1], "r:gz") as tf:
        outcome = f"read {sum(1 for _ in tf)} members"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:60]}"
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "outcome": outcome, "peak_rss_mb": hwm / 1024}))
"""


def guarded(archive: Path, staging: Path, limits: UnpackLimits) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        unpack_bundle(archive, staging, limits)
        outcome = "unpacked"
    except BundleError as exc:
        outcome = str(exc)[:90]
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": round(seconds, 4), "peak_mb": round(peak / 2**20, 2), "outcome": outcome}


def raw_tarfile(archive: Path, timeout_s: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", RAW_CHILD, str(archive)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"seconds": f">{timeout_s:g}", "outcome": "still parsing when stopped", "peak_rss_mb": None}
    got = json.loads(done.stdout)
    return {"seconds": round(got["seconds"], 3), "outcome": got["outcome"], "peak_rss_mb": round(got["peak_rss_mb"])}


def raw_inputs() -> list[tuple[str, bytes]]:
    def digits(kib: int) -> bytes:
        return corpus.gz(corpus.pax(corpus.pax_record(b"comment", b"1" * (kib * 1024 - 20))),
                         corpus.member(b"x", b"x"), corpus.END)

    def no_equals(kib: int) -> bytes:
        return corpus.gz(corpus.pax(b"5 aa\n" * (kib * 1024 // 5) + b"12 path=abc\n"), corpus.member(b"x", b"x"),
                         corpus.END)

    bomb = 256 * 1024 * 1024
    return [
        ("pax digits 16 KiB", digits(16)),
        ("pax digits 64 KiB", digits(64)),
        ("pax digits 256 KiB", digits(256)),
        ("pax records without '=' 64 KiB", no_equals(64)),
        ("pax records without '=' 1 MiB", no_equals(1024)),
        ("GNU long name of 256 MiB", corpus.gz_stream(iter([corpus.header(b"././@LongLink", b"L", bomb),
                                                             *corpus.zeros(bomb), corpus.END]))),
        ("pax header of 256 MiB", corpus.gz_stream(iter([corpus.header(b"././@PaxHeader", b"x", bomb),
                                                          *corpus.zeros(bomb), corpus.END]))),
    ]


def good_bundle(work: Path, mb: int) -> tuple[Path, int]:
    big = os.urandom(mb * 1024 * 1024)
    files = corpus.with_manifest({"weights.bin": big})
    archive = work / "good.tar.gz"
    archive.write_bytes(corpus.gz(corpus.good_tar(files), corpus.END))
    return archive, len(big)


def read_through(archive: Path) -> dict[str, float]:
    """Seconds to inflate the archive with gzip alone, and through the guard (gunzip plus header checks)."""
    import gzip

    from edgefleet.edge_agent.unpack import _GuardedTar

    t0 = time.perf_counter()
    with gzip.open(archive, "rb") as fh:
        while fh.read(1 << 20):
            pass
    gzip_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(archive, "rb") as fh:
        stream = _GuardedTar(fh, UnpackLimits())
        while stream.read(1 << 20):
            pass
    return {"gzip_read_s": round(gzip_s, 3), "guard_read_s": round(time.perf_counter() - t0, 3)}


def plain_extract(archive: Path, dest: Path) -> float:
    import tarfile

    t0 = time.perf_counter()
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            src = tf.extractfile(member)
            if src is None:
                continue
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--raw-timeout-s", type=float, default=30.0)
    parser.add_argument("--good-mb", type=int, default=64)
    args = parser.parse_args()
    result: dict = {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "corpus": [], "raw": [], "good": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, case in enumerate(corpus.CASES):
            outside = work / f"outside{i}"
            outside.mkdir()
            archive = work / f"case{i}.tar.gz"
            archive.write_bytes(case.build(outside))
            row = {"case": case.id, "archive_bytes": archive.stat().st_size,
                   **guarded(archive, work / f"stage{i}", case.limits)}
            result["corpus"].append(row)
            archive.unlink()
        for i, (name, data) in enumerate(raw_inputs()):
            archive = work / f"raw{i}.tar.gz"
            archive.write_bytes(data)
            result["raw"].append({"input": name, "archive_bytes": len(data),
                                  "tarfile": raw_tarfile(archive, args.raw_timeout_s),
                                  "unpack_bundle": guarded(archive, work / f"raw-stage{i}", UnpackLimits())})
            archive.unlink()
        archive, size = good_bundle(work, args.good_mb)
        plain_s = plain_extract(archive, work / "plain")
        ours = guarded(archive, work / "guarded", UnpackLimits())
        result["good"] = {"file_mb": size / 2**20, "archive_mb": round(archive.stat().st_size / 2**20, 1),
                          "plain_tarfile_s": round(plain_s, 3), "unpack_bundle_s": ours["seconds"],
                          "unpack_bundle_peak_mb": ours["peak_mb"], "outcome": ours["outcome"],
                          **read_through(archive),
                          "note": "unpack_bundle also fsyncs every file and checks sha256 against the manifest"}
    if args.json:
        print(json.dumps(result))
        return
    print(f"Python {result['python']} on {result['machine']}, {result['cpus']} CPUs")
    print(f"\n{'corpus case':44} {'bytes':>9} {'s':>8} {'peak MiB':>9}  refusal")
    for row in result["corpus"]:
        print(f"{row['case'][:44]:44} {row['archive_bytes']:>9} {row['seconds']:>8.4f} {row['peak_mb']:>9.2f}  "
              f"{row['outcome'][:60]}")
    print(f"\n{'raw input':34} {'bytes':>8} {'tarfile s':>10} {'RSS MiB':>8} {'guard s':>8} {'MiB':>6}")
    for row in result["raw"]:
        t, g = row["tarfile"], row["unpack_bundle"]
        print(f"{row['input']:34} {row['archive_bytes']:>8} {t['seconds']!s:>10} {t['peak_rss_mb']!s:>8} "
              f"{g['seconds']:>8.4f} {g['peak_mb']:>6.2f}  tarfile: {t['outcome'][:40]}")
    good = result["good"]
    print(f"\ngood bundle, {good['file_mb']:.0f} MiB file: plain tarfile {good['plain_tarfile_s']} s, "
          f"unpack_bundle {good['unpack_bundle_s']} s (peak {good['unpack_bundle_peak_mb']} MiB; {good['note']})")
    print(f"inflating it: gzip alone {good['gzip_read_s']} s, through the guard {good['guard_read_s']} s")


if __name__ == "__main__":
    main()
