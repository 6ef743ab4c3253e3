"""Legacy stacked-pickle torch files (torch < 1.6, old embeddings/hypernetworks) and plain pickles.

Legacy layout (torch/serialization.py `_legacy_save` / `_legacy_load`): five pickles back to
back (magic number 0x1950a86a20f9469cfc6c, protocol version 1001, sys_info, the object whose
storages are persistent ids `('storage', type, key, location, numel, view_metadata)`, the sorted
list of storage keys), then for each key an int64 element count and the storage's raw bytes.
Every pickle goes through our own interpreter; storages are views of an mmap of the file.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Dict, List, Tuple

from sdtk.errors import FormatError, SdtkError, UnsafeFileError
from sdtk.fileio import open_input
from sdtk.formats.catalogue import Catalogue
from sdtk.formats.checkpoint_tree import flatten_checkpoint
from sdtk.formats.source import unpack_at
from sdtk.formats.picklevm import PickleVM, StorageRef, StorageType
from sdtk.formats.torchzip import lazy_tensor, note_overlapping, storage_persistent_load

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch/serialization.py PROTOCOL_VERSION


def _map(path: str, source=None):
    if source is not None:  # formats.source.ByteSource: a RangeBuffer instead of an mmap
        if source.size == 0:
            raise FormatError(path, "empty file")
        return source.buffer(), source.size
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError(path, "empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def _run(buf, path: str, pos: int, what: str, persistent_load=None) -> Tuple[Any, int, int]:
    vm = PickleVM(buf, path=path, what=what, persistent_load=persistent_load)
    value, end = vm.run(pos)
    return value, end, vm.ops


def legacy_contents(path: str, buf, size: int):
    """(root object, {key: (StorageRef, data offset)}, ops, end offset) of a legacy file."""
    magic, pos, _ = _run(buf, path, 0, "legacy magic pickle")
    if magic != LEGACY_MAGIC:
        raise FormatError(path, "not a legacy PyTorch file (wrong magic number)")
    proto, pos, _ = _run(buf, path, pos, "legacy protocol pickle")
    if proto != LEGACY_PROTOCOL:
        raise FormatError(path, f"legacy PyTorch protocol version {proto!r} is not supported (expected {LEGACY_PROTOCOL})")
    sys_info, pos, _ = _run(buf, path, pos, "legacy sys_info pickle")
    if not isinstance(sys_info, dict):
        raise FormatError(path, "legacy sys_info pickle is not a dict")
    big_endian = sys_info.get("little_endian", True) is False
    roots: Dict[str, StorageRef] = {}
    views: List[Tuple[StorageRef, str]] = []

    def make_ref(key: str, stype: StorageType, location: str, numel: int, view) -> StorageRef:
        itemsize = stype.dtype.itemsize if stype.dtype is not None else 1
        root = roots.get(key)
        if root is None:
            root = roots[key] = StorageRef(key, stype, location, numel, numel * itemsize, handle=key)
        elif root.storage_type.torch_name != stype.torch_name:
            raise FormatError(path, f"storage {key!r} is used with two different types")
        if view is None:
            return root
        # old torch views: (view_key, offset, view_size) in elements of the root storage
        if (not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[0], str)
                or type(view[1]) is not int or type(view[2]) is not int or view[1] < 0 or view[2] < 0):
            raise FormatError(path, "malformed storage view metadata")
        view_key, offset, view_size = view
        if (offset + view_size) * itemsize > root.nbytes:
            raise FormatError(path, f"storage view {view_key!r} reaches past the end of storage {key!r}")
        ref = StorageRef(view_key, stype, location, view_size, view_size * itemsize, handle=key, base_offset=offset * itemsize)
        views.append((ref, key))
        return ref

    root_obj, pos, ops = _run(buf, path, pos, "legacy main pickle", storage_persistent_load(path, make_ref))
    keys, pos, _ = _run(buf, path, pos, "legacy storage-keys pickle")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise FormatError(path, "legacy storage-keys pickle is not a list of distinct keys")
    offsets: Dict[str, int] = {}
    for key in keys:
        ref = roots.get(key)
        if ref is None:
            raise FormatError(path, f"storage {key!r} listed but not used by the main pickle")
        if pos + 8 > size:
            raise FormatError(path, f"truncated: storage {key!r} is missing")
        (count,) = unpack_at(">q" if big_endian else "<q", buf, pos)
        if count != ref.numel:
            raise FormatError(path, f"storage {key!r} holds {count} elements but the pickle says {ref.numel}")
        offsets[key] = pos + 8
        pos += 8 + ref.nbytes
        if pos > size:
            raise FormatError(path, f"truncated: storage {key!r} runs past the end of the file")
    missing = [k for k in roots if k not in offsets]
    if missing:
        raise FormatError(path, f"storage {missing[0]!r} used by the main pickle has no data")
    return root_obj, offsets, ops, pos, big_endian


def read_torch_legacy(path: "os.PathLike[str] | str", *, source=None) -> Catalogue:
    """Open a legacy (torch < 1.6) stacked-pickle file lazily through our own interpreter."""
    path = os.fspath(path)
    buf, size = _map(path, source)
    try:
        root, offsets, ops, end, big = legacy_contents(path, buf, size)
        tensors, extras = flatten_checkpoint(root, path, budget=4 * ops + 10_000)
        cat = Catalogue(path=path, format="torch-legacy", tensors={}, extras=extras, file_size=size)
        for name, t in tensors:
            base = offsets[t.storage.handle] + t.storage.base_offset
            cat.tensors[name] = lazy_tensor(name, t, buf, base, path, big, lambda: None)
        if end != size:
            refuse_hidden_pickles(path, buf, size, end)
            cat.notes.append(f"{size - end} bytes after the last storage (ignored by torch)")
        note_overlapping(cat, tensors)
        if big:
            cat.notes.append("big-endian checkpoint: tensors are converted to little-endian when read")
    except BaseException:
        buf.close()
        raise
    cat._closers.append(buf.close)
    return cat


def stacked_pickles(path: str, buf, size: int) -> Tuple[List[Any], int, List[str]]:
    """Interpret every pickle stacked in a file (attackers hide payloads in the 2nd one).

    Returns (values, ops, notes). Unsafe content anywhere raises UnsafeFileError; bytes after the
    first pickle that are not a pickle only earn a note (pickle.load never reads them)."""
    values, notes, pos, ops = [], [], 0, 0
    while pos < size:
        try:
            value, end, n = _run(buf, path, pos, f"pickle #{len(values) + 1}")
        except UnsafeFileError:
            raise
        except SdtkError:
            if not values:
                raise
            notes.append(f"{size - pos} bytes after the pickle are not a pickle (ignored)")
            break
        values.append(value)
        ops += n
        pos = end
    return values, ops, notes


def refuse_hidden_pickles(path: str, buf, size: int, start: int) -> None:
    """Bytes after what a loader reads are interpreted too: UnsafeFileError if they hold a
    pickle that names a global outside the allowlist (other tools read past the end)."""
    pos, index = start, 0
    while pos < size:
        index += 1
        try:
            _, pos, _ = _run(buf, path, pos, f"trailing pickle #{index}")
        except UnsafeFileError:
            raise
        except SdtkError:
            return


def read_plain_pickle(path: "os.PathLike[str] | str", *, source=None) -> Catalogue:
    """A plain pickle (no torch storages): its plain values as extras, never any tensors."""
    path = os.fspath(path)
    buf, size = _map(path, source)
    try:
        values, ops, notes = stacked_pickles(path, buf, size)
        tensors, extras = flatten_checkpoint(values[0], path, budget=4 * ops + 10_000)
    finally:
        buf.close()
    cat = Catalogue(path=path, format="pickle", tensors={}, extras=extras, file_size=size, notes=notes)
    if len(values) > 1:
        cat.notes.append(f"{len(values)} pickles stacked in one file; only the first is what pickle.load returns")
    cat.notes.append("a plain pickle holds no tensors (no torch storages)")
    return cat


def refuse_hidden_pickle_payload(path: "os.PathLike[str] | str", source=None) -> None:
    """For files of no known format: raise UnsafeFileError if they are in fact a (protocol 0)
    pickle naming a global outside the allowlist; otherwise return (the caller refuses the file)."""
    path = os.fspath(path)
    buf, size = _map(path, source)
    try:
        stacked_pickles(path, buf, size)
    except UnsafeFileError:
        raise
    except SdtkError:
        pass
    finally:
        buf.close()
