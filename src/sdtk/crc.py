"""CRC-32 (the zip / zlib polynomial), as fast as this machine allows.

ISA-L's crc32 (package `isal`, a dependency) uses carry-less multiplication and runs about 5-10x
faster than zlib's table-driven loop with the same values; without it, zlib's. Both release the
GIL on large buffers."""
from __future__ import annotations

try:
    from isal.isal_zlib import crc32

    IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

    IMPLEMENTATION = "zlib"

__all__ = ["crc32", "IMPLEMENTATION"]
