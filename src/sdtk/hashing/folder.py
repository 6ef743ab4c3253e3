"""Content hashes of a diffusers folder: the tensors it stands for under single-file names (the
catalogue `sdtk.formats.diffusers.read_diffusers_folder` gives), each read once for both
versions. A folder holds no one file, so it has no SHA256/AutoV1-V3/CRC32/BLAKE3 of its own.

Relation to the single file (docs/hash.md): a folder written by `sdtk convert --to diffusers`
keeps what diffusers drops in its sidecar, so its content hashes equal the source file's; a
folder without the sidecar (written by diffusers) stands for the tensors `sdtk convert FOLDER`
recreates (position_ids, markers, SD1/SD2 schedule buffers) but not the rest (EMA, SD2's last
text-encoder layer, ...), and has the content hash of the file that command writes from it.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

from sdtk.hashing.content import (_PIECE, _blake3, content_hash_of_records, content_v2_of_records,
                                  tensor_bytes_view)


def folder_content_hashes(catalogue) -> Tuple[str, str]:
    """(content v1, content v2), 64 lower-case hex each, in one streaming pass over the tensors."""
    v1, v2 = [], []
    for t in catalogue.tensors.values():
        h1, h2 = hashlib.sha256(), _blake3()
        view = tensor_bytes_view(t)
        for start in range(0, len(view), _PIECE):
            piece = view[start:start + _PIECE]
            h1.update(piece)
            h2.update(piece)
        del view
        v1.append((t.name, t.dtype.name, t.shape, h1.hexdigest()))
        v2.append((t.name, t.dtype.name, t.shape, h2.hexdigest()))
    return content_hash_of_records(v1), content_v2_of_records(v2)

