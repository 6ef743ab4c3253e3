"""The content hash: a hash of the tensors themselves, whatever the container.

Definition (version 1; docs/hash.md has it with a worked example):

    digest(t)  = sha256 of t's values as raw little-endian bytes in C (row-major) order
    record(t)  = UTF-8 name, NUL, dtype (safetensors name: F16, BF16, F32, I64 ...), NUL,
                 shape as decimal dims joined by "," (empty for a scalar), NUL,
                 digest(t) as 64 lower-case hex digits, "\\n"
    content    = sha256( "sdtk-content-v1\\n" + record(t) for every tensor, sorted by the
                 UTF-8 bytes of its name )

So metadata, tensor order, header padding and the container (.safetensors, .ckpt zip, legacy
pickle) do not change it; any change of a name, dtype, shape or value does.

Version 2 (`sdtk-content-v2`, what `convert` and `merge` record as `source_content_v2` since
sdtk 0.1 issue 10) is the same construction with BLAKE3 in place of sha256, for digest(t) and for
the final hash over the records (prefix "sdtk-content-v2\n"). BLAKE3 runs at several times
sha256's speed, so a first conversion can compute it beside the two sha256 passes SHA256 and
AutoV3 need without becoming CPU-bound. Version 1 stays what the library and `sdtk hash
--content` ("Content") show; `sdtk hash --content` shows version 2 as "ContentV2". Names cannot contain
NUL (safetensors forbids it), which makes every record unambiguous.

Computed streaming, one tensor at a time (peak memory about one tensor; for safetensors the
tensors are mmap views, so nothing is copied). For files whose tensors lie as raw bytes in the
file (`span`), the per-tensor digests are computed in the same single read as the file hashes
(`hash_model_file`).
"""
from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import numpy as np

from sdtk.tensors import LazyTensor

CONTENT_HASH_VERSION = "sdtk-content-v1"
CONTENT_HASH_V2 = "sdtk-content-v2"
_PREFIX = (CONTENT_HASH_VERSION + "\n").encode("ascii")
_PREFIX_V2 = (CONTENT_HASH_V2 + "\n").encode("ascii")
_PIECE = 64 * 1024 * 1024  # hash big tensors in pieces so hashlib releases the GIL per piece


def tensor_bytes_view(t: LazyTensor) -> memoryview:
    """The tensor's values as raw little-endian C-order bytes (a view when the data already is)."""
    import numpy as np

    arr = t.read()
    want = t.dtype.numpy
    if arr.dtype != want:
        arr = arr.astype(want)  # byte order only (a big-endian array from a legacy file)
    arr = np.ascontiguousarray(arr)
    if arr.size == 0:
        return memoryview(b"")
    return memoryview(arr.reshape(-1).view(np.uint8))


def tensor_digest(t: LazyTensor, algorithm: str = "sha256") -> str:
    """sha256 (content v1) or BLAKE3 (content v2), hex, of one tensor's raw little-endian C-order bytes."""
    h = hashlib.sha256() if algorithm == "sha256" else _blake3()
    view = tensor_bytes_view(t)
    for start in range(0, len(view), _PIECE):
        h.update(view[start:start + _PIECE])
    del view
    return h.hexdigest()


def content_record(name: str, dtype_name: str, shape: Sequence[int], digest: str) -> bytes:
    """One tensor's line of the canonical stream."""
    dims = ",".join(str(int(d)) for d in shape)
    return name.encode("utf-8") + b"\x00" + dtype_name.encode("ascii") + b"\x00" + dims.encode("ascii") + b"\x00" + digest.encode("ascii") + b"\n"


def content_hash_of_records(entries: Iterable[Tuple[str, str, Sequence[int], str]]) -> str:
    """The content hash from (name, dtype name, shape, digest) of every tensor, in any order."""
    h = hashlib.sha256(_PREFIX)
    for name, dt, shape, digest in sorted(entries, key=lambda e: e[0].encode("utf-8")):
        h.update(content_record(name, dt, shape, digest))
    return h.hexdigest()


def _blake3():
    import blake3

    return blake3.blake3()


def content_v2_of_records(entries: Iterable[Tuple[str, str, Sequence[int], str]]) -> str:
    """Content hash version 2 from (name, dtype name, shape, BLAKE3 digest) of every tensor."""
    h = _blake3()
    h.update(_PREFIX_V2)
    for name, dt, shape, digest in sorted(entries, key=lambda e: e[0].encode("utf-8")):
        h.update(content_record(name, dt, shape, digest))
    return h.hexdigest()


def content_hash_v2(catalogue, digests: Optional[Dict[str, str]] = None) -> str:
    """Content hash version 2 of an open catalogue, streaming tensor by tensor (BLAKE3 digests)."""
    digests = digests or {}
    entries = [(t.name, t.dtype.name, t.shape, digests.get(t.name) or tensor_digest(t, "blake3"))
               for t in catalogue.tensors.values()]
    return content_v2_of_records(entries)


def content_hash(catalogue, digests: Optional[Dict[str, str]] = None) -> str:
    """The content hash of an open catalogue (`sdtk.formats.open_model`), streaming tensor by tensor.

    `digests` (name -> sha256 hex) may supply per-tensor digests already computed elsewhere."""
    digests = digests or {}
    entries = []
    for t in catalogue.tensors.values():
        d = digests.get(t.name) or tensor_digest(t)
        entries.append((t.name, t.dtype.name, t.shape, d))
    return content_hash_of_records(entries)


def raw_tensor_spans(catalogue) -> Optional[List[Tuple[int, int, str]]]:
    """(offset, length, name) of every tensor when all of them lie in the catalogue's own file as
    raw little-endian bytes that do not overlap (safetensors always; checkpoints when each tensor
    owns its bytes); else None (then the digests need the tensors read one by one)."""
    spans = []
    path = os.path.realpath(catalogue.path)
    for t in catalogue.tensors.values():
        s = t.span
        if s is None or s.length != t.nbytes or os.path.realpath(s.path) != path:
            return None
        spans.append((s.offset, s.length, t.name))
    spans.sort()
    end = 0
    for off, length, _ in spans:
        if off < end:
            return None  # shared storage: two tensors view the same bytes
        end = off + length
    return spans
