"""The adapter math as pure numpy functions (float32 in, float32 out; nothing here reads a file).

Formulas (reference/lora.md §2, each checked against the oracles in tests/test_lora_oracles.py):
- LoRA / LoCon: dW = up @ down (conv k x k: up (out,r,1,1) times down (r,in,k,k) flattened);
  Tucker (`lora_mid`): dW[o,i,k,l] = sum_ab up[o,a] mid[a,b,k,l] down[b,i] (ComfyUI
  tucker_weight_from_conv, LyCORIS rebuild_tucker). Scale alpha / rank, rank = down.shape[0].
- LoHa: (w1a @ w1b) * (w2a @ w2b), Tucker factors t[a,b,k,l] w_a[a,o] w_b[b,i]; scale alpha / w1b.shape[0].
- LoKr: kron(w1, w2) with each side full or a @ b (w2 optionally Tucker); scale alpha / r only when a
  side is factorised (r from w1_b, overridden by w2_b), else 1 (ComfyUI lokr.py, A1111 network_lokr.py).
- DoRA: the magnitude times the normalised direction of W + s dW, per output row or input column.
- (IA)^3: W * w broadcast over inputs or outputs. GLoRA: W A1 A2 + B1 B2. OFT: Cayley rotations of
  row blocks (kohya networks/oft.py, LyCORIS diag_oft.py); BOFT: butterfly stages of them
  (LyCORIS functional/boft.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

F32 = np.float32
EPS = float(np.finfo(np.float32).eps)  # added to DoRA norms (ComfyUI weight_decompose, LyCORIS)


def flat2(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def rank_scale(alpha: Optional[float], rank: int) -> float:
    """alpha / rank; 1 when the file has no alpha, or alpha 0 (kohya: "support old LoRA without alpha",
    LoRAModule maps alpha 0 / None to rank; ComfyUI would compute 0 for alpha 0)."""
    if alpha is None or alpha == 0 or rank == 0:
        return 1.0
    return float(alpha) / rank


def lora_delta(up: np.ndarray, down: np.ndarray, mid: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """(dW unscaled, its natural shape): (out, in) for Linear, (out, in, kh, kw) for conv."""
    u, d = flat2(up), flat2(down)
    if mid is None:
        shape = (up.shape[0],) + tuple(down.shape[1:])
        return (u @ d).reshape(shape), shape
    # mid (r_up, r_down, kh, kw); down (r_down, in, 1, 1); up (out, r_up, 1, 1)
    out = np.einsum("oa,abkl,bi->oikl", u, mid, d, optimize=True)
    return out, out.shape


def tucker_factor(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """LoHa/LoKr Tucker factor: sum_ab t[a,b,k,l] wa[a,o] wb[b,i] -> (o, i, k, l)."""
    return np.einsum("abkl,ao,bi->oikl", t, flat2(wa), flat2(wb), optimize=True)


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None) -> np.ndarray:
    """(W1a W1b) * (W2a W2b), unscaled; flat (out, in*k*k) without Tucker, (out, in, k, k) with."""
    if t1 is not None and t2 is not None:
        out = tucker_factor(t1, w1a, w1b)
    else:
        out = flat2(w1a) @ flat2(w1b)
        t2 = None
    out *= tucker_factor(t2, w2a, w2b) if t2 is not None else flat2(w2a) @ flat2(w2b)
    return out


HADAMARD_BLOCK = 1 << 18  # values per row block of add_hadamard (two 1 MiB float32 products: in cache)


def add_hadamard(weight: np.ndarray, w1a, w1b, w2a, w2b, factor, buffers=None) -> None:
    """weight += factor * (W1a W1b) * (W2a W2b), in place, a block of rows at a time: the same
    float32 operations on every value as `loha_delta`, then `*= factor`, then `+=` (each value of
    a product is the same dot product over the rank whichever rows are computed with it), without
    the two full-size products (2 x 118 MB for a 1280x2560x3x3 conv). `weight` C-contiguous
    float32 with w1a.shape[0] rows; `buffers(n, slot)` supplies the block arrays (else new ones)."""
    w2 = weight.reshape(weight.shape[0], -1)
    a1, b1, a2, b2 = (np.ascontiguousarray(flat2(x), dtype=F32) for x in (w1a, w1b, w2a, w2b))
    rows, cols = w2.shape
    step = max(1, min(rows, HADAMARD_BLOCK // max(1, cols)))
    make = buffers or (lambda n, slot: np.empty(n, dtype=F32))
    p1_all, p2_all = make(step * cols, "hadamard1"), make(step * cols, "hadamard2")
    factor = F32(factor)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        p1 = np.matmul(a1[r0:r1], b1, out=p1_all[:(r1 - r0) * cols].reshape(r1 - r0, cols))
        p1 *= np.matmul(a2[r0:r1], b2, out=p2_all[:(r1 - r0) * cols].reshape(r1 - r0, cols))
        p1 *= factor
        w2[r0:r1] += p1


def lokr_delta(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) -> np.ndarray:
    """kron(W1, W2), unscaled."""
    if w1 is None:
        w1 = flat2(w1a) @ flat2(w1b)
    if w2 is None:
        if t2 is not None:
            w2 = tucker_factor(t2, w2a, w2b)
        else:
            w2 = flat2(w2a) @ flat2(w2b)
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2)


def lokr_scale(alpha: Optional[float], w1b_rank: Optional[int], w2b_rank: Optional[int]) -> float:
    """alpha / r when a side is factorised (r = w2_b's rank if w2 is, else w1_b's); 1 when both are full."""
    rank = w2b_rank if w2b_rank is not None else w1b_rank
    if rank is None or alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def glora_delta(weight: np.ndarray, a1, a2, b1, b2) -> np.ndarray:
    """W A1 A2 + B1 B2 (LyCORIS glora.py; new layout a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,in)),
    or the old layout b2 b1 + W a2 a1 (a1 (r,in), a2 (in,r), b1 (r,in), b2 (out,r)). Linear weights
    and the channel axis of conv weights (the spatial kernel passes through)."""
    out = weight.shape[0]
    w = weight.reshape(out, weight.shape[1], -1)  # (o, i, k)
    a1, a2, b1, b2 = flat2(a1), flat2(a2), flat2(b1), flat2(b2)
    inn = weight.shape[1]
    new = a1.shape[0] == inn and a2.shape[1] == inn and b1.shape[0] == out
    if new:
        wa = np.einsum("oik,ij,jm->omk", w, a1, a2, optimize=True)
        bb = (b1 @ b2)
    else:
        wa = np.einsum("oik,ij,jm->omk", w, a2, a1, optimize=True)
        bb = (b2 @ b1)
    return wa.reshape(weight.shape) + bb.reshape(weight.shape)


def glora_rank(a1, a2, weight_in: int) -> int:
    return a2.shape[0] if a1.shape[0] == weight_in else a1.shape[0]


def ia3_delta(weight: np.ndarray, w: np.ndarray, on_input: bool) -> np.ndarray:
    """W * w: w scales input columns when on_input, else output rows (A1111 network_ia3.py)."""
    w = w.reshape(-1)
    if on_input:
        return weight * w.reshape((1, -1) + (1,) * (weight.ndim - 2))
    return weight * w.reshape((-1,) + (1,) * (weight.ndim - 1))


def oft_rotation(blocks: np.ndarray, constraint: Optional[float]) -> np.ndarray:
    """Cayley rotations R = (I + Q)(I - Q)^-1, Q = B - B^T (per block), with ||Q|| clamped to the
    constraint when it is positive (kohya oft.py: c = alpha * out_dim, 1e-8 guard)."""
    q = blocks - np.swapaxes(blocks, -1, -2)
    if constraint is not None and constraint > 0:
        norm = float(np.linalg.norm(q))
        if norm > constraint:
            q = q * (constraint / (norm + 1e-8))
    eye = np.eye(q.shape[-1], dtype=q.dtype)
    return np.linalg.solve((eye - q).swapaxes(-1, -2), (eye + q).swapaxes(-1, -2)).swapaxes(-1, -2)


def oft_apply(weight: np.ndarray, rotation: np.ndarray, strength: float, rescale: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows of W in blocks, each block rotated: W'_b = R_m^T W_b with R_m = m R + (1 - m) I."""
    n, b = rotation.shape[0], rotation.shape[-1]
    eye = np.eye(b, dtype=rotation.dtype)
    r = strength * rotation + (1.0 - strength) * eye
    w = weight.reshape(n, b, -1)
    out = np.einsum("knm,knx->kmx", r, w, optimize=True).reshape(weight.shape)
    if rescale is not None:
        out = out * rescale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return out


