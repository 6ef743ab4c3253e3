"""File hashes and the content hash of a model file together, in one read when the format allows."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

from sdtk.hashing.content import (content_hash, content_hash_of_records, content_hash_v2, content_v2_of_records,
                                  raw_tensor_spans)
from sdtk.hashing.filehash import FileHashes, HashOptions, ProgressCallback, hash_file


@dataclass(frozen=True)
class ModelHashes:
    file: FileHashes
    content: Optional[str]  # None when not asked for
    reads: int  # how many passes over the tensor bytes were made (1 for safetensors)
    content_v2: Optional[str] = None  # content hash version 2 (BLAKE3), when computed


def hash_model_file(path: "os.PathLike[str] | str", catalogue=None, *, on_progress: Optional[ProgressCallback] = None,
                    options: HashOptions = HashOptions()) -> ModelHashes:
    """The six file hashes and the content hash of `path`.

    `catalogue` is the file opened with `sdtk.formats.open_model` (opened here when None; raises
    the reader's SdtkError when the file is not a model sdtk reads). When every tensor lies in the
    file as raw bytes (safetensors), the per-tensor digests ride along the single read; otherwise
    the tensors are read once more, one at a time, through the catalogue (never executing anything)."""
    from sdtk.formats import open_model

    own = catalogue is None
    cat = open_model(path) if own else catalogue
    try:
        spans = raw_tensor_spans(cat)
        if spans is not None:
            options = replace(options, span_kinds=("sha256", "blake3"))
            fh = hash_file(path, tensor_spans=spans, on_progress=on_progress, options=options)
            tensors = list(cat.tensors.values())
            v1 = content_hash_of_records([(t.name, t.dtype.name, t.shape, fh.tensor_digests[t.name]) for t in tensors])
            v2 = content_v2_of_records([(t.name, t.dtype.name, t.shape, fh.tensor_digests_blake3[t.name]) for t in tensors])
            return ModelHashes(fh, v1, 1, v2)
        fh = hash_file(path, on_progress=on_progress, options=options)
        return ModelHashes(fh, content_hash(cat), 3, content_hash_v2(cat))
    finally:
        if own:
            cat.close()


def cached_model_hashes(path: "os.PathLike[str] | str", catalogue=None, *, content: bool = True,
                        on_progress: Optional[ProgressCallback] = None, options: HashOptions = HashOptions(),
                        use_cache: bool = True) -> ModelHashes:
    """`hash_model_file` (or `hash_file` alone when `content` is False or `catalogue` is None and
    the file is not a model), through the shared hash cache (`sdtk.hashing.cache`): a file hashed
    before while unchanged is not read again (`reads` is 0); what is computed is remembered."""
    from sdtk.hashing.cache import cached_file_hashes, cached_hashes, remember_file_hashes

    if use_cache:
        known = cached_hashes(path)
        fh = cached_file_hashes(path, known)
        if fh is not None and (not content or (known.get("content") and known.get("content_v2"))):
            return ModelHashes(fh, known.get("content") if content else None, 0, known.get("content_v2") if content else None)
    if content and catalogue is not None:
        mh = hash_model_file(path, catalogue, on_progress=on_progress, options=options)
    elif content:
        mh = hash_model_file(path, on_progress=on_progress, options=options)
    else:
        mh = ModelHashes(hash_file(path, on_progress=on_progress, options=options), None, 1)
    remember_file_hashes(path, mh.file, mh.content, mh.content_v2)
    return mh


LINEAGE_KINDS = ("sha256", "autov3", "content_v2")  # what convert and merge record of each input


def lineage_hashes(path: "os.PathLike[str] | str", *, on_progress: Optional[ProgressCallback] = None,
                   cancelled: Callable[[], bool] = lambda: False, use_cache: bool = True) -> Dict[str, str]:
    """{sha256, autov3, content_v2} of a model file (64 lower-case hex each), for lineage records.

    Taken from the hash cache when known; else computed in ONE sequential read of the file with
    only what is needed: SHA256 and AutoV3 (two sha256 streams, one worker thread each, or one
    interleaved pass where that pays: sdtk.hashing.sha2pair) and the
    BLAKE3 digest of each tensor's bytes (content hash v2) when the tensors lie in the file as raw
    bytes; otherwise the tensors are read once more through the reader for the content hash. The
    values are remembered in one transaction at the end (an interrupted pass leaves no entry);
    `cancelled()` turning true stops the read (HashingCancelled)."""
    from sdtk.formats import open_model
    from sdtk.hashing.cache import cached_hashes, remember_hashes

    known = cached_hashes(path) if use_cache else {}
    if all(known.get(k) for k in LINEAGE_KINDS):
        return {k: known[k] for k in LINEAGE_KINDS}
    with open_model(path) as cat:
        spans = raw_tensor_spans(cat)
        options = HashOptions(kinds=("sha256", "autov3"), span_kinds=("blake3",))
        fh = hash_file(path, tensor_spans=spans, on_progress=on_progress, options=options, cancelled=cancelled)
        if spans is not None:
            v2 = content_v2_of_records([(t.name, t.dtype.name, t.shape, fh.tensor_digests_blake3[t.name])
                                        for t in cat.tensors.values()])
        else:
            v2 = content_hash_v2(cat)
    found = {"sha256": fh.sha256, "autov3": fh.autov3, "content_v2": v2}
    remember_hashes(path, {**found, "autov3_start": fh.autov3_start, "autov1_window": fh.autov1_window})
    return found
