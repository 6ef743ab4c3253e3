"""SHA-256 on the CPU's SHA extensions, two messages in one pass (`sdtk._sha2`), hashlib otherwise.

A first conversion records the input's SHA256 and AutoV3: the sha256 of the whole file and of
the same bytes from a small offset (8 for a .ckpt, 8 + header length for safetensors). hashlib
runs one stream per call at about 1 GB/s per core here, bound by the latency of the SHA-NI round
instruction; `sdtk._sha2.compress` interleaves the rounds of the two messages, so one core
computes both in less time than two hashlib passes: about 0.65x (an earlier prototype, 1.55x) on CPUs whose SHA round
instruction is latency-bound, only 0.9x on the Xeon of this repo's benchmarks, whose
SHA unit one stream already keeps busy (bench/bench_sha2.py prints the gain). The digests
are plain SHA-256 (FIPS 180-4): tests compare them with hashlib's on random data of many lengths
and offsets.

`available()` is False without the C extension, on a CPU without SHA-NI, or with
SDTK_SHA2=off in the environment; callers then use hashlib (filehash.py: one thread per stream).
`worth_pairing()` says whether pairing pays on this CPU (it measures it once): pairing puts both
streams on one core, which only wins when it makes them clearly faster than one after the other.
"""
from __future__ import annotations

import os
import struct
import time
from typing import Optional

try:  # built by setup.py when a C compiler is present; optional by design
    import sdtk._sha2 as _ext
except ImportError:  # pragma: no cover - installs without a compiler
    _ext = None

# FIPS 180-4 section 5.3.3: the initial hash value H(0) of SHA-256
_H0 = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)


def available() -> bool:
    """True when the two-stream kernel can be used here."""
    if _ext is None or os.environ.get("SDTK_SHA2", "").lower() in ("off", "0", "no"):
        return False
    return bool(_ext.has_sha_ni())


PAIR_WORTH_IT = 1.3  # interleaving must make the two streams this much faster than one after the other
_pair_gain: Optional[float] = None


def pair_gain() -> float:
    """How much faster `update_pair` hashes two streams than two single passes on this CPU
    (measured once per process on 256 KiB, best of 3: about 2 ms). Where SHA256RNDS2 is latency-
    bound pairing pays; where one stream already saturates the SHA unit (the
    Xeon of bench/results/sha2.md: 1.06-1.13x) it would put both streams on one core for
    nothing, and two hashlib threads (one core each) finish sooner."""
    global _pair_gain
    if _pair_gain is None:
        data = memoryview(bytes(range(256)) * 1024)
        one, two = float("inf"), float("inf")
        for _ in range(3):
            a, b = bytearray(32), bytearray(32)
            t = time.perf_counter()
            _ext.compress(a, data)
            _ext.compress(b, data[64:])
            one = min(one, time.perf_counter() - t)
            t = time.perf_counter()
            _ext.compress(a, data, b, data[64:])
            two = min(two, time.perf_counter() - t)
        _pair_gain = one / two
    return _pair_gain


def worth_pairing() -> bool:
    """Whether SHA256 + AutoV3 should run as one interleaved stream here (SDTK_SHA2=pair forces it,
    =off never): the kernel is available and pays (`pair_gain() >= PAIR_WORTH_IT`)."""
    if not available():
        return False
    return os.environ.get("SDTK_SHA2", "").lower() == "pair" or pair_gain() >= PAIR_WORTH_IT


class Sha256:
    """A sha256 state fed through `sdtk._sha2` (hashlib's `update` / `digest` / `hexdigest`).
    Whole 64-byte blocks go to the kernel straight from the caller's buffer (no copy); only a
    partial block is kept here between updates."""

    __slots__ = ("state", "pending", "length")

    def __init__(self, data: bytes = b""):
        self.state = bytearray(struct.pack("=8I", *_H0))
        self.pending = bytearray()
        self.length = 0
        if data:
            self.update(data)

    def _split(self, data) -> "tuple[Optional[bytes], memoryview]":
        """(the completed pending block or None, the whole blocks of `data` after it); the rest
        of `data` becomes the new pending bytes."""
        view = memoryview(data).cast("B")
        self.length += len(view)
        head = None
        if self.pending:
            need = 64 - len(self.pending)
            if len(view) < need:
                self.pending += view
                return None, view[:0]
            self.pending += view[:need]
            head = bytes(self.pending)
            self.pending.clear()
            view = view[need:]
        whole = len(view) - len(view) % 64
        if whole < len(view):
            self.pending += view[whole:]
        return head, view[:whole]

    def update(self, data) -> None:
        head, blocks = self._split(data)
        if head is not None:
            _ext.compress(self.state, head)
        if len(blocks):
            _ext.compress(self.state, blocks)

    def digest(self) -> bytes:
        tail = bytes(self.pending) + b"\x80" + b"\x00" * ((55 - len(self.pending)) % 64) + struct.pack(">Q", 8 * self.length)
        state = bytearray(self.state)
        _ext.compress(state, tail)
        return struct.pack(">8I", *struct.unpack("=8I", state))

    def hexdigest(self) -> str:
        return self.digest().hex()


def update_pair(a: Sha256, data_a, b: Sha256, data_b) -> None:
    """`a.update(data_a); b.update(data_b)` in one interleaved pass (the two states must differ)."""
    head_a, blocks_a = a._split(data_a)
    head_b, blocks_b = b._split(data_b)
    if head_a is not None and head_b is not None:
        _ext.compress(a.state, head_a, b.state, head_b)
    elif head_a is not None:
        _ext.compress(a.state, head_a)
    elif head_b is not None:
        _ext.compress(b.state, head_b)
    if len(blocks_a) or len(blocks_b):
        _ext.compress(a.state, blocks_a, b.state, blocks_b)