def boft_apply(weight: np.ndarray, rotations: np.ndarray, strength: float, rescale: Optional[np.ndarray] = None) -> np.ndarray:
    """Butterfly OFT: m stages, stage i rotating blocks of b rows after a butterfly permutation
    that pairs rows 2^i * b/2 apart; each stage R_m = m R + (1 - m) I (the multiplier folded into
    every stage), then the optional per-row rescale. `rotations` (m, blocks, b, b) from
    oft_rotation. The steps of LyCORIS functional/boft.py _diff_weight (W' = W + dW there),
    reference/lora.md section 2.6."""
    stages, _, b, _ = rotations.shape
    rows, rest = weight.shape[0], weight.shape[1:]
    eye = np.eye(b, dtype=rotations.dtype)
    half = b // 2
    x = weight.reshape(rows, -1)
    for i in range(stages):
        r = rotations[i]
        if strength != 1:
            r = r * F32(strength) + F32(1.0 - strength) * eye
        k = 2 ** i * half
        # rows (c, g=2, k) -> (c, k, g): partners 2^i * b/2 apart side by side, then blocks of b
        x = x.reshape(-1, 2, k, x.shape[-1]).swapaxes(1, 2).reshape(-1, b, x.shape[-1])
        x = np.matmul(r, x)
        x = x.reshape(-1, k, 2, x.shape[-1]).swapaxes(1, 2).reshape(rows, -1)
    out = np.ascontiguousarray(x).reshape((rows,) + tuple(rest))
    if rescale is not None:
        out = out * rescale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return out


