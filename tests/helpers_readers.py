"""Helpers for reader/scan tests: a tiny pickle assembler, torch-zip surgery, payloads, expected data.

Payloads are assembled opcode by opcode (never by pickling live objects), so the tests need
neither torch nor the modules a payload names.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
TORCH_DATA = DATA / "torch"
CORPUS = DATA / "picklescan"


class Asm:
    """Build pickle bytes opcode by opcode: Asm().proto(2).global_("os", "system")...stop()."""

    def __init__(self):
        self.out = bytearray()

    def raw(self, b: bytes) -> "Asm":
        self.out += b
        return self

    def proto(self, n: int = 2) -> "Asm":
        return self.raw(bytes([0x80, n]))

    def frame(self, n: int) -> "Asm":
        return self.raw(b"\x95" + struct.pack("<Q", n))

    def global_(self, module: str, name: str) -> "Asm":
        return self.raw(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def stack_global(self, module: str, name: str) -> "Asm":
        return self.unicode(module).unicode(name).raw(b"\x93")

    def unicode(self, s: str) -> "Asm":
        b = s.encode()
        return self.raw(b"X" + struct.pack("<I", len(b)) + b)

    def int_(self, n: int) -> "Asm":
        return self.raw(b"J" + struct.pack("<i", n))

    def mark(self) -> "Asm":
        return self.raw(b"(")

    def tuple_(self) -> "Asm":
        return self.raw(b"t")

    def tuple1(self) -> "Asm":
        return self.raw(b"\x85")

    def reduce(self) -> "Asm":
        return self.raw(b"R")

    def empty_dict(self) -> "Asm":
        return self.raw(b"}")

    def empty_tuple(self) -> "Asm":
        return self.raw(b")")

    def setitem(self) -> "Asm":
        return self.raw(b"s")

    def binpersid(self) -> "Asm":
        return self.raw(b"Q")

    def false(self) -> "Asm":
        return self.raw(b"\x89")

    def stop(self) -> "Asm":
        return self.raw(b".")

    def bytes(self) -> bytes:
        return bytes(self.out)

    # -- composite: a torch tensor as torch.save writes it --------------------------------------
    def tensor(self, key: str, storage_type: str, numel: int, offset: int, size, stride) -> "Asm":
        self.global_("torch._utils", "_rebuild_tensor_v2").mark()
        self.mark().unicode("storage").global_("torch", storage_type).unicode(key).unicode("cpu").int_(numel).tuple_().binpersid()
        self.int_(offset)
        self.mark()
        for s in size:
            self.int_(s)
        self.tuple_().mark()
        for s in stride:
            self.int_(s)
        self.tuple_().false()
        self.global_("collections", "OrderedDict").empty_tuple().reduce()
        return self.tuple_().reduce()


def os_system_payload(marker: Path, proto: int = 2) -> bytes:
    """pickle.loads of this runs `touch marker` (protocol 0-2 GLOBAL + REDUCE)."""
    return Asm().proto(proto).global_("os", "system").unicode(f"touch {marker}").tuple1().reduce().stop().bytes()


def exec_payload(marker: Path) -> bytes:
    """builtins.exec of Python that writes the marker file."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return Asm().proto(2).global_("builtins", "exec").unicode(code).tuple1().reduce().stop().bytes()


def dotted_payload(marker: Path) -> bytes:
    """Protocol-4 dotted lookup: builtins `getattr.__self__.exec` reaches exec through a dotted name."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return Asm().proto(4).stack_global("builtins", "getattr.__self__.exec").unicode(code).tuple1().reduce().stop().bytes()


def frame_hidden_payload(marker: Path) -> bytes:
    """A FRAME that ends in the middle of an opcode: tools that treat frames as opcode boundaries
    stop early, while CPython's C unpickler reads straight through and runs the payload."""
    body = Asm().global_("os", "system").unicode(f"touch {marker}").tuple1().reduce().stop().bytes()
    return Asm().proto(4).frame(3).raw(body).bytes()


def torch_zip(entries, path: Path) -> Path:
    """Write a zip of (name, bytes) records, STORED, in order (Python zipfile: contiguous records)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name), data)
    return path


def torch_zip_records(path: Path):
    """The (name, bytes) records of a zip, in order."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def minimal_checkpoint_records(data_pkl: bytes, storages=(), top="archive"):
    return [(f"{top}/data.pkl", data_pkl)] + [(f"{top}/data/{k}", v) for k, v in storages] + [(f"{top}/version", b"3\n")]


def expected(name: str):
    """(tensor meta {name: [torch dtype, shape]}, bit patterns list, extras) for a committed file."""
    z = np.load(TORCH_DATA / f"{name}.expected.npz")
    meta = json.loads(bytes(z["__meta__"]))
    bits = [z[f"t{i}"] for i in range(len(meta["tensors"]))]
    return meta["tensors"], bits, meta["extras"]


def bits_of(arr: np.ndarray) -> np.ndarray:
    """An array's exact bits as unsigned integers (NaN-safe; bf16/fp8 included)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    return arr.reshape(-1).view(f"<u{arr.dtype.itemsize}").reshape(arr.shape)


def torch_bits(t) -> np.ndarray:
    """A torch tensor's exact bits as unsigned integers."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy().view(f"<u{t.element_size()}").reshape(tuple(t.shape))


def plain_json(value):
    return json.loads(json.dumps(value, default=str))


def zip_bytes(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def sparse_zip(path: Path, records) -> Path:
    """A STORED zip whose records are bytes, or an int size for a sparse zero-filled record
    (its CRC is left 0, i.e. wrong unless empty). No ZIP64: keep the total under 4 GiB."""
    import zlib

    central = bytearray()
    with open(path, "wb") as f:
        for name, data in records:
            offset = f.tell()
            size = data if isinstance(data, int) else len(data)
            crc = 0 if isinstance(data, int) else zlib.crc32(data)
            nb = name.encode()
            f.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size, len(nb), 0) + nb)
            if isinstance(data, int):
                f.seek(size, 1)
            else:
                f.write(data)
            central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, size, size,
                                   len(nb), 0, 0, 0, 0, 0, offset) + nb
        cd_offset = f.tell()
        f.write(central)
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central), cd_offset, 0))
    return path
