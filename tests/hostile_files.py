"""Hostile and malformed files, built byte by byte (issue 16's classes): polyglots torch reads as
tar archives, zip name and directory tricks, numpy object arrays under every spelling, hashing
and copying bombs, geometry that does not fit, headers that crash parsers, text that attacks
terminals. Executing payloads only ever `touch` a marker file.

`HOSTILE` maps a file name to (builder, expected scan verdict, loader that runs the payload or
None). Loaders: "torch" (torch.load(weights_only=False)), "pickle" (pickle.load), "numpy"
(np.load(allow_pickle=True), every array of an .npz read). Used by tests/test_hardening.py and
bench/hostile_corpus.py.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from helpers_readers import Asm, os_system_payload, zip_bytes

BLOCK = 512


# ---------------------------------------------------------------------------------------------
# tar (old-style V7 headers: no `ustar` magic)


def _octal(n: int, width: int) -> bytes:
    return (b"%0*o " % (width - 1, n))  # digits then a space: no NUL (fits JSON strings too)


def tar_header(name: bytes, size: int, *, fill: Optional[bytes] = None) -> bytearray:
    """A V7 header block. `fill`, if given, is the whole block to start from (the fields are
    written over it): polyglots put other formats' bytes where tar ignores them."""
    block = bytearray(fill if fill is not None else bytes(BLOCK))
    assert len(block) == BLOCK
    if fill is None:
        block[0:len(name)] = name
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(0, 12)
    block[156:157] = b"0"
    set_tar_checksum(block)
    return block


def set_tar_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%07o " % sum(block)  # tarfile accepts octal ended by a space


def tar_members(members: List[Tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for name, data in members:
        out += tar_header(name, len(data))
        out += data + bytes(-len(data) % BLOCK)
    return bytes(out + bytes(2 * BLOCK))


def torch_tar_payload_members(marker: Path) -> List[Tuple[bytes, bytes]]:
    """The members torch's legacy_load extracts, `storages` first (its pickle runs first)."""
    return [(b"storages", os_system_payload(marker)), (b"tensors", b"\x80\x02K\x00."), (b"pickle", b"\x80\x02}.")]


def tar_pickle_polyglot(marker: Path) -> bytes:
    """pickle.load: `{}` (the first member's name is `}.`). torch.load: a tar, `storages` runs."""
    return tar_members([(b"}.", b"")] + torch_tar_payload_members(marker))


def _legacy_stream(main: bytes) -> bytes:
    magic = Asm().proto(2).raw(b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")).stop().bytes()
    proto = Asm().proto(2).raw(b"M\xe9\x03").stop().bytes()
    sys_info = Asm().proto(2).empty_dict().stop().bytes()
    keys = Asm().proto(2).raw(b"]").stop().bytes()
    return magic + proto + sys_info + main + keys


def tar_legacy_polyglot(marker: Path) -> bytes:
    """A valid legacy torch checkpoint (no tensors) whose first 512 bytes are a V7 tar header:
    the tar fields sit inside a string the main pickle pushes and pops."""
    head = _legacy_stream(b"")[:-4]  # magic, protocol, sys_info pickles (without the keys pickle)
    assert len(head) < 90
    prefix = head + b"\x80\x02X"  # main pickle: BINUNICODE spanning the rest of the header block
    text_len = BLOCK - (len(prefix) + 4) + 8  # the string ends 8 bytes into the next block
    block = bytearray(prefix + struct.pack("<I", text_len) + b" " * (BLOCK - len(prefix) - 4))
    first_data = b" " * 8 + b"0}." + Asm().proto(2).raw(b"]").stop().bytes()  # end of string, POP, {} STOP, keys []
    hdr = tar_header(b"", len(first_data), fill=bytes(block))
    return bytes(hdr) + first_data + bytes(-len(first_data) % BLOCK) + tar_members(torch_tar_payload_members(marker))


def tar_safetensors_polyglot(marker: Path) -> bytes:
    """A valid safetensors file (one U8 tensor) whose first 512 bytes are a V7 tar header: the
    tar fields inside a metadata string; the tar members are the tensor's bytes."""
    members = tar_members(torch_tar_payload_members(marker))
    header_len = 2 * BLOCK - 8
    start = b'{"__metadata__":{"a":"'
    tail = b'"},"x":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (len(members), len(members))
    text = start + b" " * (header_len - len(start) - len(tail)) + tail
    block = bytearray(struct.pack("<Q", header_len) + text[:BLOCK - 8])
    hdr = tar_header(b"", BLOCK, fill=bytes(block))  # member 1 = the rest of the JSON header
    assert bytes(hdr[8:]).decode("ascii").isprintable() and b'"' not in hdr[len(start) + 8:]
    return bytes(hdr) + text[BLOCK - 8:] + members


# ---------------------------------------------------------------------------------------------
# zip


def protocol0_payload(marker: Path) -> bytes:
    """`os.system('touch marker')` in protocol 0 (does not start with a PROTO opcode)."""
    return b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


def zip_upper_data_pkl(marker: Path) -> bytes:
    """Only `archive/DATA.PKL`: torch finds it as data.pkl (names compared ignoring case)."""
    return zip_bytes([("archive/DATA.PKL", protocol0_payload(marker)), ("archive/version", b"3\n")])


def zip_case_duplicate(marker: Path) -> bytes:
    """`archive/data.pkl` (benign) and `archive/DATA.pkl` (payload): torch's case-insensitive
    binary search lands on the payload."""
    return zip_bytes([("archive/data.pkl", b"\x80\x02}."), ("archive/version", b"3\n"),
                      ("archive/DATA.pkl", protocol0_payload(marker))])


def zip_hidden_eocd(marker: Path) -> bytes:
    """A benign checkpoint whose archive comment holds a payload record, a second central
    directory and a second EOCD: Python's zipfile and torch (miniz) read the last EOCD."""
    benign = zip_bytes([("archive/data.pkl", b"\x80\x02}."), ("archive/version", b"3\n")])
    with zipfile.ZipFile(io.BytesIO(benign)) as z:
        infos = z.infolist()
    eocd1 = benign.rindex(b"PK\x05\x06")
    comment_start = eocd1 + 22
    payload = protocol0_payload(marker)
    name = b"archive/data.pkl"
    crc = zlib.crc32(payload)
    local_off = comment_start
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(payload), len(payload), len(name), 0) + name + payload
    cd = bytearray()
    cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(payload), len(payload), len(name), 0, 0, 0, 0, 0, local_off) + name
    version = [i for i in infos if i.filename == "archive/version"][0]
    vname = b"archive/version"
    cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, version.CRC, version.compress_size,
                      version.file_size, len(vname), 0, 0, 0, 0, 0, version.header_offset) + vname
    cd_off = local_off + len(local)
    # the second EOCD claims a 5-byte comment that is not there: a reader that insists on a
    # comment reaching the end of the file skips it and reads the first one
    eocd2 = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 2, 2, len(cd), cd_off, 5)
    comment = local + bytes(cd) + eocd2
    return benign[:eocd1 + 20] + struct.pack("<H", len(comment)) + comment