def dora_axis(magnitude_shape: Tuple[int, ...], weight_shape: Tuple[int, ...], peft: bool) -> str:
    """"out" (one norm per output row) or "in" (per input column). PEFT magnitudes are always per
    output (1-D, or (1,out,1,1) for conv); kohya/LyCORIS `dora_scale` is (out,1...) or (1,in...)."""
    if peft or len(magnitude_shape) == 1:
        return "out"
    if magnitude_shape[0] == weight_shape[0] and int(np.prod(magnitude_shape)) == weight_shape[0]:
        return "out"
    return "in"


def dora_apply(weight: np.ndarray, scaled_delta: np.ndarray, magnitude: np.ndarray, strength: float,
               axis: str, convention: str = "comfyui") -> np.ndarray:
    """The DoRA'd weight. W' = W + s dW; D = magnitude / ||W'|| (per `axis`).
    "comfyui" (ComfyUI / A1111): W + m (D W' - W), linear between W and the full DoRA weight.
    "lycoris" (LyCORIS _weight_decompose): W' (1 + m (D - 1)): the delta always at full strength."""
    wp = weight + scaled_delta
    if axis == "out":
        norm = np.sqrt(np.sum(flat2(wp).astype(np.float64) ** 2, axis=1)).astype(F32).reshape((-1,) + (1,) * (wp.ndim - 1))
        mag = magnitude.reshape(norm.shape)
    else:
        cols = np.swapaxes(wp, 0, 1).reshape(wp.shape[1], -1)
        norm = np.sqrt(np.sum(cols.astype(np.float64) ** 2, axis=1)).astype(F32).reshape((1, -1) + (1,) * (wp.ndim - 2))
        mag = magnitude.reshape(norm.shape)
    factor = mag / (norm + F32(EPS))
    if convention == "lycoris":
        return wp * (1.0 + strength * (factor - 1.0))
    return weight + strength * (wp * factor - weight)


def add_product(weight: np.ndarray, up: np.ndarray, down: np.ndarray, factor: float) -> None:
    """weight += factor * up @ down, in place (weight C-contiguous float32, any shape with
    weight.shape[0] rows), as numpy's steps: the product, `*= f32(factor)`, `+=`. Always these
    steps (not a BLAS sgemm with beta = 1, whose fused rounding differs), so the bytes written do
    not depend on whether SciPy is installed, and equal the fused fp16 bake (sdtk._fastcast)."""
    w2 = weight.reshape(weight.shape[0], -1)
    u, d = np.ascontiguousarray(flat2(up), dtype=F32), np.ascontiguousarray(flat2(down), dtype=F32)
    delta = u @ d
    delta *= F32(factor)
    w2 += delta
