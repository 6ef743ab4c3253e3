"""PyTorch zip checkpoints (.ckpt .pt .pth .bin) through our own restricted pickle interpreter.

Layout (torch/serialization.py `_save`, caffe2/serialize/inline_container.cc): a zip whose top
folder is named by its first record; `<top>/data.pkl` (the pickle), `<top>/data/<key>` (one raw
storage each, STORED, 64-byte aligned), `<top>/version`, `<top>/byteorder` ("little"/"big",
absent = little), `.data/serialization_id`, `.format_version`, `.storage_alignment`.
A `constants.pkl` record means TorchScript, which we refuse by name.

Opening reads the zip directory and `data.pkl` only; storages are views of an mmap of the file,
read (and their CRC checked) when a tensor is read.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

from sdtk.errors import FormatError, UnsafeFileError, UnsupportedFormatError
from sdtk.fileio import open_input
from sdtk.formats.catalogue import Catalogue
from sdtk.formats.checkpoint_tree import flatten_checkpoint
from sdtk.formats.source import buffer_window
from sdtk.formats.picklevm import PickleVM, StorageRef, StorageType, TensorRef
from sdtk.formats.zipread import STORED, ZipArchive, ZipEntry, fold_name, read_zip
from sdtk.tensors import FileSpan, LazyTensor

# caffe2/serialize/inline_container.h: kMinSupportedFileFormatVersion .. kMaxSupportedFileFormatVersion
MIN_VERSION, MAX_VERSION = 1, 0xA
SMALL_RECORD = 1 << 20  # records checked (CRC) when the file is opened
PICKLE_INFLATE_LIMIT = 4 << 20  # a deflated data.pkl past this must keep a plausible ratio (zipread)
# Records torch writes besides data.pkl and data/<key> (torch/serialization.py, inline_container.cc)
KNOWN_RECORDS = ("version", ".data/version", "byteorder", ".data/serialization_id", ".format_version", ".storage_alignment")


@dataclass
class TorchZipLayout:
    top: str
    pickle: ZipEntry
    storages: Dict[str, ZipEntry]
    big_endian: bool
    version: int
    others: List[ZipEntry]


def top_folder(archive: ZipArchive) -> str:
    """The archive's top folder, taken from its first record (never assumed to be `archive`)."""
    if not archive.entries:
        raise FormatError(archive.path, "empty zip archive (no PyTorch records)")
    first = archive.entries[0].name
    if "/" not in first:
        refuse_numpy_objects(archive)
        if all(e.name.endswith(".npy") for e in archive.entries):
            raise UnsupportedFormatError(archive.path, "a numpy .npz archive, not a PyTorch checkpoint")
        raise FormatError(archive.path, f"zip archive is not a PyTorch checkpoint (first record {first!r} has no top folder)")
    return first.split("/", 1)[0]


def torchscript_records(archive: ZipArchive) -> List[str]:
    return [e.name for e in archive.entries if fold_name(e.name).endswith("/constants.pkl") or "/code/" in fold_name(e.name)]


def folded_names(archive: ZipArchive) -> Dict[str, ZipEntry]:
    """Records by name as torch looks them up: ASCII case ignored (miniz without
    MZ_ZIP_FLAG_CASE_SENSITIVE); names that differ only in case are refused by the zip reader."""
    return {fold_name(e.name): e for e in archive.entries}


def torch_layout(archive: ZipArchive) -> TorchZipLayout:
    """Find the records torch reads (after `archive.raise_issues()`), looked up as torch does."""
    path = archive.path
    top = top_folder(archive)
    names = folded_names(archive)
    script = torchscript_records(archive)
    if script:
        raise UnsupportedFormatError(path, f"TorchScript archive ({script[0]!r}): it contains code; refused (export the weights as a state dict)")
    pkl = names.get(fold_name(f"{top}/data.pkl"))
    if pkl is None:
        raise FormatError(path, f"zip archive has no {top}/data.pkl record (not a PyTorch checkpoint)")
    storages: Dict[str, ZipEntry] = {}
    others: List[ZipEntry] = []
    prefix = fold_name(f"{top}/data/")
    for e in archive.entries:
        folded = fold_name(e.name)
        if folded.startswith(prefix) and folded != prefix:
            storages[folded[len(prefix):]] = e
        elif e is not pkl:
            others.append(e)
    version = _version(archive, names, top)
    big = _big_endian(archive, names, top)
    return TorchZipLayout(top, pkl, storages, big, version, others)


def _small_text(archive: ZipArchive, entry: ZipEntry) -> str:
    if entry.size > 64:
        raise FormatError(archive.path, f"zip record {entry.name!r} is {entry.size} bytes; expected a short text")
    try:
        return archive.read(entry).decode("ascii").strip()
    except UnicodeDecodeError:
        raise FormatError(archive.path, f"zip record {entry.name!r} is not text") from None


