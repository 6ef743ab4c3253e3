"""How Civitai and A1111 print the hashes (case, length, AutoV1 on small files, CRC32 byte order).

| key    | civitai (default)                          | a1111                                        |
|--------|--------------------------------------------|----------------------------------------------|
| SHA256 | 64 hex, upper (Civitai `hashes.SHA256`)    | 64 hex, lower (A1111 `cache.json`)           |
| AutoV1 | 8 hex, upper; null under 2 MiB (Civitai    | 8 hex, lower, of whatever bytes are there    |
|        | HashTask.cs: Length < 0x100000 * 2)        | (A1111 sd_models.model_hash; empty: e3b0c442)|
| AutoV2 | 10 hex, upper                              | 10 hex, lower (A1111 `shorthash`)            |
| AutoV3 | 12 hex, upper (what Civitai shows); the    | 64 hex, lower (A1111 `hashes-addnet`, kohya  |
|        | header is skipped when its length N < 16   | `sshs_model_hash`): the safetensors header   |
|        | MiB (Civitai HashTask.cs)                  | is ALWAYS skipped (A1111 hashes.py           |
|        |                                            | addnet_hash_safetensors, kohya train_util    |
|        |                                            | addnet_hash_safetensors): = sha256 of the    |
|        |                                            | data section = convert's                     |
|        |                                            | modelspec.hash_sha256                        |
| CRC32  | 8 hex, upper, CRC bytes little-endian      | same digits, lower (A1111 prints no CRC32)   |
|        | (Civitai test: `hello world` -> 85114A0D)  |                                              |
| BLAKE3 | 64 hex, upper                              | 64 hex, lower                                |
"""
from __future__ import annotations

from typing import Dict, Optional

HASH_KEYS = ("SHA256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3")
STYLES = ("civitai", "a1111")
CIVITAI_AUTOV1_MIN_SIZE = 2 * 0x100000  # Civitai HashTask.cs: minFileSize = 0x100000 * 2
CIVITAI_AUTOV3_DIGITS = 12


def a1111_autov3_start(head: bytes, size: int) -> int:
    """Where A1111's and kohya's AutoV3 start: after the safetensors header (8 + N), whatever N."""
    import struct

    if len(head) < 8:
        return size
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if 8 + n <= size else min(8, size)  # not a safetensors header: as Civitai (from 8)


def crc32_civitai_hex(crc: int) -> str:
    """The CRC-32 printed as Civitai prints it: its 4 bytes in little-endian order, as hex."""
    return (crc & 0xFFFFFFFF).to_bytes(4, "little").hex()


def format_hashes(h, style: str = "civitai", a1111_autov3: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{key: text} for a FileHashes, in the given style; keys are Civitai's names (HASH_KEYS).
    `a1111_autov3`: A1111's AutoV3 when it differs from Civitai's (a header of 16 MiB or more;
    see `sdtk.hashing.a1111.a1111_autov3`)."""
    if style == "civitai":
        autov1 = h.autov1_window[:8].upper() if h.size >= CIVITAI_AUTOV1_MIN_SIZE else None
        return {
            "SHA256": h.sha256.upper(),
            "AutoV1": autov1,
            "AutoV2": h.sha256[:10].upper(),
            "AutoV3": h.autov3[:CIVITAI_AUTOV3_DIGITS].upper(),
            "CRC32": crc32_civitai_hex(h.crc32).upper(),
            "BLAKE3": h.blake3.upper(),
        }
    if style == "a1111":
        return {
            "SHA256": h.sha256.lower(),
            "AutoV1": h.autov1_window[:8].lower(),
            "AutoV2": h.sha256[:10].lower(),
            "AutoV3": (a1111_autov3 or h.autov3).lower(),
            "CRC32": crc32_civitai_hex(h.crc32).lower(),
            "BLAKE3": h.blake3.lower(),
        }
    raise ValueError(f"unknown hash style {style!r} (choose one of {', '.join(STYLES)})")
