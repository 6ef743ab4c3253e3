"""Quantize f32 values to ggml blocks: the C extension `sdtk._quant` when built, else numpy.

Both give the same bytes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 equal gguf-py 0.19.0's
`gguf.quants.quantize` (itself byte-identical to ggml's `quantize_row_*_ref`); Q2_K..Q6_K
equal ggml's `quantize_row_q*_K_ref` built without FMA contraction (reference §2.3, §9.2).
The numpy fallback for K-quants follows the C loop order exactly (sequential f32 sums over
the elements of a sub-block, vectorised across blocks), so it is slow but exact.
F16 and BF16 are plain casts (round to nearest even; BF16 with NaN quieting, as ggml).
"""
from __future__ import annotations

import numpy as np

from sdtk.quant.ggml_types import GGMLType

try:  # the optional C extension (setup.py); absent in a plain source checkout
    import sdtk._quant as _c
except ImportError:  # pragma: no cover - exercised by the fallback tests with the module hidden
    _c = None

C_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
QUANTIZABLE = C_TYPES | {"F32", "F16", "BF16"}
_F32 = np.float32


def have_c() -> bool:
    return _c is not None


def quantize(values: np.ndarray, t: GGMLType, use_c: bool = True) -> np.ndarray:
    """f32-convertible values (any shape; the element count a multiple of t.block) -> uint8 bytes."""
    x = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    if t.name == "F32":
        return x.view(np.uint8)
    if t.name == "F16":
        with np.errstate(over="ignore"):  # out-of-range values become inf, as in ggml
            return x.astype("<f2").view(np.uint8)
    if t.name == "BF16":
        return _bf16(x)
    if x.size % t.block:
        raise ValueError(f"{x.size} values are not a whole number of {t.name} blocks of {t.block}")
    out = np.empty(x.size // t.block * t.nbytes, dtype=np.uint8)
    if use_c and _c is not None:
        _c.quantize(t.id, x, out)
        return out
    blocks = x.reshape(-1, t.block)
    with np.errstate(all="ignore"):
        out.reshape(-1, t.nbytes)[:] = _NUMPY[t.name](blocks)
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, NaN made quiet (ggml_compute_fp32_to_bf16)."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    quiet = ((u >> 16) | 0x40).astype(np.uint16)
    return np.where(nan, quiet, rounded).astype("<u2").view(np.uint8)


# ---- numpy: legacy 32-element blocks ---------------------------------------------------------


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    safe = np.where(d == 0, _F32(1), d)
    return np.where(d == 0, _F32(0), _F32(1) / safe)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), exact for every f32 (no `+ 0.5` rounding trap)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(_F32(2) * (a - whole)), v)


def _signed_max(b: np.ndarray) -> np.ndarray:
    idx = np.abs(b).argmax(axis=1)  # first occurrence of the largest magnitude
    return b[np.arange(b.shape[0]), idx]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _q8_0(b):
    amax = np.abs(b).max(axis=1)
    d = amax / _F32(127)
    q = _round_away(b * _inverse(d)[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1)


def _q4_0(b):
    d = _signed_max(b) / _F32(-8)
    v = b * _inverse(d)[:, None] + _F32(8.5)
    q = np.minimum(15, np.trunc(v).astype(np.int8)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _q5_0(b):
    d = _signed_max(b) / _F32(-16)
    v = b * _inverse(d)[:, None] + _F32(16.5)
    q = np.minimum(31, np.trunc(v).astype(np.int8)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _fifth_bits(q), _pack_nibbles(q)], axis=1)


def _affine(b, levels: int):
    mn, mx = b.min(axis=1), b.max(axis=1)
    d = (mx - mn) / _F32(levels)
    v = (b - mn[:, None]) * _inverse(d)[:, None] + _F32(0.5)
    q = np.minimum(levels, np.trunc(v).astype(np.int16)).astype(np.uint8)
    return d, mn, q


def _q4_1(b):
    d, mn, q = _affine(b, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], axis=1)


def _q5_1(b):
    d, mn, q = _affine(b, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _fifth_bits(q), _pack_nibbles(q)], axis=1)


# ---- numpy: K-quants (sequential per-element loops, vectorised over blocks) --------------------

