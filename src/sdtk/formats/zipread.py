"""A strict zip reader for PyTorch checkpoints: attacks live in the gaps between zip parsers.

We parse the central directory AND every local header and refuse any disagreement (names,
flags, methods, sizes, CRCs), duplicate names, encryption and unusual flag bits, data before the
first record, overlapping records, and compressed data whose inflated size is not bounded.
Problems are collected as `ZipIssue`s so `sdtk scan` can report all of them (and still look
inside the pickles); readers raise the first one.

Sources: PKWARE APPNOTE.TXT 6.3 (record layouts, ZIP64, data descriptors, flag bits),
caffe2/serialize/inline_container.cc + miniz (what torch writes and how it looks records up: by
central-directory name), CPython Lib/zipfile.py (name decoding: UTF-8 with flag bit 11, else cp437).
"""
from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from sdtk.crc import crc32
from sdtk.errors import FormatError, UnsafeFileError, UnsupportedFormatError
from sdtk.formats.source import RangeBuffer, unpack_at  # remote objects read in place

EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
DESCRIPTOR_SIG = b"PK\x07\x08"

STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED = 0x0001
FLAG_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
# Flag bits a plain archive may carry: deflate options (1, 2), data descriptor (3), UTF-8 names (11).
ALLOWED_FLAGS = 0x0002 | 0x0004 | FLAG_DESCRIPTOR | FLAG_UTF8
FLAG_NAMES = {0x0001: "encrypted", 0x0010: "enhanced deflate", 0x0020: "compressed patched data",
              0x0040: "strong encryption", 0x2000: "masked central directory"}
MAX_INFLATED = 1 << 30  # bound on a compressed record's inflated size (zip bombs)
# A deflated record we interpret (a pickle) may inflate to at most this many times its
# compressed size once it is over the caller's limit: the work stays linear in the file's size
# (deflate reaches ~1000:1 on repeated bytes; pickles compress 3-10:1). torch writes every
# record STORED, so a deflated data.pkl is already unusual.
MAX_INFLATE_RATIO = 32
INFLATE_CHUNK = 1 << 20
CRC_CHUNK = 64 << 20


@dataclass
class ZipIssue:
    """`kind` is "unsafe" (loaders could disagree on what the file holds) or "corrupt"."""

    kind: str
    message: str


@dataclass
class ZipEntry:
    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int = 0  # from the local header
    end_offset: int = 0  # after data and data descriptor
    crc_ok: Optional[bool] = None

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & (FLAG_ENCRYPTED | 0x0040))


