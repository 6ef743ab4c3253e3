"""safetensors: a strict header parser, mmap-backed lazy tensors, and a streaming writer.

Format (source: huggingface/safetensors docs and `safetensors/src/tensor.rs`): u64 little-endian
N, N bytes of UTF-8 JSON, then the byte buffer. We enforce every rule the reference enforces and
also refuse the leniencies of safetensors 0.8.0 (duplicate keys, unknown fields in a tensor entry,
leading whitespace before `{`, NUL in names), so what we accept every other reader accepts too.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import mmap
import errno
import os
import struct
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

if TYPE_CHECKING:
    import numpy as np

from sdtk.errors import FormatError, OutputError
from sdtk.fileio import AtomicOutput, open_input
from sdtk.formats.catalogue import Catalogue
from sdtk.formats.source import buffer_window
from sdtk.tensors import DTYPES, DType, FileSpan, LazyTensor, geometry_problem, numel

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (tensor.rs: MAX_HEADER_SIZE)
ALIGNMENT = 8  # the reference writer pads the header with spaces to 8 bytes
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


def looks_like_safetensors(head: bytes) -> bool:
    """Content sniffing: 8-byte length that fits, then a JSON object (possibly after whitespace,
    which the strict parser then refuses with a precise message)."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and head[8:].lstrip(b" \t\r\n")[:1] in (b"{", b"[")


class _HeaderProblem(ValueError):
    pass


def has_lone_surrogate(text: str) -> bool:
    """JSON `\\ud800` escapes decode to lone surrogates, which are not Unicode text: the
    `safetensors` library (serde_json) refuses them, and printing or re-encoding them fails."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _HeaderProblem(f"duplicate key {key!r} in the header")
        if has_lone_surrogate(key) or (isinstance(value, str) and has_lone_surrogate(value)):
            raise _HeaderProblem("a string in the header holds a lone surrogate escape (\\ud800-\\udfff), "
                                 "which is not valid Unicode")
        obj[key] = value
    return obj


def parse_header(raw: bytes, data_size: int, path: str) -> tuple[Dict[str, dict], Dict[str, str]]:
    """Validate a safetensors header; return ({name: entry} in offset order, metadata)."""
    if raw[:1] != b"{":
        if raw[:1].isspace():
            raise FormatError(path, "safetensors header starts with whitespace before '{' (not allowed)")
        raise FormatError(path, "safetensors header is not a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "safetensors header is not valid UTF-8") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _HeaderProblem as e:
        raise FormatError(path, f"safetensors header: {e}") from None
    except ValueError as e:
        raise FormatError(path, f"safetensors header is not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:  # serde_json (the safetensors library) stops at 128 levels
        raise FormatError(path, "safetensors header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "safetensors __metadata__ must map strings to strings")
    entries = []
    for name, entry in header.items():
        if "\x00" in name:
            raise FormatError(path, f"tensor name {name!r} contains a NUL character")
        if not name:
            raise FormatError(path, "a tensor has an empty name")
        if not isinstance(entry, dict):
            raise FormatError(path, f"tensor {name!r}: entry is not an object")
        if set(entry) != _ENTRY_FIELDS:
            extra = sorted(set(entry) - _ENTRY_FIELDS)
            missing = sorted(_ENTRY_FIELDS - set(entry))
            what = f"unknown field(s) {extra}" if extra else f"missing field(s) {missing}"
            raise FormatError(path, f"tensor {name!r}: {what}")
        dt = entry["dtype"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise FormatError(path, f"tensor {name!r}: unsupported dtype {dt!r}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            raise FormatError(path, f"tensor {name!r}: shape must be a list of non-negative integers")
        problem = geometry_problem(tuple(shape), DTYPES[dt].itemsize)
        if problem:
            raise FormatError(path, f"tensor {name!r}: {problem}")
        offs = entry["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and 0 <= o < 2**64 for o in offs)):
            raise FormatError(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offs
        if end < begin:
            raise FormatError(path, f"tensor {name!r}: data_offsets end before they begin")
        nbytes = numel(shape) * DTYPES[dt].itemsize
        if end - begin != nbytes:
            raise FormatError(path, f"tensor {name!r}: {dt}{shape} needs {nbytes} bytes but data_offsets span {end - begin}")
        entries.append((begin, end, name, entry))
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, name, _ in entries:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise FormatError(path, f"tensor {name!r} {kind} (data_offsets {begin}..{end})")
        cursor = end
    if cursor != data_size:
        if cursor > data_size:
            raise FormatError(path, f"truncated: the header describes {cursor} bytes of tensor data but the file holds {data_size}")
        raise FormatError(path, f"{data_size - cursor} bytes after the last tensor (the data must end with the file)")
    return {name: entry for _, _, name, entry in entries}, metadata


def read_safetensors(path: "os.PathLike[str] | str", *, source=None) -> Catalogue:
    """Open a safetensors file lazily. Reads only the header; tensors come from an mmap (or, with
    `source`, a formats.source.RangeBuffer: range requests for the tensors actually read)."""
    path = os.fspath(path)
    with open_input(path) if source is None else source.open() as f:
        size = os.fstat(f.fileno()).st_size if source is None else source.size
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(path, f"truncated: {size} bytes, shorter than the 8-byte safetensors header length" if size else "empty file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise FormatError(path, f"safetensors header length {n} exceeds the 100 MB limit")
        if 8 + n > size:
            raise FormatError(path, f"truncated: the header claims {n} bytes but the file has only {size - 8} after the length")
        raw = f.read(n)
        data_start = 8 + n
        entries, metadata = parse_header(raw, size - data_start, path)
        mm = source.buffer() if source is not None else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
    tensors: Dict[str, LazyTensor] = {}
    for name, entry in entries.items():
        dt = DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        tensors[name] = LazyTensor(
            name, dt, shape,
            loader=_mmap_loader(mm, dt, shape, data_start + begin),
            span=FileSpan(path, data_start + begin, end - begin),
        )
    cat = Catalogue(path=path, format="safetensors", tensors=tensors, metadata=dict(metadata), file_size=size)
    if mm is not None:
        cat._closers.append(mm.close)
    return cat


def _mmap_loader(mm, dt: DType, shape, offset: int):
    count = numel(shape)

    def load() -> np.ndarray:
        import numpy as np

        if count == 0:
            return np.zeros(shape, dtype=dt.numpy)
        buf, start = buffer_window(mm, offset, count * dt.itemsize)
        return np.frombuffer(buf, dtype=dt.numpy, count=count, offset=start).reshape(shape)

    return load


# ---------------------------------------------------------------------------------------------
# Writing


def build_header(plan: Sequence[LazyTensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The header bytes (u64 length + JSON, space-padded so the data starts 8-byte aligned)."""
    header: Dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad[:3]}")
        if any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in metadata.items()):
            raise ValueError("safetensors metadata holds a lone surrogate (not valid Unicode)")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in plan:
        if t.name in header or t.name == "__metadata__":
            raise ValueError(f"tensor name {t.name!r} appears twice in the plan")
        if "\x00" in t.name or not t.name or has_lone_surrogate(t.name):
            raise ValueError(f"invalid tensor name {t.name!r}")
        problem = geometry_problem(tuple(t.shape), t.dtype.itemsize)
        if problem:
            raise ValueError(f"tensor {t.name!r}: {problem}")
        header[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def _as_le_bytes(t: LazyTensor, arr: np.ndarray) -> memoryview:
    import numpy as np

    if arr.shape != tuple(t.shape):
        raise ValueError(f"tensor {t.name!r}: planned shape {t.shape} but computed {arr.shape}")
    want = t.dtype.numpy
    if arr.dtype != want:
        if arr.dtype.newbyteorder("=") == want.newbyteorder("=") or (arr.dtype.itemsize == want.itemsize and arr.dtype.kind == want.kind and arr.dtype.name == want.name):
            arr = arr.astype(want)  # byte-order change only
        else:
            raise ValueError(f"tensor {t.name!r}: planned dtype {t.dtype.name} but computed {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")


def _direct(header: bytes, plan: Sequence[LazyTensor], data_hasher) -> bool:
    """Write past the page cache (sdtk.directio): large outputs, unless the data section is read
    back while it is written (`data_hasher` reads the file as it grows)."""
    from sdtk import directio

    return (data_hasher is None and directio.enabled() and len(header) + sum(t.nbytes for t in plan) >= directio.MIN_BYTES
            and not _copies_from_sparse_files(plan))


def _copies_from_sparse_files(plan: Sequence[LazyTensor]) -> bool:
    """A plan that copies spans of a sparse file keeps its holes only through the page cache
    (`_copy_span`); a direct write would fill them with zeros on disk."""
    seen = set()
    for t in plan:
        if t.span is None or t.span.path in seen:
            continue
        seen.add(t.span.path)
        try:
            st = os.stat(t.span.path)
        except OSError:
            continue
        if getattr(st, "st_blocks", None) is not None and st.st_blocks * 512 < st.st_size // 2:
            return True
    return False


def _next_data(fd: int, offset: int, end: int) -> int:
    """Where the source's next data lies at or after `offset` (`end` if only a hole is left):
    SEEK_DATA, so a sparse source's holes are skipped, not read as zeros."""
    if not hasattr(os, "SEEK_DATA"):
        return offset
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), end)
    except OSError as e:  # ENXIO: nothing but a hole from offset on; EINVAL: not supported here
        return end if e.errno == errno.ENXIO else offset


