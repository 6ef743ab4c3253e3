"""torch's oldest checkpoint format, a tar archive, and the files that only look like something else.

`torch.load` (torch/serialization.py `_load` -> `_legacy_load`) checks for a zip local header
(`PK\\x03\\x04`) and otherwise, with weights_only=False, first calls `tarfile.open(fileobj=f,
mode="r:")`: if the first 512 bytes are a valid tar header, old-style V7 ones without the
`ustar` magic included, the file is a tar archive to torch, whatever else the same bytes are
(a plain pickle, a legacy stacked-pickle checkpoint, a safetensors header). torch then unpickles
its members `storages`, `tensors` and `pickle` without restrictions. We never read such a file
as a checkpoint; `sdtk scan` reports it unsafe and interprets those members with our own VM to
name what they would run.

Sources: CPython Lib/tarfile.py (`TarInfo.frombuf`: 512-byte block, not all NUL, checksum field
at 148..156 as octal or base-256, matching the unsigned or signed byte sum with the field read
as spaces), torch/serialization.py `legacy_load` (member names).
"""
from __future__ import annotations

import os
from typing import Iterator, Tuple

from sdtk.fileio import open_input

BLOCK = 512
TORCH_MEMBERS = ("storages", "tensors", "pickle")  # torch/serialization.py legacy_load
MAX_MEMBERS = 100_000  # members looked at when scanning (a tar of a real checkpoint has 4)


def _field_number(raw: bytes):
    """tarfile.nti: base-256 when the first byte is 0x80/0xff, else NUL/space-ended octal."""
    if raw[0] in (0o200, 0o377):
        n = 0
        for b in raw[1:]:
            n = (n << 8) + b
        return -(256 ** (len(raw) - 1) - n) if raw[0] == 0o377 else n
    text = raw.split(b"\0", 1)[0]
    try:
        return int(text.decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        return None


def has_tar_checksum(head: bytes) -> bool:
    """The first test `tarfile` applies to a header block (cheap, no import): 512 bytes, not all
    NUL, checksum field equal to the unsigned or signed sum of the block."""
    if len(head) < BLOCK:
        return False
    block = head[:BLOCK]
    if block.count(0) == BLOCK:
        return False
    chksum = _field_number(block[148:156])
    if chksum is None:
        return False
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    signed = 256 + sum(b - 256 if b > 127 else b for b in block[:148] + block[156:])
    return chksum in (unsigned, signed)


def torch_reads_as_tar(path: "os.PathLike[str] | str", head: bytes) -> bool:
    """True when `torch.load(path, weights_only=False)` would take the file for a tar archive:
    the header passes the checksum test and `tarfile.open(mode="r:")` itself accepts it (the
    very call torch makes)."""
    if head.startswith(b"PK\x03\x04") or not has_tar_checksum(head):
        return False
    import tarfile

    with open_input(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:"):
                return True
        except tarfile.TarError:
            return False  # torch falls back to the pickle reading
        except Exception:  # tarfile failing otherwise makes torch.load fail: nothing runs
            return False


def torch_members(path: "os.PathLike[str] | str", limit: int) -> Iterator[Tuple[str, bytes]]:
    """(name, first `limit` bytes) of every regular member torch unpickles (`storages`,
    `tensors`, `pickle`), every occurrence (tarfile returns the last one of a name, others the
    first). Stops quietly where the archive stops parsing."""
    import tarfile

    with open_input(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for count, member in enumerate(tar):
                    if count >= MAX_MEMBERS:
                        return
                    if member.isfile() and member.name.rstrip("/") in TORCH_MEMBERS:
                        src = tar.extractfile(member)
                        if src is not None:
                            yield member.name, src.read(min(member.size, limit))
        except (tarfile.TarError, OSError, ValueError, EOFError):
            return