@dataclass
class ZipArchive:
    path: str
    buf: object  # mmap or bytes of the whole file
    size: int
    entries: List[ZipEntry]
    issues: List[ZipIssue] = field(default_factory=list)

    def by_name(self) -> Dict[str, ZipEntry]:
        """Name -> entry (the last one wins for duplicates, like torch; readers refuse duplicates first)."""
        return {e.name: e for e in self.entries}

    def raise_issues(self) -> None:
        """Readers: the strictest reading wins, so the first problem stops reading."""
        for issue in self.issues:
            if issue.kind == "unsafe":
                raise UnsafeFileError(self.path, issue.message)
        for issue in self.issues:
            raise FormatError(self.path, issue.message)

    def raw(self, entry: ZipEntry) -> memoryview:
        """The record's stored bytes (compressed if it is compressed), a view of the file."""
        if isinstance(self.buf, RangeBuffer):  # a remote object: fetch just this record
            return memoryview(self.buf.read(entry.data_offset, entry.compressed_size))
        return memoryview(self.buf)[entry.data_offset:entry.data_offset + entry.compressed_size]

    def read(self, entry: ZipEntry, *, verify: bool = True, limit: Optional[int] = None) -> bytes:
        """The record's content (inflated, size bounded), CRC verified when `verify`.

        `limit`: the most bytes the caller will work on (a pickle it interprets); a deflated
        record over it AND over MAX_INFLATE_RATIO times its compressed size is refused as a
        deflate bomb before anything is inflated."""
        if entry.method == STORED:
            data = bytes(self.raw(entry))
        elif entry.method == DEFLATED:
            self._check_inflate(entry, limit)
            data = b"".join(self.inflate(entry))
        else:
            raise UnsupportedFormatError(self.path, f"zip record {entry.name!r} uses compression method {entry.method}")
        if verify:
            entry.crc_ok = (crc32(data) & 0xFFFFFFFF) == entry.crc
            if not entry.crc_ok:
                raise FormatError(self.path, f"CRC mismatch in zip record {entry.name!r} (the file is corrupt or was tampered with)")
        return data

    def _check_inflate(self, entry: ZipEntry, limit: Optional[int]) -> None:
        if entry.size > MAX_INFLATED:
            raise UnsupportedFormatError(self.path, f"zip record {entry.name!r} claims {entry.size} bytes inflated (over the 1 GiB bound)")
        if limit is not None and entry.size > limit and entry.size > MAX_INFLATE_RATIO * max(1, entry.compressed_size):
            raise UnsupportedFormatError(self.path, f"zip record {entry.name!r} inflates {entry.compressed_size} bytes to "
                                                    f"{entry.size} (a deflate bomb); refused")

    def inflate(self, entry: ZipEntry, head: Optional[int] = None) -> Iterator[bytes]:
        """The inflated content of a DEFLATED record in chunks of at most INFLATE_CHUNK bytes
        (memory stays bounded); never more than its recorded size (or `head` bytes, if given:
        only the start is inflated)."""
        inflater = zlib.decompressobj(-15)
        raw = self.raw(entry)
        done, pos, pending = 0, 0, b""
        try:
            while True:
                if not pending:
                    if pos >= len(raw):
                        break
                    pending = raw[pos:pos + INFLATE_CHUNK]
                    pos += len(pending)
                chunk = inflater.decompress(pending, INFLATE_CHUNK)
                pending = inflater.unconsumed_tail
                if chunk:
                    done += len(chunk)
                    if done > entry.size:
                        raise FormatError(self.path, f"zip record {entry.name!r} inflates to more than the {entry.size} bytes recorded")
                    if head is not None and done >= head:
                        yield chunk[:len(chunk) - (done - head)]
                        return
                    yield chunk
                if inflater.eof:
                    break
        except zlib.error as e:
            raise FormatError(self.path, f"zip record {entry.name!r} does not inflate ({e})") from None
        if head is None and (done != entry.size or not inflater.eof):
            raise FormatError(self.path, f"zip record {entry.name!r} inflates to a size other than the {entry.size} bytes recorded")

    def head(self, entry: ZipEntry, n: int) -> bytes:
        """The first `n` bytes of a record's content (inflating only those)."""
        if entry.method == STORED:
            return bytes(self.buf[entry.data_offset:entry.data_offset + min(n, entry.compressed_size)])
        if entry.method == DEFLATED:
            if entry.size > MAX_INFLATED:
                raise UnsupportedFormatError(self.path, f"zip record {entry.name!r} claims {entry.size} bytes inflated (over the 1 GiB bound)")
            return b"".join(self.inflate(entry, head=n))
        raise UnsupportedFormatError(self.path, f"zip record {entry.name!r} uses compression method {entry.method}")

    def verify_crc(self, entry: ZipEntry) -> bool:
        """Check a record's CRC (streaming over the mapped file for stored records, over bounded
        chunks of inflated data for deflated ones)."""
        if entry.crc_ok is not None:
            return entry.crc_ok
        if entry.method != STORED:
            crc = 0
            try:
                if entry.method == DEFLATED:
                    self._check_inflate(entry, None)
                    for chunk in self.inflate(entry):
                        crc = crc32(chunk, crc)
                else:
                    return False
            except (FormatError, UnsupportedFormatError):
                entry.crc_ok = False
                return False
            entry.crc_ok = (crc & 0xFFFFFFFF) == entry.crc
            return entry.crc_ok
        crc, view = 0, self.raw(entry)
        for start in range(0, len(view), CRC_CHUNK):
            crc = crc32(view[start:start + CRC_CHUNK], crc)
            if len(view) >= 1 << 20:  # big records: do not keep their pages mapped (RSS)
                _release(self.buf, entry.data_offset + start, min(CRC_CHUNK, len(view) - start))
        del view
        entry.crc_ok = (crc & 0xFFFFFFFF) == entry.crc
        return entry.crc_ok


def _u16(buf, off):
    return unpack_at("<H", buf, off)[0]


def _u32(buf, off):
    return unpack_at("<I", buf, off)[0]


def _u64(buf, off):
    return unpack_at("<Q", buf, off)[0]


def _find_eocd(buf, size: int, path: str) -> Tuple[int, List[int]]:
    """The end-of-central-directory record torch and Python read, and any other one.

    miniz (torch's reader, `mz_zip_reader_locate_header_sig`) and CPython's zipfile
    (`_EndRecData`) both take the LAST signature in the file's tail that has a whole record
    after it, whether or not its comment length reaches the end of the file: a second EOCD
    hidden in the archive comment of the first points them at a hidden directory. We read the
    one they read, and return the offsets of the others (an anomaly the caller reports)."""
    window_start = max(0, size - (22 + 0xFFFF))
    tail = bytes(buf[window_start:size])
    found = []
    pos = tail.rfind(EOCD_SIG)
    while pos >= 0:
        if pos + 22 <= len(tail):
            found.append(window_start + pos)
        pos = tail.rfind(EOCD_SIG, 0, pos)
    if not found:
        raise FormatError(path, "not a complete zip archive (no end-of-central-directory record; truncated?)")
    return found[0], found[1:]


