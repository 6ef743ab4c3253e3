"""Merge formulas: pure numpy functions on float32 arrays, one tensor at a time.

Every function takes the inputs' values already converted to float32 (the plan does that, and
casts the result once to the output dtype). Scalars (`alpha`, `beta`) are Python floats; numpy
rounds them to float32 when they meet a float32 array (NEP 50), which is what torch does for a
float tensor times a Python scalar, so the operation order below reproduces A1111 bit for bit.

Sources are named per function. alpha is always "how much of B" (A1111's convention).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

F32 = np.float32


def weighted_sum(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * A + alpha * B.
    Source: A1111 modules/extras.py (later modules/extras.py `weighted_sum`):
    `((1 - alpha) * theta0) + (alpha * theta1)`, same operation order."""
    return (1 - alpha) * a + alpha * b


def add_difference(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    """A + alpha * (B - C).
    Source: A1111 `get_difference` (theta1 - theta2) then `add_difference`
    (`theta0 + (alpha * theta1_2_diff)`), same operation order."""
    return a + alpha * (b - c)


def triple_sum(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """(1 - alpha - beta) * A + alpha * B + beta * C.  Source: supermerger "triple sum" (mode TRS)."""
    return (1 - alpha - beta) * a + alpha * b + beta * c


def sum_twice(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """(1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C.  Source: supermerger "sum twice" (mode ST)."""
    return (1 - beta) * weighted_sum(a, b, alpha) + beta * c


TRAIN_DIFFERENCE_GAIN = 1.8  # supermerger's constant (scripts/mergers/mergers.py, mode "TD")


def train_difference(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    """Add (B - C) scaled per element by |B - A| / (|B - C| + |B - A|): the difference is added
    fully where A is far from B, hardly where A already has it.
    Source: supermerger scripts/mergers/mergers.py mode "TD" (also sd-mecha `add_trained_difference`):
    new_diff = sign(B - C) * scale * |B - C|;  A + new_diff * (alpha * 1.8); A unchanged when B == C."""
    diff = b - c
    if not np.any(diff):
        return a.copy()
    dist_bc = np.abs(diff)
    dist_ba = np.abs(b - a)
    total = dist_bc + dist_ba
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total != 0, dist_ba / total, F32(0))
    new_diff = np.sign(diff) * scale * dist_bc
    return a + new_diff * (alpha * TRAIN_DIFFERENCE_GAIN)


def top_k_threshold(magnitudes: np.ndarray, density: float) -> float:
    """The smallest magnitude kept when keeping the `density` fraction of largest ones
    (ties at the threshold are kept). Partitions `magnitudes` in place."""
    flat = magnitudes.reshape(-1)
    keep = int(np.ceil(density * flat.size))
    if keep >= flat.size or flat.size == 0:
        return 0.0
    if keep <= 0:
        return float("inf")
    flat.partition(flat.size - keep)
    return float(flat[flat.size - keep])


def ties_apply(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float, thresholds) -> np.ndarray:
    """TIES with the trim thresholds already known (elementwise, so it works chunk by chunk)."""
    deltas = []
    for m, thr in zip((a, b), thresholds):
        d = m - c
        deltas.append(np.where(np.abs(d) >= thr, d, d.dtype.type(0)) if thr > 0 else d)
    elected = np.sign(deltas[0] + deltas[1])
    total = np.zeros_like(c)
    count = np.zeros_like(c)
    for d in deltas:
        agree = (np.sign(d) == elected) & (d != 0)
        total += np.where(agree, d, d.dtype.type(0))
        count += agree
    merged = total / np.maximum(count, count.dtype.type(1))
    return c + alpha * merged


def ties(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """TIES-merging of the task vectors A - C and B - C on base C.
    Source: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"
    (trim: keep the top `beta` fraction of each delta by magnitude; elect: the sign of the sum of
    the trimmed deltas; disjoint merge: the mean of the deltas that agree with the elected sign);
    as in meh `ties_add_difference` and sd-mecha `ties_sum`. Result: C + alpha * merged."""
    thresholds = [top_k_threshold(np.abs(m - c), beta) for m in (a, b)]
    return ties_apply(a, b, c, alpha, thresholds)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def dare_keep_mask(seed: int, key: str, start: int, count: int, drop: float) -> np.ndarray:
    """Which elements [start, start + count) of a tensor's delta DARE keeps.

    One PCG64 stream per tensor, seeded by (seed, stable hash of the key name), one float64 draw
    per element; `advance` jumps to `start`, so the mask does not depend on how the tensor is
    chunked or in which order keys are computed: same seed, same bytes."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _key_hash(key)]))
    if start:
        bits.advance(start)
    return np.random.Generator(bits).random(count) >= drop


def dare(a: np.ndarray, b: np.ndarray, c: Optional[np.ndarray], alpha: float, beta: float,
         keep: np.ndarray) -> np.ndarray:
    """DARE: drop each element of the delta (B - C, or B - A without C) with probability `beta`,
    rescale the survivors by 1 / (1 - beta); A + alpha * delta. `keep` from `dare_keep_mask`.
    Source: Yu et al. 2023, "Language Models are Super Mario" (Drop And REscale); sd-mecha
    `dropout`/DARE."""
    base = a if c is None else c
    delta = b - base
    rescale = delta.dtype.type(1.0 / (1.0 - beta))
    return a + alpha * np.where(keep.reshape(delta.shape), delta * rescale, delta.dtype.type(0))


SLERP_DOT_THRESHOLD = 0.9995  # nearly parallel: linear interpolation (sd-mecha uses the same fallback idea)


def combine(a: np.ndarray, b: np.ndarray, ca: float, cb: float) -> np.ndarray:
    """ca * A + cb * B (slerp and cosine reduce to this once their per-tensor scalars are known)."""
    return ca * a + cb * b


def slerp_coefficients(dot: float, na: float, nb: float, alpha: float) -> Tuple[float, float]:
    """(ca, cb) such that slerp(A, B) = ca * A + cb * B.
    Direction: sin((1 - t) w) / sin w * A/|A| + sin(t w) / sin w * B/|B|, w = arccos(cos(A, B));
    norm: (1 - t) |A| + t |B|. Source: sd-mecha `slerp` (normalise, arccos of the dot product,
    sin-weighted sum, rescaled by the weighted sum of the norms). Zero or (anti)parallel tensors:
    weighted sum."""
    if na == 0 or nb == 0:
        return 1 - alpha, alpha
    cos = max(-1.0, min(1.0, dot / (na * nb)))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1 - alpha, alpha
    omega = float(np.arccos(cos))
    so = float(np.sin(omega))
    norm = (1 - alpha) * na + alpha * nb
    return (float(np.sin((1 - alpha) * omega) / so * norm / na), float(np.sin(alpha * omega) / so * norm / nb))


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation of the flattened tensors (see `slerp_coefficients`)."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    ca, cb = slerp_coefficients(float(a64 @ b64), float(np.linalg.norm(a64)), float(np.linalg.norm(b64)), alpha)
    return combine(a, b, ca, cb)


def cosine_coefficients(dot: float, na: float, nb: float, alpha: float) -> Tuple[float, float]:
    """(1 - k, k) with k = 1 - clip(cos(A, B) - alpha, 0, 1): where the models agree (cos near 1)
    A is kept, where they differ B is taken; alpha lowers the bar.
    Source: sd-mecha `add_cosine_a` / `add_cosine_generic` (k = 1 - clamp(similarity - alpha, 0, 1)),
    after supermerger's "cosineA"; sdtk computes the similarity per tensor (sd-mecha: per column)."""
    if na == 0 or nb == 0:
        cos = 1.0 if na == nb else 0.0
    else:
        cos = dot / (na * nb)
    k = 1.0 - min(max(cos - alpha, 0.0), 1.0)
    return 1 - k, k


def cosine(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return combine(a, b, *cosine_coefficients(float(a64 @ b64), float(np.linalg.norm(a64)), float(np.linalg.norm(b64)), alpha))


def weighted_sum_into(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """`weighted_sum` computed in the buffers of A and B (same operations, same rounding, no
    temporaries); for the chunk arrays the plan owns."""
    np.multiply(a, 1 - alpha, out=a)
    np.multiply(b, alpha, out=b)
    return np.add(a, b, out=a)


def add_difference_into(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    """`add_difference` computed in the buffers of A and B (same operations, same rounding)."""
    np.subtract(b, c, out=b)
    np.multiply(b, alpha, out=b)
    return np.add(a, b, out=a)


def elementwise(method: str, arrays, alpha: float, beta: Optional[float], owned: bool = False) -> np.ndarray:
    """The purely elementwise methods, on (chunks of) float arrays A, B[, C]. `owned`: the arrays
    are scratch copies that may be overwritten (the two hot paths then avoid temporaries)."""
    if owned and method == "weighted-sum":
        return weighted_sum_into(arrays[0], arrays[1], alpha)
    if owned and method == "add-difference":
        return add_difference_into(arrays[0], arrays[1], arrays[2], alpha)
    if method == "weighted-sum":
        return weighted_sum(arrays[0], arrays[1], alpha)
    if method == "add-difference":
        return add_difference(arrays[0], arrays[1], arrays[2], alpha)
    if method == "triple-sum":
        return triple_sum(arrays[0], arrays[1], arrays[2], alpha, beta)
    if method == "sum-twice":
        return sum_twice(arrays[0], arrays[1], arrays[2], alpha, beta)
    if method == "train-difference":
        return train_difference(arrays[0], arrays[1], arrays[2], alpha)
    raise KeyError(method)


@dataclass(frozen=True)
class Method:
    """A merge method: how many inputs, which scalars it takes and their valid ranges."""

    name: str
    inputs: Tuple[int, ...]  # accepted numbers of input models
    alpha_range: Tuple[float, float]
    beta_range: Optional[Tuple[float, float]]  # None: no beta
    alpha_default: float
    beta_default: Optional[float]
    summary: str
    beta_open_high: bool = False  # beta must be < the high end (DARE drop rate)


# The method table. Ranges: interpolations in [0, 1]; differences scaled in [-1, 2] (negative
# subtracts, > 1 exaggerates, both used in the wild); TIES density in (0, 1]; DARE drop in [0, 1).
METHODS = {
    m.name: m
    for m in (
        Method("weighted-sum", (2,), (0.0, 1.0), None, 0.5, None, "(1 - a) A + a B"),
        Method("add-difference", (3,), (-1.0, 2.0), None, 1.0, None, "A + a (B - C)"),
        Method("triple-sum", (3,), (0.0, 1.0), (0.0, 1.0), 0.33, 0.33, "(1 - a - b) A + a B + b C"),
        Method("sum-twice", (3,), (0.0, 1.0), (0.0, 1.0), 0.5, 0.5, "(1 - b) ((1 - a) A + a B) + b C"),
        Method("train-difference", (3,), (-1.0, 2.0), None, 1.0, None, "A + 1.8 a * scaled (B - C)"),
        Method("ties", (3,), (-1.0, 2.0), (0.0, 1.0), 1.0, 0.2, "C + a * TIES(A - C, B - C; density b)"),
        Method("dare", (2, 3), (-1.0, 2.0), (0.0, 1.0), 1.0, 0.5, "A + a * DARE(B - C or B - A; drop b)", True),
        Method("slerp", (2,), (0.0, 1.0), None, 0.5, None, "spherical interpolation A -> B"),
        Method("cosine", (2,), (0.0, 1.0), None, 0.0, None, "(1 - k) A + k B, k = 1 - clip(cos(A,B) - a, 0, 1)"),
    )
}




def check_scalars(method: str, alpha: float, beta: Optional[float], what: str = "--alpha") -> None:
    """Refuse alpha/beta outside the method's range (one-line UsageError)."""
    from sdtk.errors import UsageError

    m = METHODS[method]
    lo, hi = m.alpha_range
    if not (lo <= alpha <= hi) or alpha != alpha:
        raise UsageError(None, f"{what} {alpha:g} is outside {method}'s range [{lo:g}, {hi:g}]")
    if m.beta_range is not None and beta is not None:
        blo, bhi = m.beta_range
        ok = blo <= beta < bhi if m.beta_open_high else blo <= beta <= bhi
        if method == "ties" and beta == 0:
            ok = False
        if not ok:
            bracket = ")" if m.beta_open_high else "]"
            low = "(" if method == "ties" else "["
            raise UsageError(None, f"--beta {beta:g} is outside {method}'s range {low}{blo:g}, {bhi:g}{bracket}")
    if method == "triple-sum" and beta is not None and alpha + beta > 1:
        raise UsageError(None, f"triple-sum needs alpha + beta <= 1 (got {alpha:g} + {beta:g})")
