"""A corpus of hostile bundles for edge_agent/unpack.py, shared by tests/edge_agent/test_unpack_corpus.py and
bench/hostile_archives.py.

    CASES: list[Case]    Case(id, build(outside: Path) -> gzip bytes, expected: str, limits: UnpackLimits)

`build` gets a folder outside the staging directory: cases that try to write there aim at it, and the test checks
nothing appeared. `expected` is a fragment of the BundleError message. Headers are written byte by byte here
(`header`), because tarfile refuses to write most of these; the good members come from tarfile itself.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.edge_agent.unpack import BLOCK, MAX_LONGNAME_BYTES, MAX_PAX_BYTES, UnpackLimits
from tests.edge_agent import agent_testkit as kit

END = b"\0" * (2 * BLOCK)
BOMB_BYTES = 64 * 1024 * 1024  # inflated size of the bombs: 4,000 times the tests' 16 KiB cap on extended headers


def header(name: bytes, kind: bytes = b"0", size: int = 0, *, size_field: bytes | None = None,
           magic: bytes = b"ustar\x0000", linkname: bytes = b"", prefix: bytes = b"",
           checksum_delta: int = 0) -> bytes:
    """One 512-byte tar header, fields as given (no checks: that is the point)."""
    block = bytearray(BLOCK)
    block[0:len(name[:100])] = name[:100]
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[156:157] = kind
    block[157:157 + len(linkname)] = linkname
    block[257:265] = magic
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) + checksum_delta)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, kind, len(data)) + padded(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    n = len(key) + len(value) + 3
    length = n + len(str(n))
    length = n + len(str(length))
    return b"%d %s=%s\n" % (length, key, value)


def pax(body: bytes, kind: bytes = b"x") -> bytes:
    return header(b"././@PaxHeader", kind, len(body)) + padded(body)


def good_tar(files: dict[str, bytes] | None = None, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """The members of a valid bundle as tarfile writes them, without the end-of-archive blocks."""
    files = files if files is not None else kit.bundle_files()
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=fmt)
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
        tf.addfile(info, io.BytesIO(data))
    end = tf.offset
    tf.close()
    return buf.getvalue()[:end]


def gz(*parts: bytes) -> bytes:
    return gzip.compress(b"".join(parts), compresslevel=9, mtime=0)


def gz_stream(parts: Iterator[bytes]) -> bytes:
    """gzip of a stream too large to hold (the bombs), compressed as it is made."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [comp.compress(p) for p in parts]
    return b"".join(out) + comp.flush()


def zeros(n: int) -> Iterator[bytes]:
    chunk = b"\0" * (1 << 20)
    while n > 0:
        yield chunk[: min(n, len(chunk))]
        n -= len(chunk)


def with_manifest(extra: dict[str, bytes], edit: Callable[[dict], None] | None = None) -> dict[str, bytes]:
    """The good bundle's files plus `extra`, listed in the manifest (then `edit`ed)."""
    files = kit.bundle_files()
    manifest = json.loads(files["manifest.json"])
    manifest["files"] += [{"path": p, "sha256": kit.sha(d), "size": len(d)} for p, d in extra.items()]
    if edit is not None:
        edit(manifest)
    return {**files, "manifest.json": json.dumps(manifest).encode(), **extra}


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], bytes]
    expected: str
    limits: UnpackLimits = field(default_factory=UnpackLimits)


SMALL = UnpackLimits(max_total_bytes=1024 * 1024, max_members=16)


def _cve_2024_6232_records() -> bytes:
    # The regex loop of tarfile < 3.11.10 lets a keyword run on past its record to the next '=': records without
    # one make each match scan the rest of the header (quadratic). Framed strictly, the first record is refused.
    return b"5 aa\n" * 800 + b"12 path=abc\n"


