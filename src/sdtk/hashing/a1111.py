"""A1111's and kohya's AutoV3 (`hashes-addnet`, `sshs_model_hash`): sha256 of a safetensors
file after its header, the header ALWAYS skipped (A1111 modules/hashes.py and kohya
library/train_util.py `addnet_hash_safetensors`: seek(8 + N)). Civitai skips it only when
N < 16 MiB; below that the two agree and the one-read AutoV3 is reused. Above it (huge metadata,
e.g. an embedded preview) the data section is hashed once more, here."""
from __future__ import annotations

import hashlib
from typing import Optional

from sdtk.fileio import open_input
from sdtk.hashing.styles import a1111_autov3_start

BLOCK = 16 << 20


def a1111_autov3(path: str, fh) -> Optional[str]:
    """A1111's AutoV3 of `path` (64 hex) when it differs from `fh.autov3`'s start, else None."""
    with open_input(path) as f:
        head = f.read(8)
        start = a1111_autov3_start(head, fh.size)
        if start == fh.autov3_start:
            return None
        f.seek(start)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()