def _data_end(fd: int, offset: int, end: int) -> int:
    if not hasattr(os, "SEEK_HOLE"):
        return end
    try:
        return min(os.lseek(fd, offset, os.SEEK_HOLE), end)
    except OSError:
        return end


def _copy_span(src_span: FileSpan, out, length: int) -> None:
    """Copy raw bytes file to file; the kernel does it when it can (copy_file_range). Holes of a
    sparse source stay holes in the output (it is written front to back, so the skipped range
    reads as zeros), as `cp --sparse=auto` does: a zero-filled test or benchmark file costs no
    I/O, and a dense file costs two lseek calls."""
    if hasattr(out, "copy_from"):  # sdtk.directio.DirectWriter: read into its staging buffers
        with open(src_span.path, "rb") as src:
            out.copy_from(src.fileno(), src_span.offset, length)
        return
    out.flush()
    with open(src_span.path, "rb") as src:
        in_fd, out_fd = src.fileno(), out.fileno()
        offset, remaining = src_span.offset, length
        out_pos = out.tell()
        end = offset + length
        if os.fstat(in_fd).st_size < end:  # a hole past the end would otherwise read as zeros
            raise OSError(f"unexpected end of {src_span.path} while copying")
        use_cfr = hasattr(os, "copy_file_range")
        while remaining > 0:
            data = _next_data(in_fd, offset, end)
            if data > offset:  # a hole: leave one in the output too
                skip = data - offset
                offset, out_pos, remaining = data, out_pos + skip, remaining - skip
                if remaining == 0:
                    break
            chunk = min(remaining, 1 << 30, _data_end(in_fd, offset, end) - offset) or min(remaining, 1 << 30)
            if use_cfr:
                try:
                    n = os.copy_file_range(in_fd, out_fd, chunk, offset, out_pos)
                except OSError:
                    use_cfr = False
                    continue
            else:
                n = os.sendfile(out_fd, in_fd, offset, chunk) if hasattr(os, "sendfile") else 0
                if n == 0:
                    src.seek(offset)
                    piece = src.read(min(chunk, 64 << 20))
                    n = out.write(piece) if piece else 0
                    out.flush()
            if n <= 0:
                raise OSError(f"unexpected end of {src_span.path} while copying")
            offset += n
            out_pos += n
            remaining -= n
        if os.fstat(out_fd).st_size < out_pos:
            os.ftruncate(out_fd, out_pos)  # the span ended in a hole: the file still reaches its end
        out.seek(out_pos)