_MAGIC = _F32(12582912.0)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """The reference's magic-number rounding, bit for bit (half to even for |v| < 2^22)."""
    bits = (v.astype(_F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _f16_value(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(_F32)


def _fit_scale_min(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Vectorised fit_scale_min of _quant.c over rows of x (n columns). Returns (scale, -min, L)."""
    rows, n = x.shape
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        lo = np.where(x[:, i] < lo, x[:, i], lo)
        hi = np.where(x[:, i] > hi, x[:, i], hi)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = np.where(lo > 0, _F32(0), lo)
    flat = hi == lo
    iscale = _F32(nmax) / np.where(flat, _F32(1), hi - lo)
    scale = _F32(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    Lf = L.astype(_F32)
    best = np.zeros(rows, _F32)
    for i in range(n):
        diff = scale * Lf[:, i] + lo - x[:, i]
        diff = np.abs(diff) if use_mad else diff * diff
        best = best + w[:, i] * diff
    for step in range(nstep + 1):
        # as in C, a better fit moves `lo`, and later steps use the moved value
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / np.where(flat, _F32(1), hi - lo)
        La = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(_F32)
        sum_l = np.zeros(rows, _F32)
        sum_l2 = np.zeros(rows, _F32)
        sum_xl = np.zeros(rows, _F32)
        for i in range(n):
            wl = w[:, i] * La[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * La[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _F32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, _F32(1)), this_scale)
        err = np.zeros(rows, _F32)
        for i in range(n):
            diff = this_scale * La[:, i] + this_min - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            err = err + w[:, i] * diff
        take = ok & (err < best)
        Lf = np.where(take[:, None], La, Lf)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale)
        lo = np.where(take, this_min, lo)
    Lf = np.where(flat[:, None], _F32(0), Lf)
    scale = np.where(flat, _F32(0), scale)
    return scale, -lo, Lf.astype(np.uint8)


def _pivot(x):
    """Signed value of the largest magnitude (first on ties) and that magnitude, per row."""
    idx = np.abs(x).argmax(axis=1)
    p = x[np.arange(x.shape[0]), idx]
    return p, np.abs(p)


def _fit_scale_sym(x, nmax):
    """fit_scale_sym of _quant.c (Q6_K sub-blocks), vectorised over rows."""
    rows, n = x.shape
    pivot, amax = _pivot(x)
    zero = amax < _F32(1e-15)
    pv = np.where(zero, _F32(1), pivot)
    w = x * x

    def sums(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(_F32)
        slx = np.zeros(rows, _F32)
        sl2 = np.zeros(rows, _F32)
        for i in range(n):
            slx = slx + w[:, i] * x[:, i] * lf[:, i]
            sl2 = sl2 + w[:, i] * lf[:, i] * lf[:, i]
        return l, slx, sl2

    iscale = _F32(-nmax) / pv
    L, sumlx, suml2 = sums(iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / pv
        l, slx, sl2 = sums(iscale)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(take[:, None], l, L)
        scale = np.where(take, slx / np.where(take, sl2, _F32(1)), scale)
        best = np.where(take, scale * slx, best)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _F32(0), scale), L


def _fit_scale_q3(x, nmax):
    """fit_scale_q3 of _quant.c (Q3_K sub-blocks: coordinate descent), vectorised over rows."""
    rows, n = x.shape
    pivot, amax = _pivot(x)
    zero = amax < _F32(1e-15)
    pv = np.where(zero, _F32(1), pivot)
    w = x * x
    L = np.clip(_nearest_int((_F32(-nmax) / pv)[:, None] * x), -nmax, nmax - 1)
    sumlx = np.zeros(rows, _F32)
    suml2 = np.zeros(rows, _F32)
    for i in range(n):
        li = L[:, i].astype(_F32)
        sumlx = sumlx + w[:, i] * x[:, i] * li
        suml2 = suml2 + w[:, i] * li * li
    active = ~zero
    for _ in range(5):
        changed = np.zeros(rows, bool)
        for i in range(n):
            li = L[:, i].astype(_F32)
            slx = sumlx - w[:, i] * x[:, i] * li
            pos = active & (slx > 0)
            sl2 = suml2 - w[:, i] * li * li
            nl = np.clip(_nearest_int(x[:, i] * sl2 / np.where(pos, slx, _F32(1))), -nmax, nmax - 1)
            diff = pos & (nl != L[:, i])
            nlf = nl.astype(_F32)
            slx2 = slx + w[:, i] * x[:, i] * nlf
            sl22 = sl2 + w[:, i] * nlf * nlf
            take = diff & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, nl, L[:, i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
            changed |= take
        active = active & changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, _F32(0), scale), L


def _pack2(L):
    """(nb, 256) 2-bit values -> (nb, 64): elements l, l+32, l+64, l+96 of each half in one byte."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _safe_div(a, d):
    return a / np.where(d == 0, _F32(1), d)


def _q2_k(b):
    nb = b.shape[0]
    x = b.reshape(nb * 16, 16)
    scales, mins, L = _fit_scale_min(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 256).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    sc = np.where(has_s[:, None], _nearest_int(_safe_div(_F32(15), max_scale)[:, None] * scales), 0) & 0xFF
    mc = np.where(has_m[:, None], _nearest_int(_safe_div(_F32(15), max_min)[:, None] * mins) << 4, 0) & 0xFF
    codes = (sc | mc).astype(np.uint8)
    d = np.where(has_s, max_scale / _F32(15), _F32(0))
    dmin = np.where(has_m, max_min / _F32(15), _F32(0))
    dd = _f16_value(d)[:, None] * (codes & 15).astype(_F32)
    dm = _f16_value(dmin)[:, None] * (codes >> 4).astype(_F32)
    xr = b.reshape(nb, 16, 16)
    req = np.clip(_nearest_int(_safe_div(xr + dm[:, :, None], dd[:, :, None])), 0, 3)
    L = np.where((dd != 0)[:, :, None], req, L.reshape(nb, 16, 16)).reshape(nb, 256)
    return np.concatenate([codes, _pack2(L), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q3_k(b):
    nb = b.shape[0]
    scales, L = _fit_scale_q3(b.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    pivot, amax = _pivot(scales)
    has = pivot != 0
    iscale = _F32(-32) / np.where(has, pivot, _F32(1))
    l = (np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32), -32, 31) + 32)
    l = np.where(has[:, None], l, 0).astype(np.uint8)
    sc = np.zeros((nb, 12), np.uint8)
    sc[:, 0:8] = (l[:, 0:8] & 15) | ((l[:, 8:16] & 15) << 4)
    hi = (l >> 4).reshape(nb, 4, 4)  # [j // 4][j % 4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = np.where(has, _F32(1) / iscale, _F32(0))
    s = l.astype(np.int32) - 32
    dd = _f16_value(d)[:, None] * s.astype(_F32)
    req = np.clip(_nearest_int(_safe_div(b.reshape(nb, 16, 16), dd[:, :, None])), -4, 3) + 4
    L = np.where((dd != 0)[:, :, None], req, L).reshape(nb, 256)
    high = L > 3
    hmask = np.packbits(high.reshape(nb, 8, 32).transpose(0, 2, 1), axis=2, bitorder="little").reshape(nb, 32)
    low = np.where(high, L - 4, L)
    return np.concatenate([hmask, _pack2(low), sc, _f16_bytes(d)], axis=1)


def _k_scales(b, nmax, rmin, nstep):
    """Q4_K/Q5_K: per-32 scale/min search, 6-bit codes, packed 12 bytes, d/dmin and the L values."""
    nb = b.shape[0]
    x = b.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, _F32)
    for i in range(32):
        sum_x2 = sum_x2 + x[:, i] * x[:, i]
    av = np.sqrt(sum_x2 / _F32(32))
    w = av[:, None] + np.abs(x)
    scales, mins, L = _fit_scale_min(x, w, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    inv_s = np.where(max_scale > 0, _safe_div(_F32(63), max_scale), _F32(0))
    inv_m = np.where(max_min > 0, _safe_div(_F32(63), max_min), _F32(0))
    ls = np.minimum(63, _nearest_int(inv_s[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_m[:, None] * mins) & 0xFF).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    d, dmin = max_scale / _F32(63), max_min / _F32(63)
    dd = _f16_value(d)[:, None] * ls.astype(_F32)
    dm = _f16_value(dmin)[:, None] * lm.astype(_F32)
    req = np.clip(_nearest_int(_safe_div(b.reshape(nb, 8, 32) + dm[:, :, None], dd[:, :, None])), 0, nmax)
    L = np.where((dd != 0)[:, :, None], req, L.reshape(nb, 8, 32).astype(np.int32)).reshape(nb, 256)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed], axis=1), L


def _q4_k(b):
    head, L = _k_scales(b, 15, -1.0, 20)
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return np.concatenate([head, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _q5_k(b):
    head, L = _k_scales(b, 31, -0.5, 15)
    q = L.astype(np.uint8)
    qh = np.packbits(((q >> 4) & 1).reshape(-1, 8, 32).transpose(0, 2, 1), axis=2, bitorder="little").reshape(-1, 32)
    low = (q & 15).reshape(-1, 4, 2, 32)
    return np.concatenate([head, qh, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _q6_k(b):
    nb = b.shape[0]
    scales, L = _fit_scale_sym(b.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    pivot, amax = _pivot(scales)
    zero = amax < _F32(1e-15)
    iscale = _F32(-128) / np.where(zero, _F32(1), pivot)
    d = _F32(1) / iscale
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dd = _f16_value(d)[:, None] * sc.astype(_F32)
    req = np.clip(_nearest_int(_safe_div(b.reshape(nb, 16, 16), dd[:, :, None])), -32, 31) + 32
    L = np.where((dd != 0)[:, :, None], req, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    out[zero] = 0
    return out


_NUMPY = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
          "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
