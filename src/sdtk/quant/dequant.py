"""Block dequantization in numpy, bit-identical to ggml's `dequantize_row_*` (and gguf-py 0.19.0).

Layouts and formulas: ggml `src/ggml-common.h` (block structs) and `src/ggml-quants.c`
(`dequantize_row_*`), restated in ../shared/reference/quantized-formats.md §2.1-2.2. Every
product is evaluated in f32 in the order ggml uses ((d * scale) * q - dmin * m), so the values
equal the C decoder's bit for bit. Work is done in chunks of blocks to bound temporaries.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from sdtk.quant.ggml_types import GGMLType

CHUNK_BLOCKS = 1 << 16
_F32 = np.float32


def _f16(col: np.ndarray) -> np.ndarray:
    """Two bytes per block (a column slice) as f32 values, shape (n, 1)."""
    return np.ascontiguousarray(col).view("<f2").astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bits, bit j for element j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(_F32) * _f16(b[:, 0:2])


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:]).astype(np.int8) - 8).astype(_F32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _nibbles(b[:, 4:]).astype(_F32) + _f16(b[:, 2:4])


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return _f16(b[:, 0:2]) * (q.astype(np.int8) - 16).astype(_F32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return _f16(b[:, 0:2]) * q.astype(_F32) + _f16(b[:, 2:4])


_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale = (d * (sc & 15).astype(_F32)).reshape(n, 16, 1)
    mins = (dmin * (sc >> 4).astype(_F32)).reshape(n, 16, 1)
    # qs[32h + l] bits 2j..2j+1 -> element 128h + 32j + l
    q = ((b[:, 16:80].reshape(n, 2, 1, 32) >> _SHIFT2) & 3).reshape(n, 16, 16).astype(_F32)
    return (scale * q - mins).reshape(n, 256)


def _q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, sb = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low4 = np.concatenate([sb[:, 0:8] & 15, sb[:, 0:8] >> 4], axis=1)  # scale k: k<8 low nibble of k, else high of k-8
    high2 = (sb[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3  # [k//4][k%4]
    codes = low4 | (high2.reshape(n, 16) << 4)
    scale = (d * (codes.astype(np.int8) - 32).astype(_F32)).reshape(n, 16, 1)
    low2 = ((qs.reshape(n, 2, 1, 32) >> _SHIFT2) & 3).reshape(n, 256)
    # high bit of element e: bit e // 32 of hmask[e % 32]; q = low2 - 4 when that bit is 0
    hbit = ((hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, 256)
    q = (low2.astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)).astype(_F32).reshape(n, 16, 16)
    return (scale * q).reshape(n, 256)


def scale_min_k4(sb: np.ndarray):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4)."""
    lo, mid, hi = sb[:, 0:4], sb[:, 4:8], sb[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _k_scales(b: np.ndarray):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = scale_min_k4(b[:, 4:16])
    return (d * sc.astype(_F32)).reshape(n, 8, 1), (dmin * mn.astype(_F32)).reshape(n, 8, 1)


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scale, mins = _k_scales(b)
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32).astype(_F32)  # chunk c: low 64c+l, high 64c+32+l
    return (scale * q - mins).reshape(n, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scale, mins = _k_scales(b)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)
    hbit = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # bit i of qh[l]: sub-block i
    q = (low | (hbit << 4)).astype(_F32)
    return (scale * q - mins).reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    low4 = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # e = 128h + 64*nibble + m
    hi2 = (b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT2) & 3  # e = 128h + 32k + l
    q = ((low4 | (hi2 << 4)).astype(np.int8) - 32).astype(_F32).reshape(n, 16, 16)
    scale = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(_F32)).reshape(n, 16, 1)
    return (scale * q).reshape(n, 256)


DECODERS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def can_dequantize(t: GGMLType) -> bool:
    return t.name in DECODERS


def dequantize(raw: np.ndarray, t: GGMLType, count: int) -> np.ndarray:
    """`raw` (uint8, whole blocks) of type `t` -> `count` f32 values (1-D)."""
    decode = DECODERS[t.name]
    blocks = raw.reshape(-1, t.nbytes)
    out = np.empty((blocks.shape[0], t.block), dtype=_F32)
    with np.errstate(all="ignore"):  # inf/NaN scales decode to inf/NaN, as in ggml
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            stop = min(start + CHUNK_BLOCKS, blocks.shape[0])
            out[start:stop] = decode(blocks[start:stop])
    return out.reshape(-1)[:count]
