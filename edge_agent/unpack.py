"""Safe extraction of a bundle (a gzip tar) into a staging directory, then a check of every file against its manifest.

Theory of operation: the archive's bytes were verified against trusted TUF metadata before they get here, but the
checks below do not rely on that: a signed bundle from a compromised build must still not write outside its
staging dir. So `tarfile` is used only to READ members; every member is checked by our own rules and written by
our own code (`open(..., "xb")` under the staging dir), never by `extract`/`extractall`, so no extraction filter,
Python version or tar feature decides what reaches the disk.

Cost first: tarfile itself never reads the archive. It reads (stream mode, "r|") from `_GuardedTar`, which gunzips
the file in small steps and checks every header, and every extended header whole, before tarfile gets a byte of
it: the compressed size (`max_archive_bytes`), the decompressed stream so far (`max_stream_bytes`), the member
count, the declared sizes against the unpacked cap, a pax header of at most MAX_PAX_BYTES framed record by record,
a GNU long name of at most MAX_LONGNAME_BYTES, octal numbers, checksums. That bounds what any archive costs (time
linear in at most `max_stream_bytes` of inflate, a few MiB of memory) and keeps CPython's header parsers away from
the inputs that make them slow: before 3.11.10 / 3.12.6 crafted pax headers of a few hundred compressed bytes cost
20 s to over 200 s (CVE-2024-6232), and a 261 KB archive cost 666 MB before it was refused.

A member is accepted only if it is a regular file (directory entries are skipped: the folders are made from the
file paths), its name is a clean relative '/'-path (no absolute path, no '..' or '.', no backslash, no empty
part), it is not a duplicate (also after case folding, for case-insensitive file systems), and the member count and
the total unpacked bytes stay within the caps. Symlinks, hard links, devices, FIFOs and sparse files are refused.
tarfile must see the same members, at the same offsets, as the guard did. Anything refused raises `BundleError`
naming the member.

Then `manifest.json` is parsed as a `Manifest`, and the tree must hold exactly the manifest's `files` (size and
sha256 each) plus `manifest.json`: nothing missing, nothing extra. Every file is fsynced, so a power cut after the
unpack phase is saved cannot leave an empty file that a later phase trusts; `check_tree` re-runs the check anyway
when an install resumes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgefleet.common.fsutil import fsync_dir
from edgefleet.edge_agent.errors import BundleError
from edgefleet.protos.messages import Manifest, MessageError, parse_message

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_MAX_NAME_CHARS = 255  # FileEntry.path allows 255
_MAX_DEPTH = 8

BLOCK = 512  # a tar header or data block
_RECORD = 20 * BLOCK  # tar pads its end to a record
_IN_CHUNK = 64 * 1024  # compressed bytes read at a time
_OUT_CHUNK = 256 * 1024  # decompressed bytes made at a time: what one step of a gzip bomb can cost
# A pax extended header: a 255-character path, a size and a few times need under 400 bytes. tarfile before 3.11.10
# (CVE-2024-6232) parses these with regular expressions that are quadratic in its length (measured on 3.11.7: 4 KiB
# of digits 55 ms, 64 KiB 13 s), so both the length and the runs of digits are capped before tarfile sees one.
MAX_PAX_BYTES = 4096
_MAX_PAX_DIGIT_RUN = 32  # the longest number a record holds is a 20-digit size or time
# A GNU long name: 255 characters of up to four UTF-8 bytes each, and its NUL.
MAX_LONGNAME_BYTES = 1024
_USTAR_MAGIC = (b"ustar\x0000", b"ustar  \x00")  # POSIX (what tarfile writes), GNU
_REGULAR, _DIRECTORY, _PAX, _LONGNAME = (b"0", b"\x00", b"7"), b"5", b"x", b"L"
_NOT_FILES = {b"1": "a hard link", b"2": "a symlink", b"3": "a device", b"4": "a device", b"6": "a FIFO",
              b"S": "a sparse file", b"K": "a long link name", b"g": "a global pax header",
              b"X": "a Solaris extended header"}


@dataclass(frozen=True)
class UnpackLimits:
    max_total_bytes: int = 2048 * 1024 * 1024  # limits.unpacked_max_mb
    max_members: int = 64  # limits.unpacked_max_files
    max_archive_bytes: int = 512 * 1024 * 1024  # limits.bundle_max_mb: the compressed file

    @classmethod
    def from_config(cls, config) -> UnpackLimits:
        return cls(int(config.limits.unpacked_max_mb * 1024 * 1024), config.limits.unpacked_max_files,
                   int(config.limits.bundle_max_mb * 1024 * 1024))

    @property
    def max_stream_bytes(self) -> int:
        """The most decompressed tar a bundle within the other caps can be: its files, and per member a header,
        an extended header with its own header, and padding, then the end-of-archive record."""
        return self.max_total_bytes + self.max_members * (3 * BLOCK + MAX_PAX_BYTES + BLOCK) + 2 * _RECORD


def _check_name(raw: str) -> str:
    name = raw
    if not name or "\x00" in name:
        raise BundleError(f"bundle member {raw!r}: empty or NUL in the name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle member {raw!r}: absolute paths are not allowed")
    if "\\" in name:
        raise BundleError(f"bundle member {raw!r}: backslashes are not allowed in member names")
    parts = name.split("/")
    if any(p in ("..",) for p in parts):
        raise BundleError(f"bundle member {raw!r}: '..' is not allowed in member names")
    if any(p in ("", ".") for p in parts):
        raise BundleError(f"bundle member {raw!r}: '.' or empty path parts are not allowed")
    if len(name) > _MAX_NAME_CHARS or len(parts) > _MAX_DEPTH:
        raise BundleError(f"bundle member {raw!r}: name too long or too deep")
    return name


def _check_type(member: tarfile.TarInfo) -> None:
    what = (
        "a symlink" if member.issym() else
        "a hard link" if member.islnk() else
        "a FIFO" if member.isfifo() else  # before isdev(): tarfile counts FIFOs as devices
        "a device" if member.isdev() else
        "a sparse file" if member.issparse() else
        None if member.isreg() else
        f"an unsupported type {member.type!r}"
    )
    if what is not None:
        raise BundleError(f"bundle member {member.name!r} is {what}; only regular files are allowed")


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: int) -> int:
    target = dest / member.name
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tf.extractfile(member)
    if src is None:  # not a regular file after all
        raise BundleError(f"bundle member {member.name!r} has no data")
    written = 0
    # "xb": never follow or replace something already there (a duplicate that slipped through would fail here).
    with src, open(target, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.size or written > budget:
                raise BundleError(f"bundle member {member.name!r} is larger than its header or the size cap")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, 0o644)
    return written


@dataclass(frozen=True)
class _Header:
    """A member as the guard read its headers: where tarfile must find it too."""

    offset: int  # of its first header (an extended header, if it has one)
    offset_data: int
    size: int
    next_offset: int  # where the next header starts: after the data (a directory has none)


def _octal(field: bytes, what: str, at: int) -> int:
    # Plain octal digits only, as tarfile writes them. tarfile also reads base-256 numbers, which can be negative
    # and send it looping (CVE-2025-8194); no bundle needs them.
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if text and not (text.isdigit() and b"8" not in text and b"9" not in text):
        raise BundleError(f"bundle header at byte {at}: {what} field {field!r} is not an octal number")
    return int(text, 8) if text else 0


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class _GuardedTar:
    """The bundle's decompressed tar stream, for `tarfile.open(fileobj=..., mode="r|")`.

    tarfile reads the stream front to back and only through `read`, which gunzips the archive itself (a step makes
    at most _OUT_CHUNK bytes, the total at most `limits.max_stream_bytes`) and passes on no header byte it has not
    checked: every 512-byte header (checksum, ustar magic, octal numbers, type, size against the caps, the member
    count), and every extended header whole (a pax header of at most MAX_PAX_BYTES, framed record by record as
    CPython 3.11.10 checks it, without the keys that change how data is laid out or decoded; a GNU long name of at
    most MAX_LONGNAME_BYTES). File data passes unchecked: tarfile only copies it. It stops at the end-of-archive
    block. So whatever the archive, tarfile parses only small, well-formed headers, and the cost of reading a
    bundle is bounded by the caps, whichever Python runs the agent. `headers` lists the members as read here;
    `unpack_bundle` checks that tarfile found the same ones.
    """

    def __init__(self, fh: BinaryIO, limits: UnpackLimits) -> None:
        self._fh = fh
        self._limits = limits
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing only: anything else is refused
        self._pending = bytearray()  # decompressed, not yet checked
        self._ready = bytearray()  # checked, for tarfile
        self._offset = 0  # stream offset of _pending[0]
        self._data_left = 0  # bytes of a member's data (with padding) still to pass on
        self._aux: tuple[bytes, int, int] | None = None  # an extended header: (type, size, offset of its header)
        self._aux_done: tuple[bytes, dict[bytes, bytes] | bytes, int] | None = None  # its content, read
        self._unpacked = 0
        self.inflated = 0
        self.headers: list[_Header] = []
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        if size < 0:  # never "all of it": tarfile asks in records, and the whole stream may be gigabytes
            size = _OUT_CHUNK
        while len(self._ready) < size and not self.ended:
            self._pull()
        n = min(size, len(self._ready))
        out = bytes(self._ready[:n])
        del self._ready[:n]
        return out

    def _pull(self) -> None:
        data = self._inflater.unconsumed_tail
        if not data:
            data = b"" if self._inflater.eof else self._fh.read(_IN_CHUNK)
            if not data:
                if self.inflated == 0 and not self._inflater.eof:
                    raise BundleError("bundle is not a valid gzip tar archive: the file is empty or not gzip")
                raise BundleError(f"bundle is truncated: the gzip stream ends after {self.inflated} bytes of tar, "
                                  "before the end-of-archive block")
        try:
            out = self._inflater.decompress(data, _OUT_CHUNK)
        except zlib.error as exc:
            raise BundleError(f"bundle is not a valid gzip tar archive: {exc}") from None
        self.inflated += len(out)
        if self.inflated > self._limits.max_stream_bytes:
            raise BundleError(f"bundle decompresses to more than {self._limits.max_stream_bytes} bytes, more than "
                              "the unpacked size and member caps allow (a decompression bomb?)")
        self._pending += out
        self._scan()

    def _release(self, n: int) -> None:
        self._ready += self._pending[:n]
        del self._pending[:n]
        self._offset += n

    def _scan(self) -> None:
        while not self.ended:
            if self._data_left:
                n = min(self._data_left, len(self._pending))
                if n == 0:
                    return
                self._release(n)
                self._data_left -= n
            elif self._aux is not None:
                kind, size, _ = self._aux
                need = -(-size // BLOCK) * BLOCK
                if len(self._pending) < need:
                    return
                self._read_aux(bytes(self._pending[:need]))
                self._release(need)
            elif len(self._pending) >= BLOCK:
                self._read_header(bytes(self._pending[:BLOCK]))
                self._release(BLOCK)
            else:
                return

    def _read_header(self, block: bytes) -> None:
        at = self._offset
        if block.count(0) == BLOCK:  # the end-of-archive block: tarfile stops here too
            if self._aux is not None or self._aux_done is not None:
                raise BundleError(f"bundle ends right after an extended header (at byte {at})")
            self.ended = True
            return
        checksum = _octal(block[148:156], "checksum", at)
        if checksum != 256 + sum(block[:148]) + sum(block[156:]):  # the checksum field counts as 8 spaces
            raise BundleError(f"bundle header at byte {at} has a bad checksum: not a tar archive, or a damaged one")
        if block[257:265] not in _USTAR_MAGIC:
            raise BundleError(f"bundle header at byte {at} is not a ustar/pax header (magic {block[257:265]!r})")
        for what, lo, hi in (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("mtime", 136, 148),
                             ("devmajor", 329, 337), ("devminor", 337, 345)):
            _octal(block[lo:hi], what, at)
        kind = block[156:157]
        size = _octal(block[124:136], "size", at)
        raw_name = block[:100].split(b"\x00", 1)[0]
        prefix = block[345:500].split(b"\x00", 1)[0]
        if kind in (_PAX, _LONGNAME):
            if self._aux is not None or self._aux_done is not None:
                raise BundleError(f"bundle has two extended headers in a row at byte {at}; one per member at most")
            cap, what = (MAX_PAX_BYTES, "pax header") if kind == _PAX else (MAX_LONGNAME_BYTES, "GNU long name")
            if size > cap:
                raise BundleError(f"bundle has a {what} of {size} bytes at byte {at}; at most {cap} are allowed")
            self._aux = (kind, size, at)
            return
        name = _text(prefix + b"/" + raw_name if prefix else raw_name)
        first = at
        if self._aux_done is not None:
            aux_kind, content, first = self._aux_done
            self._aux_done = None
            if aux_kind == _LONGNAME:
                assert isinstance(content, bytes)
                name = _text(content)
            else:
                assert isinstance(content, dict)
                name = _text(content.get(b"path", name.encode()))
                if b"size" in content:
                    size = int(content[b"size"])
        if len(self.headers) >= self._limits.max_members:
            raise BundleError(f"bundle has more than {self._limits.max_members} members (at {name!r})")
        if kind in _NOT_FILES or kind not in (*_REGULAR, _DIRECTORY):
            what = _NOT_FILES.get(kind, f"an unsupported type {kind!r}")
            raise BundleError(f"bundle member {name!r} is {what}; only regular files are allowed")
        # As tarfile reads them: an old-style "\0" entry named with a trailing '/' is a directory; no data follows
        # a directory whatever its size says.
        regular = kind != _DIRECTORY and not (kind == b"\x00" and raw_name.endswith(b"/"))
        if regular:
            if self._unpacked + size > self._limits.max_total_bytes:
                raise BundleError(f"bundle member {name!r} ({size} bytes) exceeds the unpacked size cap of "
                                  f"{self._limits.max_total_bytes} bytes")
            self._unpacked += size
            self._data_left = -(-size // BLOCK) * BLOCK
        self.headers.append(_Header(first, at + BLOCK, size, at + BLOCK + self._data_left))

    def _read_aux(self, data: bytes) -> None:
        assert self._aux is not None
        kind, size, at = self._aux
        self._aux = None
        body, padding = data[:size], data[size:]
        if padding.count(0) != len(padding):
            raise BundleError(f"bundle extended header at byte {at} has bytes after its declared size")
        if kind == _LONGNAME:
            self._aux_done = (kind, body.split(b"\x00", 1)[0], at)
            return
        records = _pax_records(body, at)
        for key in records:
            if key == b"hdrcharset" or key.startswith(b"GNU.sparse"):
                raise BundleError(f"bundle pax header at byte {at} has {_text(key)!r}, which no bundle needs")
        if b" hdrcharset=" in body:  # tarfile before 3.11.10 searches the whole header for it, values included
            raise BundleError(f"bundle pax header at byte {at} mentions hdrcharset")
        if b"size" in records and not records[b"size"].isdigit():
            raise BundleError(f"bundle pax header at byte {at}: size {_text(records[b'size'])!r} is not a number")
        self._aux_done = (kind, records, at)


def _pax_records(body: bytes, at: int) -> dict[bytes, bytes]:
    """The records of a pax header ("%d %s=%s\\n", the length counting the whole record), framed strictly."""
    longest = max((len(run) for run in re.findall(rb"[0-9]+", body)), default=0)
    if longest > _MAX_PAX_DIGIT_RUN:
        raise BundleError(f"bundle pax header at byte {at} has a run of {longest} digits; at most "
                          f"{_MAX_PAX_DIGIT_RUN} are allowed")
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        space = body.find(b" ", pos, pos + 21)
        length = int(body[pos:space]) if space > pos and body[pos:space].isdigit() else 0
        end = pos + length
        key, eq, value = body[space + 1:end - 1].partition(b"=")
        if length < 5 or end > len(body) or body[end - 1:end] != b"\n" or not eq or not key or b"\x00" in key \
                or b"\n" in key:
            raise BundleError(f"bundle pax header at byte {at} has a malformed record at offset {pos}")
        records[key] = value  # the last one wins, as in tarfile
        pos = end
    return records


def unpack_bundle(archive: str | Path, dest: str | Path, limits: UnpackLimits = UnpackLimits()) -> Manifest:
    """Extract `archive` into the empty or new directory `dest`, check it, and return its manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"staging directory {dest} is not empty")
    seen: set[str] = set()
    total = 0
    count = 0
    try:
        with open(archive, "rb") as fh:
            compressed = os.fstat(fh.fileno()).st_size
            if compressed > limits.max_archive_bytes:
                raise BundleError(f"bundle is {compressed} bytes; the cap is {limits.max_archive_bytes} "
                                  "(limits.bundle_max_mb)")
            stream = _GuardedTar(fh, limits)
            # "r|": tarfile reads the stream once, front to back, through the guard; the guard does the gunzip.
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for member in tf:  # streaming: headers are checked one by one, before anything is written
                    count += 1
                    # The same member at the same place, and the same idea of where the next header starts (so
                    # tarfile never takes data the guard passed unchecked for a header).
                    if count > len(stream.headers) or (member.offset, member.offset_data, member.size, tf.offset) \
                            != ((h := stream.headers[count - 1]).offset, h.offset_data, h.size, h.next_offset):
                        raise BundleError(f"bundle member {member.name!r}: tarfile reads its headers differently "
                                          "from the checks; refused")
                    _check_name(member.name)
                    if member.isdir():
                        continue
                    _check_type(member)
                    folded = member.name.casefold()
                    if folded in seen:
                        raise BundleError(f"bundle member {member.name!r} appears more than once")
                    seen.add(folded)
                    if member.size < 0 or total + member.size > limits.max_total_bytes:
                        raise BundleError(
                            f"bundle member {member.name!r} ({member.size} bytes) exceeds the unpacked size cap of "
                            f"{limits.max_total_bytes} bytes"
                        )
                    total += _write_member(tf, member, dest, limits.max_total_bytes - total)
            if not stream.ended or count != len(stream.headers):
                # tarfile stops quietly at a header it cannot parse; the guard read on to the end.
                raise BundleError(f"bundle: tarfile read {count} members where the checks found "
                                  f"{len(stream.headers)}; refused")
    except BundleError:
        raise
    except (tarfile.TarError, zlib.error, EOFError) as exc:
        raise BundleError(f"bundle is not a valid gzip tar archive: {exc}") from None
    except OSError as exc:
        raise BundleError(f"bundle could not be unpacked: {exc}") from None
    for d in sorted({p for p in dest.rglob("*") if p.is_dir()} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    manifest = read_manifest(dest)
    check_tree(dest, manifest)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle has no {MANIFEST_NAME}") from None
    try:
        return parse_message(raw, Manifest)
    except MessageError as exc:
        raise BundleError(f"bundle {MANIFEST_NAME}: {exc}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_tree(directory: str | Path, manifest: Manifest) -> None:
    """The tree holds exactly `manifest.files` (size and sha256) plus manifest.json; raise BundleError otherwise."""
    directory = Path(directory)
    listed = {entry.path: entry for entry in manifest.files}
    if len(listed) != len(manifest.files):
        raise BundleError("bundle manifest lists a file more than once")
    if MANIFEST_NAME in listed:
        raise BundleError(f"bundle manifest must not list {MANIFEST_NAME} in its files")
    for needed in (manifest.model_file, manifest.smoke_test.input_file, manifest.smoke_test.expected_file):
        if needed not in listed:
            raise BundleError(f"bundle manifest names {needed!r} but does not list it in its files")
    present: set[str] = set()
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"bundle file {rel!r} is not a regular file")
        if path.is_file():
            present.add(rel)
    extra = sorted(present - set(listed) - {MANIFEST_NAME})
    if extra:
        raise BundleError(f"bundle file {extra[0]!r} is not listed in the manifest")
    for rel, entry in listed.items():
        path = directory / rel
        if rel not in present:
            raise BundleError(f"bundle file {rel!r} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {rel!r} is {size} bytes; the manifest says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(f"bundle file {rel!r} has sha256 {digest[:12]}..., "
                              f"the manifest says {entry.sha256[:12]}...")
