"""Small entry points for other commands (convert's lineage, merge's recipe): plain dicts and strings."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Iterable, Optional

from sdtk.errors import SdtkError
from sdtk.fileio import open_input
from sdtk.hashing.filehash import hash_file
from sdtk.hashing.styles import crc32_civitai_hex

_CHUNK = 16 * 1024 * 1024


def file_hashes(path: "os.PathLike[str] | str", kinds: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """{kind: lower-case hex} for kinds among sha256, autov1, autov2, autov3 (64 hex), crc32 (Civitai
    byte order), blake3; all of them when `kinds` is None. One read of the file."""
    h = hash_file(path)
    every = {"sha256": h.sha256, "autov1": h.autov1_window[:8], "autov2": h.sha256[:10], "autov3": h.autov3,
             "crc32": crc32_civitai_hex(h.crc32), "blake3": h.blake3}
    if kinds is None:
        return every
    wanted = [k.lower() for k in kinds]
    unknown = [k for k in wanted if k not in every]
    if unknown:
        raise ValueError(f"unknown hash kind(s) {unknown}; known: {sorted(every)}")
    return {k: every[k] for k in wanted}


def sha256_file(path: "os.PathLike[str] | str", cancelled: Callable[[], bool] = lambda: False) -> Optional[str]:
    """SHA256 (64 lower-case hex) of the whole file: one sha256 pass, nothing else (a merge needs
    only the hash A1111 keys its merge metadata by). None when `cancelled()` turns true."""
    h = hashlib.sha256()
    with open_input(path) as f:
        raw = f.raw
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while not cancelled():
                n = raw.readinto(buf)
                if not n:
                    return h.hexdigest()
                h.update(view[:n])
        except OSError as e:
            raise SdtkError(path, f"read failed: {e.strerror or e}") from None
    return None
