""".npy headers as numpy reads them, to tell whether np.load would unpickle the array.

Source: numpy/lib/format.py (magic `\\x93NUMPY`, version 1: u16 header length, versions 2 and 3:
u32; the header a Python literal dict read with `ast.literal_eval`; `read_array` unpickles the
data when `dtype.hasobject`, with no header size limit once allow_pickle=True).
"""
from __future__ import annotations

import ast
import struct

from sdtk.errors import FormatError, UnsafeFileError

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_LIMIT = 1 << 20  # .npy headers parsed (numpy: 10 kB by default, unlimited with allow_pickle)


def npy_header(data: bytes, what: str, path: str):
    # numpy/lib/format.py: magic, version, header length (u16 or u32), Python-literal dict
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise FormatError(path, f"{what}: not a .npy array")
    major = data[6]
    if major == 1:
        hlen, start = struct.unpack_from("<H", data, 8)[0], 10
    elif major in (2, 3):
        if len(data) < 12:
            raise FormatError(path, f"{what}: truncated .npy header")
        hlen, start = struct.unpack_from("<I", data, 8)[0], 12
    else:
        raise FormatError(path, f"{what}: unsupported .npy version {major}")
    if hlen > NPY_HEADER_LIMIT:  # numpy reads any size with allow_pickle=True
        raise UnsafeFileError(path, f"{what}: a {hlen}-byte .npy header (numpy's own limit is 10 kB unless allow_pickle=True); refused")
    if start + hlen > len(data):
        raise FormatError(path, f"{what}: truncated .npy header")
    try:
        header = ast.literal_eval(data[start:start + hlen].decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise FormatError(path, f"{what}: malformed .npy header") from None
    if not isinstance(header, dict) or "descr" not in header:
        raise FormatError(path, f"{what}: malformed .npy header")
    return header, start + hlen


def npy_has_objects(descr, what: str, path: str) -> bool:
    """numpy's own rule (numpy/lib/format.py read_array): the header's descr as numpy reads it
    (`descr_to_dtype`), and `dtype.hasobject`: 'O', '|O', 'object', 'object_', structured types
    with an object field anywhere. Building a dtype from a literal runs nothing."""
    from numpy.lib.format import descr_to_dtype

    try:
        return bool(descr_to_dtype(descr).hasobject)
    except Exception:  # numpy refuses the header too (np.load raises before reading anything)
        raise FormatError(path, f"{what}: the .npy header's dtype is not one numpy reads") from None


def refuse_npy(path: str, head: bytes) -> None:
    """open_model on an .npy: always refused (not a checkpoint); said to be unsafe when np.load
    would unpickle it."""
    from sdtk.errors import UnsupportedFormatError

    header, _ = npy_header(head, "the array", path)
    if npy_has_objects(header["descr"], "the array", path):
        raise UnsafeFileError(path, "a numpy object array: np.load(allow_pickle=True) would run its pickle; refused")
    raise UnsupportedFormatError(path, "a numpy .npy file, not a model checkpoint")