def _is_plausible_eocd(buf, off: int) -> bool:
    """A signature that is a real end-of-central-directory record: its directory ends right
    before it (or a ZIP64 locator does) and starts with a central-directory entry."""
    n_total, cd_size, cd_offset = unpack_at("<10xHII", buf, off)
    if off >= 20 and bytes(buf[off - 20:off - 16]) == ZIP64_LOCATOR_SIG:
        return True
    if cd_offset + cd_size != off:
        return False
    return n_total == 0 or bytes(buf[cd_offset:cd_offset + 4]) == CENTRAL_SIG


def fold_name(name: str) -> str:
    """A record name as torch compares it: miniz `mz_zip_reader_locate_file` without
    MZ_ZIP_FLAG_CASE_SENSITIVE lower-cases ASCII letters only."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _zip64_extra(extra: bytes, need: List[str], values: Dict[str, int], path: str, name: str) -> None:
    """Replace 0xFFFFFFFF fields from the ZIP64 extra block (APPNOTE 4.5.3: fixed order)."""
    off = 0
    while off + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, off)
        body = extra[off + 4:off + 4 + length]
        if len(body) != length:
            raise FormatError(path, f"zip record {name!r}: truncated extra field")
        if tag == 0x0001:
            pos = 0
            for key in need:
                if pos + 8 > len(body):
                    raise FormatError(path, f"zip record {name!r}: ZIP64 extra field too short")
                values[key] = _u64(body, pos)
                pos += 8
            return
        off += 4 + length
    if need:
        raise FormatError(path, f"zip record {name!r}: sizes need a ZIP64 extra field that is missing")


def read_zip(path: str, buf, size: int) -> ZipArchive:
    """Parse the central directory and check every local header against it."""
    if size < 22:
        raise FormatError(path, f"truncated zip archive ({size} bytes)")
    eocd, other_eocds = _find_eocd(buf, size, path)
    (disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len) = unpack_at("<HHHHIIH", buf, eocd + 4)
    cd_end_limit = eocd
    locator = eocd - 20
    if locator >= 0 and bytes(buf[locator:locator + 4]) == ZIP64_LOCATOR_SIG:
        z64 = _u64(buf, locator + 8)
        if z64 + 56 > locator or bytes(buf[z64:z64 + 4]) != ZIP64_EOCD_SIG:
            raise FormatError(path, "corrupt ZIP64 end-of-central-directory record")
        disk, cd_disk = _u32(buf, z64 + 16), _u32(buf, z64 + 20)
        n_disk, n_total, cd_size, cd_offset = (_u64(buf, z64 + 24), _u64(buf, z64 + 32), _u64(buf, z64 + 40), _u64(buf, z64 + 48))
        cd_end_limit = z64
    elif 0xFFFFFFFF in (cd_size, cd_offset) or 0xFFFF in (n_disk, n_total):
        raise FormatError(path, "zip archive needs ZIP64 records that are missing (truncated?)")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise UnsupportedFormatError(path, "multi-part zip archives are not supported")
    if cd_offset + cd_size > cd_end_limit:
        raise FormatError(path, "zip central directory lies outside the file (truncated?)")
    if n_total > cd_size // 46 + 1:
        raise FormatError(path, f"zip central directory claims {n_total} records in {cd_size} bytes")
    archive = ZipArchive(path, buf, size, [])
    issues = archive.issues
    hidden = [o for o in other_eocds if _is_plausible_eocd(buf, o)]  # not 4 random bytes of tensor data
    if hidden:
        issues.append(ZipIssue("unsafe", f"two end-of-central-directory records (at {hidden[0]} and {eocd}): torch and Python "
                                         f"read the last one, other tools the first (a hidden directory); refused"))
    if eocd + 22 + comment_len != size:
        issues.append(ZipIssue("unsafe" if eocd + 22 + comment_len < size else "corrupt",
                               f"the zip archive comment says {comment_len} bytes but {size - eocd - 22} follow the "
                               f"end-of-central-directory record"))
    if cd_offset + cd_size != cd_end_limit:
        issues.append(ZipIssue("corrupt", f"{cd_end_limit - cd_offset - cd_size} unexplained bytes after the zip central directory"))

    off = cd_offset
    cd_end = cd_offset + cd_size
    _prefetch(buf, [(cd_offset, cd_size)])
    entries_raw = []
    cd = bytes(buf[cd_offset:cd_end])  # one copy of the directory, parsed in memory
    central = struct.Struct("<4s4xHHHHIIIHHHHHII")
    pos = 0
    for i in range(n_total):
        if pos + 46 > len(cd):
            raise FormatError(path, f"zip central directory entry {i} is corrupt")
        (sig, flags, method, _t, _d, crc, csize, usize, nlen, elen, clen, _disk_start, _ia, _ea, local) = central.unpack_from(cd, pos)
        if sig != CENTRAL_SIG:
            raise FormatError(path, f"zip central directory entry {i} is corrupt")
        if pos + 46 + nlen + elen + clen > len(cd):
            raise FormatError(path, f"zip central directory entry {i} runs past the directory")
        raw_name = cd[pos + 46:pos + 46 + nlen]
        name = _decode_name(raw_name, flags, path)
        if 0xFFFFFFFF in (usize, csize, local):
            values = {"size": usize, "csize": csize, "offset": local}
            need = [k for k, v in (("size", usize), ("csize", csize), ("offset", local)) if v == 0xFFFFFFFF]
            _zip64_extra(cd[pos + 46 + nlen:pos + 46 + nlen + elen], need, values, path, name)
            usize, csize, local = values["size"], values["csize"], values["offset"]
        archive.entries.append(ZipEntry(name, method, flags, crc, csize, usize, local))
        entries_raw.append(raw_name)
        pos += 46 + nlen + elen + clen
    off = cd_offset + pos
    # Local headers and data descriptors are scattered over the file: ask the kernel for all of
    # them at once (parallel reads) instead of faulting them in one by one.
    _prefetch(buf, [(e.header_offset, 30 + 2 * len(r) + 128) for e, r in zip(archive.entries, entries_raw)] +
              [(e.header_offset + 30 + len(r) + e.compressed_size, 256) for e, r in zip(archive.entries, entries_raw)])
    for entry, raw_name in zip(archive.entries, entries_raw):
        _check_local(archive, entry, raw_name)
    if off != cd_end:
        issues.append(ZipIssue("corrupt", "zip central directory size does not match its entries"))
    _check_layout(archive, cd_offset)
    return archive


def _prefetch(buf, ranges) -> None:
    """MADV_WILLNEED on the pages of `ranges` (offset, length) when `buf` is an mmap."""
    madvise = getattr(buf, "madvise", None)
    advice = getattr(mmap, "MADV_WILLNEED", None)
    if madvise is None or advice is None:
        return
    size = len(buf)
    for offset, length in ranges:
        start = max(0, offset) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(size, offset + length)
        if end > start:
            try:
                madvise(advice, start, end - start)
            except (OSError, ValueError):
                return


def _release(buf, offset: int, length: int) -> None:
    """MADV_DONTNEED: drop pages we are done with from this process's mapping (the data stays
    in the page cache); only whole pages inside the range."""
    madvise = getattr(buf, "madvise", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if madvise is None or advice is None:
        return
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        try:
            madvise(advice, start, end - start)
        except (OSError, ValueError):
            pass


def _decode_name(raw: bytes, flags: int, path: str) -> str:
    try:
        return raw.decode("utf-8") if flags & FLAG_UTF8 else raw.decode("cp437")
    except UnicodeDecodeError:
        raise FormatError(path, "zip record name is not valid UTF-8") from None


def _check_local(archive: ZipArchive, entry: ZipEntry, raw_name: bytes) -> None:
    buf, size, issues, path = archive.buf, archive.size, archive.issues, archive.path
    lo = entry.header_offset
    if lo + 30 > size or bytes(buf[lo:lo + 4]) != LOCAL_SIG:
        raise FormatError(path, f"zip record {entry.name!r}: no local header at offset {lo}")
    (flags, method, _t, _d, crc, csize, usize, nlen, elen) = unpack_at("<6xHHHHIIIHH", buf, lo)
    local_name = bytes(buf[lo + 30:lo + 30 + nlen])
    local_extra = bytes(buf[lo + 30 + nlen:lo + 30 + nlen + elen])
    entry.data_offset = lo + 30 + nlen + elen
    if local_name != raw_name:
        issues.append(ZipIssue("unsafe", f"zip record named {entry.name!r} in the central directory is named "
                                         f"{local_name.decode('utf-8', 'replace')!r} in its local header (name swap)"))
    if flags != entry.flags:
        issues.append(ZipIssue("unsafe", f"zip record {entry.name!r}: flags differ between central directory and local header"))
    if method != entry.method:
        issues.append(ZipIssue("unsafe", f"zip record {entry.name!r}: compression method differs between central directory and local header"))
    odd = entry.flags & ~ALLOWED_FLAGS
    if odd:
        what = ", ".join(v for k, v in FLAG_NAMES.items() if odd & k) or f"0x{odd:04x}"
        issues.append(ZipIssue("unsafe", f"zip record {entry.name!r} has flag bits set ({what}); refused"))
    if entry.method not in (STORED, DEFLATED):
        issues.append(ZipIssue("corrupt", f"zip record {entry.name!r} uses unsupported compression method {entry.method}"))
    data_end = entry.data_offset + entry.compressed_size
    if data_end > size:
        raise FormatError(path, f"truncated: zip record {entry.name!r} runs past the end of the file")
    if entry.method == STORED and entry.compressed_size != entry.size:
        issues.append(ZipIssue("corrupt", f"zip record {entry.name!r} is stored but its two sizes differ"))
    if flags & FLAG_DESCRIPTOR:
        entry.end_offset = _check_descriptor(archive, entry, data_end)
        if (crc, csize, usize) != (0, 0, 0) and (crc, csize, usize) != (entry.crc, entry.compressed_size & 0xFFFFFFFF, entry.size & 0xFFFFFFFF):
            issues.append(ZipIssue("unsafe", f"zip record {entry.name!r}: local header sizes/CRC disagree with the central directory"))
    else:
        values = {"size": usize, "csize": csize}
        need = [k for k, v in (("size", usize), ("csize", csize)) if v == 0xFFFFFFFF]
        try:
            _zip64_extra(local_extra, need, values, path, entry.name)
        except FormatError as e:
            issues.append(ZipIssue("corrupt", e.problem))
        if (crc, values["csize"], values["size"]) != (entry.crc, entry.compressed_size, entry.size):
            issues.append(ZipIssue("unsafe", f"zip record {entry.name!r}: local header sizes/CRC disagree with the central directory"))
        entry.end_offset = data_end


def _check_descriptor(archive: ZipArchive, entry: ZipEntry, data_end: int) -> int:
    """Data descriptor after the data (with or without signature; 32- or 64-bit sizes)."""
    buf, size = archive.buf, archive.size
    off = data_end
    if bytes(buf[off:off + 4]) == DESCRIPTOR_SIG:
        off += 4
    for width, fmt in ((8, "<IQQ"), (4, "<III")):
        length = 4 + 2 * width
        if off + length <= size:
            crc, csize, usize = unpack_at(fmt, buf, off)
            if (crc, csize, usize) == (entry.crc, entry.compressed_size, entry.size):
                return off + length
    archive.issues.append(ZipIssue("unsafe", f"zip record {entry.name!r}: data descriptor disagrees with the central directory"))
    return data_end


def _check_layout(archive: ZipArchive, cd_offset: int) -> None:
    issues = archive.issues
    seen: Dict[str, str] = {}
    for e in archive.entries:
        folded = fold_name(e.name)
        if folded in seen:
            if seen[folded] == e.name:
                issues.append(ZipIssue("unsafe", f"zip record {e.name!r} appears twice (loaders disagree on which one they read)"))
            else:
                issues.append(ZipIssue("unsafe", f"zip records {seen[folded]!r} and {e.name!r} differ only in case: torch looks "
                                                 f"names up ignoring case, so loaders disagree on which one they read"))
        seen[folded] = e.name
    ordered = sorted(archive.entries, key=lambda e: e.header_offset)
    if ordered and ordered[0].header_offset != 0:
        issues.append(ZipIssue("unsafe", f"{ordered[0].header_offset} bytes of data before the first zip record"))
    elif not ordered and cd_offset != 0:
        issues.append(ZipIssue("unsafe", f"{cd_offset} bytes of data before the zip directory"))
    for a, b in zip(ordered, ordered[1:]):
        if b.header_offset < a.end_offset:
            issues.append(ZipIssue("unsafe", f"zip records {a.name!r} and {b.name!r} overlap"))
        elif b.header_offset > a.end_offset:
            issues.append(ZipIssue("corrupt", f"{b.header_offset - a.end_offset} unexplained bytes between zip records {a.name!r} and {b.name!r}"))
    if ordered and ordered[-1].end_offset != cd_offset:
        if ordered[-1].end_offset > cd_offset:
            issues.append(ZipIssue("unsafe", f"zip record {ordered[-1].name!r} overlaps the central directory"))
        else:
            issues.append(ZipIssue("corrupt", f"{cd_offset - ordered[-1].end_offset} unexplained bytes before the zip central directory"))
