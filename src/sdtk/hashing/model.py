"""File hashes and the content hash of a model file together, in one read when the format allows."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from sdtk.hashing.content import content_hash, content_hash_of_records, raw_tensor_spans
from sdtk.hashing.filehash import FileHashes, HashOptions, ProgressCallback, hash_file


@dataclass(frozen=True)
class ModelHashes:
    file: FileHashes
    content: Optional[str]  # None when not asked for
    reads: int  # how many passes over the tensor bytes were made (1 for safetensors)


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
            fh = hash_file(path, tensor_spans=spans, on_progress=on_progress, options=options)
            entries = [(t.name, t.dtype.name, t.shape, fh.tensor_digests[t.name]) for t in cat.tensors.values()]
            return ModelHashes(fh, content_hash_of_records(entries), 1)
        fh = hash_file(path, on_progress=on_progress, options=options)
        return ModelHashes(fh, content_hash(cat), 2)
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
        if fh is not None and (not content or known.get("content")):
            return ModelHashes(fh, known.get("content") if content else None, 0)
    if content and catalogue is not None:
        mh = hash_model_file(path, catalogue, on_progress=on_progress, options=options)
    elif content:
        mh = hash_model_file(path, on_progress=on_progress, options=options)
    else:
        mh = ModelHashes(hash_file(path, on_progress=on_progress, options=options), None, 1)
    remember_file_hashes(path, mh.file, mh.content)
    return mh