# ---------------------------------------------------------------------------------------------
# numpy


def npy_bytes(descr: str, body: bytes, shape: str = "(1,)") -> bytes:
    header = ("{'descr': %s, 'fortran_order': False, 'shape': %s, }" % (descr, shape)).encode("latin-1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


NPY_OBJECT_DESCRS = {
    "O": "'O'", "pipe_O": "'|O'", "object": "'object'", "object_": "'object_'", "O8": "'O8'",
    "structured": "[('a', '<f4'), ('b', '|O')]", "nested": "[('s', [('x', '<i4'), ('y', 'O')])]",
    "subarray": "[('v', '|O', (2,))]",
}


def npy_object(marker: Path, descr: str) -> bytes:
    return npy_bytes(descr, os_system_payload(marker))


def npz_unnamed_member(marker: Path) -> bytes:
    """An .npz whose object array member has no .npy suffix (np.load reads any member that
    starts with the .npy magic)."""
    return zip_bytes([("weights", npy_object(marker, "'object'"))])


# ---------------------------------------------------------------------------------------------
# bounded work


def dag_key_pickle(depth: int = 60) -> bytes:
    """~700 bytes: t0 = (1, 1); t(i+1) = (t(i), t(i)) from memo references; {t60: None}.
    Hashing t60 walks 2^60 paths (pickle.load hangs too)."""
    a = Asm().proto(2).raw(b"K\x01K\x01\x86q\x00")
    for i in range(depth):
        a.raw(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]))
    return a.raw(b"0}h" + bytes([depth]) + b"Ns.").bytes()


def text_lines_pickle(n_bytes: int) -> bytes:
    """A protocol-0 list of INT lines, about n_bytes long (one opcode per line)."""
    items = b"I7\na" * (n_bytes // 5)
    return b"(lp0\n" + items + b"."


def deflate_bomb(inflated: int = 32 << 20) -> bytes:
    """archive/data.pkl: a pickle of one big string, deflated ~1000:1."""
    pkl = b"\x80\x02X" + struct.pack("<I", inflated - 8) + b"a" * (inflated - 8) + b"."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), pkl, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(zipfile.ZipInfo("archive/version"), b"3\n")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# geometry


def view_checkpoint(size, stride, numel: int = 1, storage: str = "FloatStorage", itemsize: int = 4) -> bytes:
    """A torch zip checkpoint with one tensor viewing a `numel`-element storage."""
    pkl = (Asm().proto(2).empty_dict().unicode("w").tensor("0", storage, numel, 0, size, stride).setitem().stop().bytes())
    return zip_bytes([("archive/data.pkl", pkl), ("archive/data/0", bytes(numel * itemsize)), ("archive/version", b"3\n")])