CASES: list[Case] = [
    Case("dotdot", lambda o: gz(good_tar(), member(b"../evil", b"x"), END), "'..' is not allowed"),
    Case("nested dotdot", lambda o: gz(good_tar(), member(b"smoke/../../evil", b"x"), END), "'..' is not allowed"),
    Case("absolute path", lambda o: gz(good_tar(), member(str(o / "abs-evil").encode(), b"x"), END),
         "absolute paths are not allowed"),
    Case("absolute via pax path", lambda o: gz(good_tar(), pax(pax_record(b"path", str(o / "pax-evil").encode())),
                                               member(b"harmless", b"x"), END), "absolute paths are not allowed"),
    Case("symlink out", lambda o: gz(good_tar(), header(b"link", b"2", linkname=str(o).encode()),
                                     member(b"link/evil", b"x"), END), "is a symlink"),
    Case("hardlink", lambda o: gz(good_tar(), header(b"hard", b"1", linkname=b"/etc/passwd"), END),
         "is a hard link"),
    Case("char device", lambda o: gz(good_tar(), header(b"null", b"3"), END), "is a device"),
    Case("block device", lambda o: gz(good_tar(), header(b"sda", b"4"), END), "is a device"),
    Case("fifo", lambda o: gz(good_tar(), header(b"fifo", b"6"), END), "is a FIFO"),
    Case("sparse", lambda o: gz(good_tar(), header(b"sparse", b"S", 10), padded(b"x" * 10), END),
         "is a sparse file"),
    Case("global pax header", lambda o: gz(pax(pax_record(b"path", b"x"), b"g"), good_tar(), END),
         "is a global pax header"),
    Case("unknown type", lambda o: gz(good_tar(), header(b"vol", b"V", 4), padded(b"abcd"), END),
         "an unsupported type"),
    Case("duplicate", lambda o: gz(good_tar(), member(b"model.onnx", b"again"), END), "appears more than once"),
    Case("case duplicate", lambda o: gz(good_tar(), member(b"MODEL.onnx", b"again"), END), "appears more than once"),
    Case("huge declared size", lambda o: gz(good_tar(), header(b"big", size_field=b"77777777777\0"), END),
         "exceeds the unpacked size cap"),
    Case("huge size via pax", lambda o: gz(good_tar(), pax(pax_record(b"size", b"99999999999")),
                                           member(b"big", b"x"), END), "exceeds the unpacked size cap"),
    Case("negative base-256 size", lambda o: gz(good_tar(), header(b"neg", size_field=b"\xff" * 12), END),
         "is not an octal number"),
    Case("decompression bomb", lambda o: gz_stream(iter([good_tar(), header(b"zeros", size=BOMB_BYTES),
                                                         *zeros(BOMB_BYTES), END])),
         "exceeds the unpacked size cap", SMALL),
    Case("bomb spread over members", lambda o: gz(*(member(f"f{i}".encode(), b"\0" * 300_000) for i in range(8)),
                                                  END), "exceeds the unpacked size cap", SMALL),
    Case("pax header bomb", lambda o: gz_stream(iter([header(b"././@PaxHeader", b"x", BOMB_BYTES),
                                                      *zeros(BOMB_BYTES), END])),
         f"at most {MAX_PAX_BYTES} are allowed"),
    Case("long name bomb", lambda o: gz_stream(iter([header(b"././@LongLink", b"L", BOMB_BYTES),
                                                     *zeros(BOMB_BYTES), END])),
         f"at most {MAX_LONGNAME_BYTES} are allowed"),
    Case("pax record without '=' (CVE-2024-6232)", lambda o: gz(pax(_cve_2024_6232_records()),
                                                                member(b"x", b"x"), END), "malformed record"),
    Case("pax digit run (CVE-2024-6232)", lambda o: gz(pax(pax_record(b"comment", b"1" * 3000)),
                                                       member(b"x", b"x"), END), "run of 3000 digits"),
    Case("pax hdrcharset", lambda o: gz(pax(pax_record(b"hdrcharset", b"BINARY")), member(b"x", b"x"), END),
         "'hdrcharset'"),
    Case("pax sparse map", lambda o: gz(pax(pax_record(b"GNU.sparse.map", b"0,1")), member(b"x", b"x"), END),
         "'GNU.sparse.map'"),
    Case("pax size not a number", lambda o: gz(pax(pax_record(b"size", b"+5")), member(b"x", b"x"), END),
         "is not a number"),
    Case("pax length past its end", lambda o: gz(pax(b"99 path=x\n"), member(b"x", b"x"), END), "malformed record"),
    # tarfile reads no data after a directory whatever its size says (and takes an old-style "\0" entry named
    # "x/" for one): the block after it is a header, which the guard must check as one.
    Case("directory claiming data", lambda o: gz(good_tar(), header(b"d", b"5", BLOCK),
                                                 header(b"././@PaxHeader", b"x", BOMB_BYTES), END),
         f"at most {MAX_PAX_BYTES} are allowed"),
    Case("old-style directory claiming data", lambda o: gz(good_tar(), header(b"d/", b"\0", BLOCK),
                                                           header(b"././@PaxHeader", b"x", BOMB_BYTES), END),
         f"at most {MAX_PAX_BYTES} are allowed"),
    Case("two extended headers", lambda o: gz(pax(pax_record(b"path", b"a")), pax(pax_record(b"path", b"b")),
                                              member(b"x", b"x"), END), "two extended headers in a row"),
    Case("extended header at the end", lambda o: gz(good_tar(), pax(pax_record(b"path", b"a")), END),
         "ends right after an extended header"),
    Case("name over 255 characters", lambda o: gz(good_tar(), pax(pax_record(b"path", b"a" * 300)),
                                                  member(b"x", b"x"), END), "name too long"),
    Case("NUL in a pax path", lambda o: gz(good_tar(), pax(pax_record(b"path", b"model.onnx\0evil")),
                                           member(b"x", b"x"), END), "NUL in the name"),
    Case("too many members", lambda o: gz(*(member(f"f{i}".encode(), b"") for i in range(40)), END),
         "more than 16 members", SMALL),
    Case("bad checksum", lambda o: gz(good_tar(), header(b"x", checksum_delta=1), END), "bad checksum"),
    Case("v7 header without magic", lambda o: gz(header(b"x", magic=b"\0" * 8), END), "not a ustar/pax header"),
    Case("mode not octal", lambda o: gz(good_tar(), _with(header(b"x"), 100, b"0009999\0"), END),
         "mode field"),
    Case("truncated in a header", lambda o: gz(good_tar(), header(b"x", size=4)[:300]), "truncated"),
    Case("truncated in the data", lambda o: gz(good_tar(), header(b"x", size=4096), b"abc"), "truncated"),
    Case("no end of archive", lambda o: gz(good_tar()), "truncated"),
    Case("not gzip", lambda o: good_tar() + END, "not a valid gzip tar archive"),
    Case("extra file", lambda o: gz(good_tar(), member(b"extra.bin", b"x"), END), "'extra.bin' is not listed"),
    Case("manifest size lies", lambda o: _lying_manifest(size=4), "'notes.txt' is 5 bytes; the manifest says 4"),
    Case("manifest hash lies", lambda o: _lying_manifest(sha256="0" * 64), "'notes.txt' has sha256"),
    Case("manifest names another file", lambda o: _lying_manifest(path="ghost.bin"),
         "'notes.txt' is not listed in the manifest"),
    Case("manifest lists a missing file",
         lambda o: gz(good_tar(kit.bundle_files() | {"manifest.json": _manifest_with_ghost()}), END),
         "'ghost.bin' is listed in the manifest but missing"),
]


