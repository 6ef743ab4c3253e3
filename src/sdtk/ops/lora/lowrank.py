"""Truncated SVDs of a weight difference, fast on a CPU, and kohya's clamp (pure numpy).

kohya's extract_lora_from_models.py runs a full `torch.linalg.svd` per module (minutes per SDXL
ff layer on a CPU; reference/lora.md §3.2, §6). Only the top k singular triplets are needed:
- "exact": the eigen-decomposition of the smaller Gram matrix, A^T A (or A A^T), accumulated in
  float64 by row blocks: the same singular values and vectors as a full SVD to float32 rounding
  (tests/test_lora_extract.py measures it against numpy.linalg.svd), several times faster.
- "randomized": Halko, Martinsson & Tropp (2011) range finder with `niter` subspace
  iterations, re-orthonormalised each time, oversampling p = k (l = 2k columns, as kohya PR
  #2240's `torch.svd_lowrank(q=2*rank)`, niter 2 as sd-mecha), worked on the wide orientation so
  every QR is of a small matrix. Seeded: the same inputs give the same bytes.
Singular pairs get a fixed sign (the largest |entry| of each right vector positive), so outputs
do not depend on the LAPACK build.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

F32 = np.float32
F64 = np.float64
ROWS = 2048  # row block of the float64 Gram accumulation (memory: ROWS x n float64)
METHODS = ("randomized", "exact")


def _gram(a: np.ndarray) -> np.ndarray:
    """A^T A in float64, by row blocks (no float64 copy of A)."""
    n = a.shape[1]
    g = np.zeros((n, n), dtype=F64)
    for i in range(0, a.shape[0], ROWS):
        blk = a[i:i + ROWS].astype(F64)
        g += blk.T @ blk
    return g


def _top_eigh(g: np.ndarray, k: int, spectrum: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, descending, clipped at 0: all of them when `spectrum`, else the top k;
    the top k eigenvectors as columns) of a symmetric float64 matrix. SciPy computes only the k
    wanted vectors (LAPACK syevr with an index range); numpy all of them."""
    n = g.shape[0]
    try:
        from scipy.linalg import eigh as sp_eigh
    except ImportError:  # SciPy is optional
        sp_eigh = None
    if sp_eigh is not None and k < n:
        w, v = sp_eigh(g, subset_by_index=[n - k, n - 1], driver="evr")
        w, v = w[::-1], v[:, ::-1]
        if spectrum:
            from scipy.linalg import eigvalsh

            w = eigvalsh(g)[::-1]
        return np.maximum(w, 0.0), v
    w, v = np.linalg.eigh(g)
    return np.maximum(w[::-1], 0.0), v[:, ::-1][:, :k]


def svd_exact(a: np.ndarray, k: int, spectrum: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(U (m,k), S (k,), Vt (k,n), all singular values or None) of a (m, n) float32 matrix; the
    whole spectrum is computed only when `spectrum` (dynamic ranks)."""
    m, n = a.shape
    if m < n:
        u, s, vt, full = svd_exact(np.ascontiguousarray(a.T), k, spectrum)
        return vt.T, s, u.T, full
    g = _gram(a)
    k = min(k, n)
    w, v = _top_eigh(g, k, spectrum)
    s = np.sqrt(w[:k])
    full = np.sqrt(w) if spectrum else None
    vk = v
    u = np.empty((m, k), dtype=F64)
    for i in range(0, m, ROWS):
        u[i:i + ROWS] = a[i:i + ROWS].astype(F64) @ vk
    nz = s > 0
    u[:, nz] /= s[nz]
    u[:, ~nz] = 0.0
    return u, s, vk.T, full


def svd_randomized(a: np.ndarray, k: int, niter: int = 2, oversample: Optional[int] = None,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (m,k), S (k,), Vt (k,n)) approximating the top-k SVD of a (m, n) float32 matrix."""
    m, n = a.shape
    if m > n:
        u, s, vt = svd_randomized(np.ascontiguousarray(a.T), k, niter, oversample, seed)
        return vt.T, s, u.T
    # wide (m <= n): the range of A lies in R^m; every QR below is of an (m, l) matrix
    l = min(m, k + (k if oversample is None else oversample))
    if l >= m:  # the sketch would be the whole space: exact is as cheap
        u, s, vt, _ = svd_exact(a, k)
        return u, s, vt
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, l), dtype=F32)
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(niter):
        z = a.T @ q  # (n, l)
        q, _ = np.linalg.qr(a @ z)  # a @ a^T @ q, orthonormalised (A A^T has A's left vectors)
    b = q.T @ a  # (l, n)
    # SVD of the small (l, n) matrix through its (l, l) Gram matrix, in float64
    ub, s, vt, _ = svd_exact(np.ascontiguousarray(b), k)
    return q.astype(F64) @ ub, s, vt


def fix_signs(u: np.ndarray, vt: np.ndarray) -> None:
    """In place: each pair (u_i, v_i) flipped so that v_i's largest-|.| entry is positive."""
    if vt.shape[0] == 0:
        return
    idx = np.argmax(np.abs(vt), axis=1)
    sign = np.sign(vt[np.arange(vt.shape[0]), idx])
    sign[sign == 0] = 1
    vt *= sign[:, None]
    u *= sign[None, :]


def kohya_clamp(up: np.ndarray, down: np.ndarray, quantile: float) -> Tuple[np.ndarray, np.ndarray]:
    """kohya's clamp: hi = the `quantile` of all entries of up and down together (linear
    interpolation, as torch.quantile), both clipped to [-hi, hi]. numpy has no 2^24-element
    limit (torch.quantile's, sd-scripts #1485)."""
    if quantile >= 1.0:
        return up, down
    hi = F32(np.quantile(np.concatenate([up.reshape(-1), down.reshape(-1)]).astype(F64), quantile))
    return np.clip(up, -hi, hi), np.clip(down, -hi, hi)