def _big_int_tensor(size, stride) -> bytes:
    """Like view_checkpoint, with dimensions past 32 bits (LONG1 operands)."""
    a = Asm().proto(2).empty_dict().unicode("w")
    a.global_("torch._utils", "_rebuild_tensor_v2").mark()
    a.mark().unicode("storage").global_("torch", "FloatStorage").unicode("0").unicode("cpu").int_(1).tuple_().binpersid()
    a.int_(0)

    def long(n):
        raw = n.to_bytes((n.bit_length() + 8) // 8 or 1, "little", signed=True)
        a.raw(b"\x8a" + bytes([len(raw)]) + raw)

    a.mark()
    for s in size:
        long(s)
    a.tuple_().mark()
    for s in stride:
        long(s)
    a.tuple_().false().global_("collections", "OrderedDict").empty_tuple().reduce().tuple_().reduce().setitem().stop()
    return zip_bytes([("archive/data.pkl", a.bytes()), ("archive/data/0", bytes(4)), ("archive/version", b"3\n")])


def safetensors_raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# ---------------------------------------------------------------------------------------------
# text


MARKUP_AND_ESCAPES = "[bold red]x[/x] [/] \x1b]0;pwned\x07\x1b[2J\u202eevil"


def safetensors_with_metadata(value: str) -> bytes:
    header = json.dumps({"__metadata__": {"title": value, value: "v"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return safetensors_raw(header, bytes(4))


def forging_global_pickle() -> bytes:
    """A STACK_GLOBAL whose module name holds a tab and a newline (forges a `scan --lines` record)."""
    return Asm().proto(4).stack_global("posix\tsafe\tforged record\nsafe", "system").unicode("true").tuple1().reduce().stop().bytes()


# ---------------------------------------------------------------------------------------------
# The corpus: name -> (builder(marker) -> bytes, expected verdict, executing loader or None)

Builder = Callable[[Path], bytes]
HOSTILE: Dict[str, Tuple[Builder, str, Optional[str]]] = {
    "tar_pickle_polyglot.pkl": (tar_pickle_polyglot, "unsafe", "torch"),
    "tar_legacy_polyglot.pt": (tar_legacy_polyglot, "unsafe", "torch"),
    "tar_safetensors_polyglot.bin": (tar_safetensors_polyglot, "unsafe", "torch"),  # torch 2.13 hands *.safetensors to safetensors
    "zip_upper_data_pkl.ckpt": (zip_upper_data_pkl, "unsafe", "torch"),
    "zip_case_duplicate.ckpt": (zip_case_duplicate, "unsafe", "torch"),
    "zip_hidden_eocd.ckpt": (zip_hidden_eocd, "unsafe", "torch"),
    "npz_unnamed_member.npz": (npz_unnamed_member, "unsafe", "numpy"),
    **{f"npy_{k}.npy": ((lambda m, d=d: npy_object(m, d)), "unsafe", "numpy") for k, d in NPY_OBJECT_DESCRS.items()},
    "dag_key.pkl": (lambda m: dag_key_pickle(), "unreadable", None),
    "dag_key_in_zip.ckpt": (lambda m: zip_bytes([("archive/data.pkl", dag_key_pickle()), ("archive/version", b"3\n")]), "unreadable", None),
    "text_lines_1mb.pkl": (lambda m: text_lines_pickle(1 << 20), "safe", None),
    "deflate_bomb.ckpt": (lambda m: deflate_bomb(), "unreadable", None),
    "stride0_2e40.ckpt": (lambda m: _big_int_tensor((1 << 40,), (0,)), "unreadable", None),
    "broadcast_16k.ckpt": (lambda m: view_checkpoint((16384, 16384), (0, 0)), "unreadable", None),
    "shape_0_2e70.ckpt": (lambda m: _big_int_tensor((0, 1 << 70), (1, 1)), "unreadable", None),
    "shape_0_2e62x8.safetensors": (lambda m: safetensors_raw(b'{"w":{"dtype":"F32","shape":[0,4611686018427387904,8],"data_offsets":[0,0]}}'), "unreadable", None),
    "nested_json.safetensors": (lambda m: safetensors_raw(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "unreadable", None),
    "lone_surrogate.safetensors": (lambda m: safetensors_raw(b'{"__metadata__":{"t":"\\ud800"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)), "unreadable", None),
    "markup_metadata.safetensors": (lambda m: safetensors_with_metadata(MARKUP_AND_ESCAPES), "safe", None),
    "forging_global.pkl": (lambda m: forging_global_pickle(), "unsafe", None),
}


def write_hostile(folder: Path, marker: Path, names=None) -> Dict[str, Path]:
    """Write the corpus (or `names` of it) into `folder`; returns name -> path."""
    out = {}
    for name, (build, _, _) in HOSTILE.items():
        if names is None or name in names:
            path = folder / name
            path.write_bytes(build(marker))
            out[name] = path
    return out