def write_safetensors(
    dest: "os.PathLike[str] | str",
    plan: Sequence[LazyTensor],
    metadata: Optional[Dict[str, str]] = None,
    *,
    inputs: Iterable = (),
    overwrite: bool = False,
    on_tensor=None,
    final_metadata=None,
    data_hasher=None,
) -> int:
    """Stream `plan` into a new safetensors file at `dest`, atomically. Returns bytes written.

    Each plan entry's `read()` is called once, in order, and its array written straight away,
    so peak memory is about one tensor. Entries whose raw bytes already lie little-endian in a
    file (`span`) and need no conversion are copied file to file. `on_tensor(t, bytes_done)` is
    called after each tensor (progress bars). `final_metadata()`, if given, is called after the
    last tensor and its metadata replaces `metadata` in the header before the file is committed
    (values known only at the end, e.g. hashes computed meanwhile); the new header must fit in
    the old one's size (equal-length placeholders), padded with spaces. `data_hasher`
    (formats.data_hash.DataSectionHasher), if given, hashes the data section as it is written;
    its `hexdigest` is set before `final_metadata()` is called."""
    plan = list(plan)
    try:
        header = build_header(plan, metadata)
    except ValueError as e:
        raise OutputError(dest, str(e)) from None
    total = len(header)
    checks = []  # integrity checks of file-to-file copies, run on the other core meanwhile
    atomic = AtomicOutput(dest, inputs=inputs, overwrite=overwrite, direct=_direct(header, plan, data_hasher))
    with atomic as out, ThreadPoolExecutor(max_workers=1) as checker:
        out.write(header)
        if data_hasher is not None:
            out.flush()
            data_hasher.start(atomic.temp_path, len(header))
        try:
            total = _write_tensors(out, plan, dest, total, checker, checks, on_tensor, data_hasher)
            for check in checks:
                check.result()  # a corrupt source raises here, before the output is committed
            if data_hasher is not None:
                out.flush()
                try:
                    data_hasher.finish(total)
                except OSError as e:
                    raise OutputError(dest, f"could not read back the output to hash it: {e}") from None
        finally:
            if data_hasher is not None:
                data_hasher.abort()
        if final_metadata is not None:
            _rewrite_header(out, plan, final_metadata(), len(header), dest)
    return total