def _version(archive: ZipArchive, names: Dict[str, ZipEntry], top: str) -> int:
    entry = names.get(fold_name(f"{top}/.data/version")) or names.get(fold_name(f"{top}/version"))
    if entry is None:
        raise FormatError(archive.path, f"zip archive has no {top}/version record (not a PyTorch checkpoint)")
    text = _small_text(archive, entry)
    if not text.isdigit() or not MIN_VERSION <= int(text) <= MAX_VERSION:
        raise UnsupportedFormatError(archive.path, f"PyTorch archive format version {text!r} is not supported (expected {MIN_VERSION}..{MAX_VERSION})")
    return int(text)


def _big_endian(archive: ZipArchive, names: Dict[str, ZipEntry], top: str) -> bool:
    entry = names.get(fold_name(f"{top}/byteorder"))
    if entry is None:
        return False
    text = _small_text(archive, entry)
    if text not in ("little", "big"):
        raise FormatError(archive.path, f"byteorder record says {text!r} (expected 'little' or 'big')")
    return text == "big"


# --------------------------------------------------------------------------------------------
# Storages and tensors


def storage_persistent_load(path: str, make_ref: Callable[[str, StorageType, str, int, Optional[tuple]], StorageRef]):
    """The persistent_load callback: validates torch's storage ids, caches one ref per key.

    torch/serialization.py `_load.persistent_load`: ('storage', storage_type, key, location, numel)
    (legacy files add a 6th element, view_metadata)."""
    cache: Dict[str, StorageRef] = {}

    def load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # legacy torch saves nn.Module classes as ('module', class, source file, source text);
            # the class itself came through the allowlist, the source is only text (never run)
            if not isinstance(pid[2], str) or not isinstance(pid[3], str):
                raise FormatError(path, "malformed module persistent id")
            return pid[1]
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            first = pid[0] if isinstance(pid, tuple) and pid else pid
            raise FormatError(path, f"unexpected persistent id {str(first)[:40]!r} (expected a torch storage)")
        if len(pid) not in (5, 6):
            raise FormatError(path, "malformed storage persistent id")
        _, stype, key, location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, StorageType):
            raise FormatError(path, "storage persistent id does not name a torch storage type")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise FormatError(path, "malformed storage persistent id")
        cached = cache.get(key)
        if cached is not None and view is None:
            if cached.storage_type.torch_name != stype.torch_name:
                raise FormatError(path, f"storage {key!r} is used with two different types")
            return cached
        ref = make_ref(key, stype, location, numel, view)
        if view is None:
            cache[key] = ref
        return ref

    return load