def _lying_manifest(**entry: object) -> bytes:
    """A bundle with notes.txt whose manifest entry is changed by `entry`."""
    files = with_manifest({"notes.txt": b"hello"}, lambda m: m["files"][-1].update(entry))
    return gz(good_tar(files), END)


def _with(block: bytes, at: int, value: bytes) -> bytes:
    """`block` with bytes at `at` replaced and the checksum made right again."""
    raw = bytearray(block)
    raw[at:at + len(value)] = value
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    return bytes(raw)


def _manifest_with_ghost() -> bytes:
    manifest = json.loads(kit.bundle_files()["manifest.json"])
    manifest["files"].append({"path": "ghost.bin", "sha256": "0" * 64, "size": 1})
    return json.dumps(manifest).encode()


# Archives that look odd but are good bundles: the guard must not refuse what tarfile writers produce.
def good_with_long_names(fmt: int) -> bytes:
    """A bundle with a 200-character file name: a pax `path` record (PAX_FORMAT) or a GNU long name."""
    return gz(good_tar(with_manifest({"smoke/" + "n" * 194: b"notes"}), fmt), END)


def good_then_zeros(n: int = BOMB_BYTES) -> bytes:
    """A good bundle whose gzip stream goes on after the end-of-archive block with `n` zero bytes (a bomb the
    unpacker never inflates: tarfile and the guard both stop at the end)."""
    return gz_stream(iter([good_tar(), END, *zeros(n)]))