def _write_tensors(out, plan, dest, total: int, checker, checks: list, on_tensor, data_hasher) -> int:
    for t in plan:
        if t.span is not None and t.span.length == t.nbytes and t.nbytes >= (1 << 20):
            if t.verify is not None:
                checks.append(checker.submit(t.verify))
            _copy_span(t.span, out, t.nbytes)
        elif t.nbytes:
            try:
                data = _as_le_bytes(t, t.read())
            except ValueError as e:
                raise OutputError(dest, str(e)) from None
            out.write(data)
            del data
        total += t.nbytes
        if data_hasher is not None:
            out.flush()
            data_hasher.advance(total)
        if on_tensor is not None:
            on_tensor(t, total)
    return total


def _rewrite_header(out, plan: Sequence[LazyTensor], metadata: Dict[str, str], size: int, dest) -> None:
    """Overwrite the header in place with one carrying `metadata`, space-padded to `size` bytes."""
    try:
        fresh = build_header(plan, metadata)
    except ValueError as e:
        raise OutputError(dest, str(e)) from None
    json_part = fresh[8:].rstrip(b" ")
    if 8 + len(json_part) > size:
        raise OutputError(dest, "final metadata is larger than the space reserved for it in the header")
    out.flush()
    end = out.tell()
    out.seek(0)
    out.write(struct.pack("<Q", size - 8) + json_part + b" " * (size - 8 - len(json_part)))
    out.flush()
    out.seek(end)
