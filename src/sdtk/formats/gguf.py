"""GGUF: a strict reader (header, KV metadata, tensor infos) with lazy, dequantizing tensors.

Layout (source: ggml `docs/gguf.md` and `src/gguf.cpp`; gguf-py 0.19.0 `gguf_reader.py`;
restated in ../shared/reference/quantized-formats.md §1): u32 magic "GGUF", u32 version (2 or 3,
little-endian), u64 tensor count, u64 KV count, the KVs, the tensor infos (name, n_dims, ne[],
ggml type, offset relative to the data section), zero padding to `general.alignment` (default
32), then the data. ne[0] is the innermost axis, so the numpy shape is ne reversed; a KV
`comfy.gguf.orig_shape.<name>` (city96's converter) gives the shape to use instead.

Every count and length is checked against the bytes that remain before anything is allocated,
so a hostile header cannot make us allocate more than the file's size. Quantized tensors are
exposed as F32 `LazyTensor`s that dequantize when read (sdtk.quant.dequant).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from sdtk.errors import FormatError, UnsupportedFormatError
from sdtk.fileio import open_input
from sdtk.formats.catalogue import Catalogue
from sdtk.quant.ggml_types import BY_ID, PLAIN, GGMLType
from sdtk.tensors import DTYPES, FileSpan, LazyTensor, numel

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT (ggml gguf.cpp, gguf-py constants)
MAX_DIMS = 16  # ggml itself stops at 4 (GGML_MAX_DIMS); gguf-py writes any rank; beyond 16 is nonsense
MAX_NESTING = 4  # arrays of arrays: no real file nests deeper than 2
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# KV value types (gguf docs "gguf_metadata_value_type"): id -> (name, struct format or None)
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
VALUE_TYPE_ID = {name: i for i, (name, _) in VALUE_TYPES.items()}
_NUMPY_OF = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass
class GGUFValue:
    """A KV value with its GGUF type (arrays: `type` "ARRAY" and `item_type`)."""

    type: str
    value: Any
    item_type: Optional[str] = None


@dataclass
class GGUFTensor(LazyTensor):
    """A tensor of a GGUF file: `dtype`/`shape` are what `read()` returns (F32 for quantized
    types); `ggml_type` is how it is stored, `ne` the ggml dims, `stored_nbytes` its bytes in the file."""

    ggml_type: Optional[GGMLType] = None
    ne: Tuple[int, ...] = ()
    stored_nbytes: int = 0
    file_offset: int = 0


@dataclass
class GGUFCatalogue(Catalogue):
    """A catalogue with the GGUF header: version, alignment, every KV (in file order)."""

    version: int = 3
    alignment: int = DEFAULT_ALIGNMENT
    kv: Dict[str, GGUFValue] = field(default_factory=dict)
    data_offset: int = 0

    @property
    def architecture(self) -> Optional[str]:
        v = self.kv.get("general.architecture")
        return v.value if v is not None and v.type == "STRING" else None


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names what was being read."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(self.path, f"truncated GGUF: {what} at byte {self.pos} needs {n} bytes, the file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, strict: bool = True) -> str:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise FormatError(self.path, f"{what} is not valid UTF-8") from None
            return raw.decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> GGUFValue:
    if vtype not in VALUE_TYPES:
        raise FormatError(cur.path, f"KV {key!r}: unknown value type {vtype}")
    name, fmt = VALUE_TYPES[vtype]
    if fmt is not None:
        value = cur.unpack(fmt, f"value of KV {key!r}")
        if vtype == 7:
            value = bool(value)
        return GGUFValue(name, value)
    if vtype == 8:
        return GGUFValue(name, cur.string(f"value of KV {key!r}", strict=False))
    if depth >= MAX_NESTING:
        raise FormatError(cur.path, f"KV {key!r}: arrays nested deeper than {MAX_NESTING}")
    item = cur.unpack("<I", f"array type of KV {key!r}")
    count = cur.unpack("<Q", f"array length of KV {key!r}")
    if item not in VALUE_TYPES:
        raise FormatError(cur.path, f"KV {key!r}: unknown array item type {item}")
    item_name, item_fmt = VALUE_TYPES[item]
    min_item = struct.calcsize(item_fmt) if item_fmt else (8 if item == 8 else 12)
    left = cur.size - cur.pos
    if count > left // min_item:  # bounded before allocating anything
        raise FormatError(cur.path, f"KV {key!r}: array of {count} {item_name} items cannot fit in the {left} bytes left")
    if item in _NUMPY_OF:
        n = count * min_item
        arr = np.frombuffer(cur.buf, dtype=_NUMPY_OF[item], count=count, offset=cur.pos).copy()
        cur.pos += n
        return GGUFValue(name, arr.tolist() if count <= 65536 else arr, item_name)
    if item == 7:
        arr = np.frombuffer(cur.buf, dtype=np.uint8, count=count, offset=cur.pos) != 0
        cur.pos += count
        return GGUFValue(name, arr.tolist(), item_name)
    values = [_read_value(cur, item, key, depth + 1).value for _ in range(count)]
    return GGUFValue(name, values, item_name)


def _check_version(path: str, cur: _Cursor) -> int:
    version = cur.unpack("<I", "version")
    if version in (2, 3):
        return version
    if struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3):
        raise UnsupportedFormatError(path, "big-endian GGUF file; sdtk reads little-endian GGUF (the format every released model uses)")
    if version == 1:
        raise UnsupportedFormatError(path, "GGUF version 1 (2023, superseded; ggml itself refuses it)")
    raise FormatError(path, f"unknown GGUF version {version} (expected 2 or 3)")


def parse_gguf(buf, path: str):
    """Parse the header from `buf` (the whole file, e.g. an mmap). Returns
    (version, kv, infos, alignment, data_offset); infos are (name, ne, GGMLType, offset)."""
    cur = _Cursor(buf, path)
    cur.need(4, "magic")
    if bytes(buf[0:4]) != MAGIC:
        raise FormatError(path, "not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = _check_version(path, cur)
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "KV count")
    left = cur.size - cur.pos
    if n_kv > left // 13:  # a KV is at least an 8-byte key length, a 4-byte type and 1 byte
        raise FormatError(path, f"truncated or corrupt GGUF: the header claims {n_kv} KV pairs; the {left} bytes left cannot hold them")
    kv: Dict[str, GGUFValue] = {}
    for i in range(n_kv):
        key = cur.string(f"key of KV {i}")
        vtype = cur.unpack("<I", f"type of KV {key!r}")
        if key in kv:
            raise FormatError(path, f"KV {key!r} appears twice")
        kv[key] = _read_value(cur, vtype, key)
    left = cur.size - cur.pos
    if n_tensors > left // 24:  # name length 8 + n_dims 4 + type 4 + offset 8
        raise FormatError(path, f"truncated or corrupt GGUF: the header claims {n_tensors} tensors; the {left} bytes left cannot hold their descriptions")
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        a = kv["general.alignment"]
        if a.type != "UINT32":
            raise FormatError(path, f"general.alignment must be UINT32, not {a.type}")
        if a.value <= 0 or a.value & (a.value - 1):
            raise FormatError(path, f"bad alignment {a.value} (general.alignment must be a power of two)")
        alignment = a.value
    infos: List[Tuple[str, Tuple[int, ...], GGMLType, int]] = []
    seen = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        if name in seen:
            raise FormatError(path, f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise FormatError(path, f"tensor {name!r}: {n_dims} dimensions (at most {MAX_DIMS} accepted)")
        cur.need(8 * n_dims, f"dims of tensor {name!r}")
        ne = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims
        type_id = cur.unpack("<I", f"type of tensor {name!r}")
        offset = cur.unpack("<Q", f"offset of tensor {name!r}")
        t = BY_ID.get(type_id)
        if t is None:
            raise FormatError(path, f"tensor {name!r}: unknown ggml type id {type_id}")
        if ne and ne[0] % t.block:
            raise FormatError(path, f"tensor {name!r}: row length {ne[0]} is not a multiple of the {t.name} block size {t.block}")
        if offset % alignment:
            raise FormatError(path, f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, tuple(ne), t, offset))
    data_offset = cur.pos + (-cur.pos) % alignment if n_tensors else cur.pos
    return version, kv, infos, alignment, data_offset


def _stored_bytes(path: str, name: str, ne: Tuple[int, ...], t: GGMLType, limit: int) -> int:
    rows = 1
    for d in ne[1:]:
        rows *= d
        if rows > limit:  # stop multiplying absurd dims early (still exact below the limit)
            break
    n = ne[0] if ne else 1
    size = rows * t.row_bytes(n) if ne else t.nbytes
    return size


def read_gguf(path: "os.PathLike[str] | str") -> GGUFCatalogue:
    """Open a GGUF file lazily: parse and check the header, map the data; tensors decode on read."""
    path = os.fspath(path)
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise FormatError(path, f"truncated GGUF: {size} bytes, shorter than the 24-byte header")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        version, kv, infos, alignment, data_offset = parse_gguf(mm, path)
        if data_offset > size and infos:
            raise FormatError(path, f"truncated GGUF: the tensor data would start at byte {data_offset}, the file has {size}")
        data_size = size - data_offset
        spans = []
        tensors: Dict[str, LazyTensor] = {}
        for name, ne, t, offset in infos:
            stored = _stored_bytes(path, name, ne, t, data_size)
            if offset > data_size or stored > data_size - offset:
                raise FormatError(path, f"tensor {name!r}: {t.name} {list(ne)} needs bytes {offset}..{offset + stored} of the data section, "
                                        f"which holds {data_size} (truncated or offset out of range)")
            spans.append((offset, offset + stored, name))
            tensors[name] = _tensor(path, mm, name, ne, t, data_offset + offset, stored, kv)
        _check_overlaps(path, spans)
    except BaseException:
        mm.close()
        raise
    cat = GGUFCatalogue(path=path, format="gguf", tensors=tensors, file_size=size, version=version,
                        alignment=alignment, kv=kv, data_offset=data_offset)
    cat._closers.append(mm.close)
    return cat


def _check_overlaps(path: str, spans) -> None:
    spans = sorted(s for s in spans if s[1] > s[0])
    end, owner = 0, None
    for begin, stop, name in spans:
        if begin < end:
            raise FormatError(path, f"tensors {owner!r} and {name!r} overlap in the data section (bytes {begin}..{min(end, stop)})")
        if stop > end:
            end, owner = stop, name


def _orig_shape(path: str, name: str, kv: Dict[str, GGUFValue], count: int) -> Optional[Tuple[int, ...]]:
    v = kv.get(ORIG_SHAPE_PREFIX + name)
    if v is None:
        return None
    dims = v.value if v.type == "ARRAY" else None
    if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise FormatError(path, f"{ORIG_SHAPE_PREFIX}{name} is not an array of non-negative integers")
    if numel(dims) != count:
        raise FormatError(path, f"{ORIG_SHAPE_PREFIX}{name} = {dims} holds {numel(dims)} elements, the tensor {count}")
    return tuple(dims)


def _tensor(path: str, mm, name: str, ne: Tuple[int, ...], t: GGMLType, start: int, stored: int,
            kv: Dict[str, GGUFValue]) -> GGUFTensor:
    count = numel(ne)
    shape = tuple(reversed(ne))
    shape = _orig_shape(path, name, kv, count) or shape
    plain = PLAIN.get(t.name)
    if plain is not None:
        dt = DTYPES[plain]

        def load_plain() -> np.ndarray:
            if count == 0:
                return np.zeros(shape, dtype=dt.numpy)
            return np.frombuffer(mm, dtype=dt.numpy, count=count, offset=start).reshape(shape)

        return GGUFTensor(name, dt, shape, loader=load_plain, span=FileSpan(path, start, stored),
                          ggml_type=t, ne=ne, stored_nbytes=stored, file_offset=start)

    from sdtk.quant.dequant import can_dequantize

    def load_quantized() -> np.ndarray:
        if not can_dequantize(t):
            raise UnsupportedFormatError(path, f"tensor {name!r}: ggml type {t.name} cannot be decoded by sdtk "
                                               "(it reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K)")
        from sdtk.quant.dequant import dequantize

        raw = np.frombuffer(mm, dtype=np.uint8, count=stored, offset=start)
        return dequantize(raw, t, count).reshape(shape)

    return GGUFTensor(name, DTYPES["F32"], shape, loader=load_quantized, span=None,
                      ggml_type=t, ne=ne, stored_nbytes=stored, file_offset=start)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class GGUFOutTensor:
    """One tensor to write: `ne` in ggml order, `produce()` returns its bytes (uint8, exactly
    `nbytes`), called once, in file order, when the writer reaches it."""

    name: str
    ne: Tuple[int, ...]
    ggml_type: GGMLType
    produce: Any = field(repr=False)

    @property
    def nbytes(self) -> int:
        n = self.ne[0] if self.ne else 1
        rows = numel(self.ne[1:]) if self.ne else 1
        return rows * self.ggml_type.row_bytes(n)


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_scalar(type_name: str, value) -> bytes:
    if type_name == "STRING":
        return _encode_string(value)
    fmt = VALUE_TYPES[VALUE_TYPE_ID[type_name]][1]
    return struct.pack(fmt, value)


def encode_kv(kv: Dict[str, GGUFValue]) -> bytes:
    out = bytearray()
    for key, v in kv.items():
        out += _encode_string(key) + struct.pack("<I", VALUE_TYPE_ID[v.type])
        if v.type == "ARRAY":
            items = list(v.value)
            out += struct.pack("<IQ", VALUE_TYPE_ID[v.item_type], len(items))
            for item in items:
                out += _encode_scalar(v.item_type, item)
        else:
            out += _encode_scalar(v.type, v.value)
    return bytes(out)


def gguf_header(kv: Dict[str, GGUFValue], tensors, alignment: int = DEFAULT_ALIGNMENT) -> Tuple[bytes, List[int]]:
    """Header bytes (padded to the alignment) and each tensor's offset in the data section."""
    head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    head += encode_kv(kv)
    offsets, offset = [], 0
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
        if t.ne and t.ne[0] % t.ggml_type.block:
            raise ValueError(f"tensor {t.name!r}: row length {t.ne[0]} is not a multiple of the {t.ggml_type.name} block size")
        head += _encode_string(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
        head += struct.pack("<IQ", t.ggml_type.id, offset)
        offsets.append(offset)
        offset += t.nbytes + (-t.nbytes) % alignment
    head += b"\x00" * ((-len(head)) % alignment)
    return bytes(head), offsets


def write_gguf(dest: "os.PathLike[str] | str", kv: Dict[str, GGUFValue], tensors, *, inputs=(), overwrite: bool = False,
               alignment: int = DEFAULT_ALIGNMENT, on_tensor=None) -> int:
    """Stream `tensors` (GGUFOutTensor) into a new GGUF v3 file at `dest`, atomically (temp file
    beside it, fsync, rename; nothing left on error). Peak memory: about one tensor. Returns bytes."""
    from sdtk.errors import OutputError
    from sdtk.fileio import AtomicOutput

    tensors = list(tensors)
    try:
        header, _ = gguf_header(kv, tensors, alignment)
    except ValueError as e:
        raise OutputError(dest, str(e)) from None
    total = len(header)
    with AtomicOutput(dest, inputs=inputs, overwrite=overwrite) as out:
        out.write(header)
        for t in tensors:
            data = t.produce()
            data = memoryview(np.ascontiguousarray(data)).cast("B")
            if len(data) != t.nbytes:
                raise OutputError(dest, f"tensor {t.name!r}: produced {len(data)} bytes, {t.ggml_type.name} {list(t.ne)} needs {t.nbytes}")
            out.write(data)
            pad = (-t.nbytes) % alignment
            if pad:
                out.write(b"\x00" * pad)
            total += t.nbytes + pad
            del data
            if on_tensor is not None:
                on_tensor(t, total)
    return total
