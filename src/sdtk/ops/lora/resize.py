"""`lora resize`: a LoRA at a lower rank, through QR + a small SVD of the factors.

kohya's resize_lora.py forms M = up @ down per module and runs a full SVD of it (hours for large
DiTs: sd-scripts PR #2240). The product has rank r, so its SVD is that of an r x r matrix
(reference/lora.md §6): up = Qu Ru, down^T = Qd Rd, Ru Rd^T = P S V^T, hence
M = (Qu P) S (Qd V)^T with the same singular values (seconds, not minutes). New factors: up' =
Qu P[:, :k] S[:k], down' = (Qd V[:, :k])^T, alpha' = s0 * k (s0 = the old alpha / rank), so the
scale is kept, as kohya does. Dynamic ranks follow kohya's index conventions (rank_resize):
sv_ratio t: k = #{S_i > S_0 / t}; sv_cumulative t: k = 1 + first index with cumsum(S)/sum(S) >= t;
sv_fro t: k = 1 + first index with cumsum(S^2)/sum(S^2) >= t^2; each k clamped to [1, len(S) - 1],
then new rank = k + 1, capped at --rank.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

F32 = np.float32


def factor_svd(up: np.ndarray, down: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, S, Vt) of up @ down (up (out, r), down (r, in)) through QR of each factor."""
    qu, ru = np.linalg.qr(up.astype(np.float64))
    qd, rd = np.linalg.qr(down.T.astype(np.float64))
    p, s, vt = np.linalg.svd(ru @ rd.T)
    return qu @ p, s, (qd @ vt.T).T


def dynamic_rank(s: np.ndarray, method: Optional[str], param: float, cap: int) -> int:
    """kohya resize_lora.py rank_resize conventions (documented above)."""
    n = len(s)
    if n == 0 or s[0] <= 1e-6:
        return 1
    if method is None:
        return max(1, min(cap, n))
    if method == "sv_ratio":
        k = int(np.sum(s > s[0] / param))
    elif method == "sv_cumulative":
        k = 1 + int(np.argmax(np.cumsum(s) / np.sum(s) >= param))
    elif method == "sv_fro":
        k = 1 + int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= param ** 2))
    else:
        raise ValueError(method)
    k = max(1, min(k, n - 1))
    return max(1, min(k + 1, cap, n))


def resize_factors(up: np.ndarray, down: np.ndarray, rank: int, method: Optional[str] = None,
                   param: float = 0.0) -> Tuple[np.ndarray, np.ndarray, int, float]:
    """(up', down', new rank, retained Frobenius fraction) for flattened factors."""
    u, s, vt = factor_svd(up, down)
    k = dynamic_rank(s, method, param, rank)
    total = float(np.sum(s ** 2)) or 1.0
    retained = float(np.sqrt(np.sum(s[:k] ** 2) / total))
    return (u[:, :k] * s[:k]).astype(F32), vt[:k].astype(F32), k, retained


def resize_file(src: str, dest: str, rank: int, method: Optional[str] = None, param: float = 0.0,
                overwrite: bool = False, on_module=None, on_start=None, on_tensor=None):
    """Resize every LoRA/LoCon module of `src`; returns [(module, old rank, new rank, retained)].
    Progress: `on_module(done, total)` after each module's SVD, `on_start(plan)` before writing,
    `on_tensor(t, bytes_done)` after each tensor written (an exception there: no partial file)."""
    import os

    from sdtk.errors import SdtkError
    from sdtk.formats import open_model
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.adapters.reading import read_adapter
    from sdtk.tensors import LazyTensor

    rows = []
    with open_model(src) as cat:
        adapter = read_adapter(cat.tensors, cat.metadata)
        float_dt = next((t.dtype for t in cat.tensors.values() if t.dtype.is_float), None)
        plan = []
        for name, m in adapter.modules.items():
            if m.kind not in ("lora", "locon") or "mid" in m.parts or m.dora:
                raise SdtkError(src, f"module {name} is {m.kind}{' with DoRA' if m.dora else ''}: only LoRA/LoCon modules can be resized")
            up_t, down_t = m.parts["up"], m.parts["down"]
            up = np.asarray(up_t.read(), F32).reshape(up_t.shape[0], -1)
            down = np.asarray(down_t.read(), F32).reshape(down_t.shape[0], -1)
            old = down.shape[0]
            alpha = m.scalar("alpha")
            s0 = (alpha / old) if alpha else 1.0
            new_up, new_down, k, retained = resize_factors(up, down, rank, method, param)
            rows.append((name, old, k, retained))
            if on_module is not None:
                on_module(len(rows), len(adapter.modules))
            dt = down_t.dtype
            shape_down = (k,) + tuple(down_t.shape[1:])
            shape_up = (up_t.shape[0], k) + tuple(up_t.shape[2:])
            plan += [LazyTensor(name + ".lora_down.weight", dt, shape_down, lambda a=new_down, s=shape_down, d=dt: a.reshape(s).astype(d.numpy)),
                     LazyTensor(name + ".lora_up.weight", dt, shape_up, lambda a=new_up, s=shape_up, d=dt: a.reshape(s).astype(d.numpy)),
                     LazyTensor(name + ".alpha", float_dt, (), lambda v=s0 * k, d=float_dt: np.array(v, dtype=d.numpy))]
        meta = dict(cat.metadata)
        ranks = {k for _, _, k, _ in rows}
        meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
        for stale in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
            meta.pop(stale, None)
        meta["ss_training_comment"] = f"resized by sdtk to rank {rank}" + (f" ({method} {param})" if method else "") + \
            ("; " + meta["ss_training_comment"] if meta.get("ss_training_comment") else "")
        if on_start is not None:
            on_start(plan)
        write_safetensors(dest, plan, meta, inputs=[src], overwrite=overwrite, on_tensor=on_tensor)
    return rows
