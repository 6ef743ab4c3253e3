"""kohya's `sshs_legacy_hash`, recomputed from a safetensors file so inspect can check it.

Definition (sd-scripts library/train_util.py `precalculate_safetensors_hashes` and
`addnet_hash_legacy`; reference/lora.md §4.2): serialise the tensors with `safetensors.torch.save`
and only the `ss_*` metadata, take the 0x10000 bytes at offset 0x100000 of that buffer, sha256,
first 8 hex.

That buffer is the u64 header length, the header JSON, then every tensor's bytes in safetensors'
order (dtype descending, then name: the Rust `prepare` sort), with no gaps. The header lists the
metadata in a Rust HashMap's order, which changes from run to run, but its length does not, so
when the header ends before 0x100000 the window lies in the data section and is known from the
file's tensors and `ss_*` values alone, whatever order the file itself stores them in. Since
safetensors 0.4 the header is space-padded to a multiple of 8; earlier versions did not pad, so
both lengths are tried. A header reaching past 0x100000 (huge `ss_tag_frequency`) puts the window
in order-dependent bytes: no answer then.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

WINDOW_START = 0x100000
WINDOW_LENGTH = 0x10000
HEX_DIGITS = 8

# safetensors' Rust `Dtype` enum order (safetensors 0.8.0, checked by saving one tensor of each
# dtype with safetensors.numpy.save and reading the data offsets back); tensors are laid out by
# this rank descending, then by name.
DTYPE_RANK = {name: rank for rank, name in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}

Tensor = Tuple[str, str, Tuple[int, ...], str, int, int]  # name, dtype, shape, path, file offset, length


def kohya_order(tensors: Sequence[Tensor]) -> Optional[List[Tensor]]:
    """The tensors in the order safetensors serialises them, or None for a dtype it has no rank for."""
    if any(t[1] not in DTYPE_RANK for t in tensors):
        return None
    return sorted(tensors, key=lambda t: (-DTYPE_RANK[t[1]], t[0]))


def header_lengths(ordered: Sequence[Tensor], ss_metadata: Mapping[str, str]) -> Tuple[int, ...]:
    """8 + the header's JSON length, padded (safetensors >= 0.4) and unpadded (earlier)."""
    header: Dict[str, object] = {"__metadata__": dict(ss_metadata)}
    offset = 0
    for name, dtype, shape, _, _, length in ordered:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    padded = n + (-(8 + n)) % 8
    return tuple(dict.fromkeys((8 + padded, 8 + n)))


def _window(ordered: Sequence[Tensor], start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the concatenated tensors (shorter at the end, as a slice)."""
    parts: List[bytes] = []
    position = 0
    fds: Dict[str, int] = {}
    try:
        for _, _, _, path, offset, size in ordered:
            lo, hi = max(start, position), min(start + length, position + size)
            if lo < hi:
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                parts.append(os.pread(fd, hi - lo, offset + lo - position))
            position += size
            if position >= start + length:
                break
    finally:
        for fd in fds.values():
            os.close(fd)
    return b"".join(parts)


def legacy_hash_candidates(cat) -> List[str]:
    """The values kohya would have written as `sshs_legacy_hash` for this file's tensors and
    `ss_*` metadata (one per header padding convention), or [] when it cannot be known."""
    tensors = []
    for name, t in cat.tensors.items():
        span = getattr(t, "span", None)
        if span is None or span.length != t.nbytes:
            return []
        tensors.append((name, t.dtype.name, tuple(t.shape), span.path, span.offset, span.length))
    ordered = kohya_order(tensors)
    if ordered is None:
        return []
    ss = {k: v for k, v in (cat.metadata or {}).items() if k.startswith("ss_")}
    out: List[str] = []
    for total in header_lengths(ordered, ss):
        if total > WINDOW_START:
            continue
        digest = hashlib.sha256(_window(ordered, WINDOW_START - total, WINDOW_LENGTH)).hexdigest()[:HEX_DIGITS]
        if digest not in out:
            out.append(digest)
    return out