def is_c_contiguous(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def lazy_tensor(name: str, t: TensorRef, buf, data_offset: int, path: str, big_endian: bool,
                verify: Callable[[], None]) -> LazyTensor:
    """A LazyTensor viewing `t`'s storage, whose bytes start at `data_offset` in `buf` (an mmap)."""
    dt = t.dtype
    assert dt is not None
    itemsize = dt.itemsize
    swap = big_endian and itemsize > 1
    shape, stride = t.shape, t.stride
    count = 1
    for d in shape:
        count *= d
    contiguous = is_c_contiguous(shape, stride)
    start = data_offset + t.offset * itemsize
    storage_elems = t.storage.nbytes // itemsize

    def load() -> np.ndarray:
        import numpy as np

        if count == 0:
            return np.zeros(shape, dtype=dt.numpy)
        # big-endian files: read as big-endian unsigned words, swap, then view as the dtype
        file_dtype = np.dtype(f">u{itemsize}") if swap else dt.numpy
        verify()
        if contiguous:
            window, at = buffer_window(buf, start, count * itemsize)
            arr = np.frombuffer(window, dtype=file_dtype, count=count, offset=at).reshape(shape)
        else:
            window, at = buffer_window(buf, start, (storage_elems - t.offset) * itemsize)
            base = np.frombuffer(window, dtype=file_dtype, count=storage_elems - t.offset, offset=at)
            arr = np.lib.stride_tricks.as_strided(base, shape=shape, strides=[s * itemsize for s in stride], writeable=False).copy()
        if swap:
            arr = arr.astype(f"<u{itemsize}").view(dt.numpy)
        return arr

    span = FileSpan(path, start, count * itemsize) if contiguous and not swap and count else None
    return LazyTensor(name, dt, tuple(shape), loader=load, span=span, verify=verify)


def note_overlapping(cat: Catalogue, tensors) -> None:
    """Report strided views that reach storage elements twice (broadcast / stride 0): they are
    read (and written) as copies, each element repeated."""
    names = [name for name, t in tensors if t.overlapping]
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        cat.notes.append(f"{len(names)} tensor(s) are overlapping or broadcast views of their storage "
                         f"({', '.join(names[:3])}{more}); they are read as full copies")


def _verifier(archive: ZipArchive, entry: ZipEntry) -> Callable[[], None]:
    def verify() -> None:
        if not archive.verify_crc(entry):
            raise FormatError(archive.path, f"CRC mismatch in zip record {entry.name!r} (the file is corrupt or was tampered with)")

    return verify


@dataclass
class TorchZipContents:
    archive: ZipArchive
    layout: TorchZipLayout
    root: Any
    ops: int


def load_torchzip_pickle(path: str, buf, size: int) -> TorchZipContents:
    """Strict zip parse + data.pkl interpreted by our VM (no tensor bytes read)."""
    archive = read_zip(path, buf, size)
    archive.raise_issues()
    layout = torch_layout(archive)
    for e in [layout.pickle] + layout.others:
        if e.size <= SMALL_RECORD or e is layout.pickle:
            if not archive.verify_crc(e):
                raise FormatError(path, f"CRC mismatch in zip record {e.name!r} (the file is corrupt or was tampered with)")
    data = archive.read(layout.pickle, limit=PICKLE_INFLATE_LIMIT)
    refuse_hidden_payloads(archive, layout)

    def make_ref(key: str, stype: StorageType, location: str, numel: int, view) -> StorageRef:
        if view is not None:
            raise FormatError(path, "storage view metadata in a zip checkpoint")
        entry = layout.storages.get(fold_name(key))
        if entry is None:
            raise FormatError(path, f"storage {key!r} named by data.pkl has no record {layout.top}/data/{key}")
        if entry.method != STORED:
            raise UnsupportedFormatError(path, f"storage record {entry.name!r} is compressed; torch writes storages uncompressed")
        itemsize = stype.dtype.itemsize if stype.dtype is not None else 1
        if stype.supported and numel * itemsize != entry.size:
            raise FormatError(path, f"storage {key!r}: {numel} x {itemsize} bytes expected but its record holds {entry.size}")
        return StorageRef(key, stype, location, numel, entry.size, handle=entry)

    vm = PickleVM(data, path=path, what=f"{layout.pickle.name}", persistent_load=storage_persistent_load(path, make_ref))
    root, end = vm.run(0)
    if end != len(data):
        raise FormatError(path, f"{len(data) - end} unexpected bytes after the end of {layout.pickle.name}")
    return TorchZipContents(archive, layout, root, vm.ops)


def refuse_numpy_objects(archive: ZipArchive, entries=None) -> None:
    """UnsafeFileError if a record is a numpy object array (np.load of the file reads it as an
    .npz and unpickles it)."""
    from sdtk.formats.npyheader import NPY_HEADER_LIMIT, NPY_MAGIC, npy_has_objects, npy_header

    for e in archive.entries if entries is None else entries:
        if archive.head(e, 8).startswith(NPY_MAGIC):
            header, _ = npy_header(archive.head(e, NPY_HEADER_LIMIT + 16), e.name, archive.path)
            if npy_has_objects(header["descr"], e.name, archive.path):
                raise UnsafeFileError(archive.path, f"zip record {e.name!r} is a numpy object array: np.load(allow_pickle=True) would run its pickle")


def refuse_hidden_payloads(archive: ZipArchive, layout: TorchZipLayout) -> None:
    """Records torch does not read but other loaders may: another pickle (interpreted; refused
    when it names a global outside the allowlist) or a numpy object array (np.load of the file
    reads it as an .npz and unpickles it). `sdtk scan` calls those unsafe, so no command reads them."""
    refuse_numpy_objects(archive, layout.others)
    for e in layout.others:
        head = archive.head(e, 8)
        if fold_name(e.name).endswith(".pkl") or (head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) > 1 else False):
            try:
                PickleVM(archive.read(e, verify=False, limit=PICKLE_INFLATE_LIMIT), path=archive.path, what=e.name).run(0)
            except UnsafeFileError:
                raise
            except (FormatError, UnsupportedFormatError):
                pass


def read_torchzip(path: "os.PathLike[str] | str", *, source=None) -> Catalogue:
    """Open a PyTorch zip checkpoint lazily: reads the zip directory and data.pkl only (with
    `source`, a formats.source.ByteSource, by range requests)."""
    path = os.fspath(path)
    with open_input(path) if source is None else source.open() as f:
        size = os.fstat(f.fileno()).st_size if source is None else source.size
        if size == 0:
            raise FormatError(path, "empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if source is None else source.buffer()
    try:
        contents = load_torchzip_pickle(path, mm, size)
        tensors, extras = flatten_checkpoint(contents.root, path, budget=4 * contents.ops + 10_000)
        cat = Catalogue(path=path, format="torch-zip", tensors={}, extras=extras, file_size=size)
        archive, layout = contents.archive, contents.layout
        verifiers: Dict[str, Callable[[], None]] = {}
        for name, t in tensors:
            entry = t.storage.handle
            verify = verifiers.get(entry.name) or verifiers.setdefault(entry.name, _verifier(archive, entry))
            cat.tensors[name] = lazy_tensor(name, t, mm, entry.data_offset, path, layout.big_endian, verify)
        if layout.big_endian:
            cat.notes.append("big-endian checkpoint: tensors are converted to little-endian when read")
        note_overlapping(cat, tensors)
        used = {t.storage.handle.name for _, t in tensors}
        unused = [e.name for e in layout.storages.values() if e.name not in used]
        if unused:
            cat.notes.append(f"{len(unused)} storage record(s) not used by any tensor")
    except BaseException:
        mm.close()
        raise
    cat._closers.append(mm.close)
    return cat
