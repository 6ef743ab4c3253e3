"""`lora merge`: several LoRAs into one, exactly, by concatenating ranks.

kohya's merge_lora.py sums the factors of LoRAs of equal rank tensor by tensor, which adds cross
terms U_i D_j and squares every ratio (sd-scripts #868); its `--concat` keeps alpha while the rank
grows. Exact instead (reference/lora.md §3.1): with c_i = w_i * alpha_i / r_i, down_i * sqrt|c_i|
and up_i * sign(c_i) sqrt|c_i| concatenated along the rank, alpha = the total rank (scale 1), so
applying the result equals applying each input at its weight: sum_i w_i s_i U_i D_i.
Only LoRA / LoCon modules (no Tucker mid, no DoRA: DoRA is not linear) can be concatenated.

At a fixed rank (`rank_merge`, kohya's svd_merge_lora.py semantics, linear in the weights): per
module the target is M = sum_i w_i s_i dW_i, truncated to its top-k singular triplets. For LoRA /
LoCon inputs the same sqrt|c_i| factors are stacked (U = [sign(c_i) sqrt|c_i| up_i], D =
[sqrt|c_i| down_i], M = U D) and reduced through resize's QR + small SVD (resize.factor_svd): the
dense M is never formed. A module where some input is Tucker LoCon, LoHa, LoKr or a full diff is
made dense (only that module) and its top k come from lowrank.svd_exact. New factors: up = U_k S_k,
down = V_k^T (kohya's split), alpha = k (scale 1). Dynamic ranks: resize.dynamic_rank.
kohya's own semantics, only behind `--kohya-ratios` (`kohya_merge`; reference §3.1, sd-scripts
networks/merge_lora.py merge_lora_models without --concat): per module base_alpha = the alpha of
the first input holding it (alpha = rank when absent); every down is multiplied by k_i =
sqrt(alpha_i / base_alpha) * w_i and every up by |k_i|, the factors are summed tensor by tensor (equal
ranks only) and alpha = base_alpha. The product carries cross terms up_i down_j and every weight
acts as w_i |w_i| (sd-scripts #868: users pass sqrt of the ratio they mean).
Non-Tucker LoHa and flat LoKr factors do not record a conv kernel: when no input of the module
does, the merged factors keep the flattened (out, in*kh*kw) layout (sdtk and ComfyUI reshape by
element count).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.errors import SdtkError
from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.adapters.reading import read_adapter
from sdtk.ops.lora.patch import module_scale
from sdtk.tensors import LazyTensor, dtype as dtype_named

F32 = np.float32
F64 = np.float64


@dataclass
class MergeSummary:
    output: str
    modules: int
    ranks: Dict[int, int]  # total rank -> modules
    inputs: List[Tuple[str, float]]


def _open_inputs(inputs: Sequence[Tuple[str, float]], cats: list, refuse, out_dtype: Optional[str]):
    """Open every input (appended to `cats`, which the caller closes), read its adapter, refuse the
    modules `refuse(path, name, module)` rejects; -> ([(adapter, weight, path)], output dtype
    (`out_dtype`, else the widest float dtype of the inputs), module names in first-seen order)."""
    adapters = []
    for path, weight in inputs:
        cat = open_model(path)
        cats.append(cat)
        adapter = read_adapter(cat.tensors, cat.metadata)
        for name, m in adapter.modules.items():
            refuse(path, name, m)
        if adapter.unknown:
            raise SdtkError(path, f"holds tensors that are not LoRA factors (e.g. {adapter.unknown[0]})")
        adapters.append((adapter, weight, path))
    widest = max((t.dtype for c in cats for t in c.tensors.values() if t.dtype.is_float), key=lambda d: d.itemsize)
    dt = dtype_named(out_dtype) if out_dtype else widest
    names: List[str] = []
    for adapter, _, _ in adapters:
        names += [n for n in adapter.modules if n not in names]
    return adapters, dt, names


def _refuse_for_concat(path: str, name: str, m) -> None:
    if m.kind not in ("lora", "locon") or "mid" in m.parts or m.dora:
        what = "DoRA" if m.dora else ("Tucker LoCon" if "mid" in m.parts else m.kind)
        raise SdtkError(path, f"module {name} is {what}: only LoRA/LoCon modules can be merged exactly by concatenation")


def concat_merge(inputs: Sequence[Tuple[str, float]], dest: str, overwrite: bool = False,
                 out_dtype: Optional[str] = None, on_start=None, on_tensor=None) -> MergeSummary:
    """Write the exact rank-concatenated merge of `inputs` ((path, weight), ...) to `dest`.
    `on_start(plan)` before writing, `on_tensor(t, bytes_done)` after each tensor (progress; an
    exception raised there unwinds the writer: no partial file)."""
    cats = []
    try:
        adapters, dt, names = _open_inputs(inputs, cats, _refuse_for_concat, out_dtype)
        plan: List[LazyTensor] = []
        ranks: Dict[int, int] = {}
        for name in names:
            parts = [(a.modules[name], w, a.peft_config, p) for a, w, p in adapters if name in a.modules]
            shapes = {(tuple(m.parts["up"].shape[:1]) + tuple(m.parts["down"].shape[1:])) for m, _, _, _ in parts}
            if len(shapes) > 1:
                raise SdtkError(parts[1][3], f"module {name} has shape {sorted(shapes)[1]} but {sorted(shapes)[0]} in another input")
            total = sum(m.parts["down"].shape[0] for m, _, _, _ in parts)
            ranks[total] = ranks.get(total, 0) + 1
            up_key, down_key = _keys(name, parts[0][0])
            down_shape = (total,) + tuple(parts[0][0].parts["down"].shape[1:])
            up_shape = (parts[0][0].parts["up"].shape[0], total) + tuple(parts[0][0].parts["up"].shape[2:])

            def down_loader(parts=parts):
                return np.concatenate([np.asarray(m.parts["down"].read(), F32) * F32(np.sqrt(abs(w * module_scale(m, peft))))
                                       for m, w, peft, _ in parts], axis=0).astype(dt.numpy)

            def up_loader(parts=parts):
                return np.concatenate([np.asarray(m.parts["up"].read(), F32) * F32(np.sign(w * module_scale(m, peft)) * np.sqrt(abs(w * module_scale(m, peft))))
                                       for m, w, peft, _ in parts], axis=1).astype(dt.numpy)

            alpha = np.array(total, dtype=dt.numpy)
            plan += [LazyTensor(down_key, dt, down_shape, down_loader), LazyTensor(up_key, dt, up_shape, up_loader),
                     LazyTensor(name + ".alpha", dt, (), lambda a=alpha: a)]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
                "sdtk.lora_merge": ", ".join(f"{os.path.basename(p)}:{w:g}" for p, w in inputs)}
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation"):
            if key in cats[0].metadata:
                meta[key] = cats[0].metadata[key]
        if on_start is not None:
            on_start(plan)
        write_safetensors(dest, plan, meta, inputs=[p for p, _ in inputs], overwrite=overwrite, on_tensor=on_tensor)
        return MergeSummary(os.fspath(dest), len(names), ranks, list(inputs))
    finally:
        for c in cats:
            c.close()


@dataclass
class RankMergeModule:
    name: str
    rank: int  # the output rank
    stacked: int  # the rank of the exact merge (sum of the inputs' ranks; 0 when made dense)
    dense: bool  # the module was made dense (Tucker, LoHa, LoKr, full diff among its inputs)
    retained: float  # ||M_k|| / ||M|| (Frobenius)
    error: float  # ||M - M_k|| / ||M|| (Frobenius), the truncation error

    def as_dict(self) -> dict:
        return {"module": self.name, "rank": self.rank, "stacked_rank": self.stacked, "dense": self.dense,
                "retained_fro": self.retained, "error_fro": self.error}


MERGEABLE = ("lora", "locon", "loha", "lokr", "full")


def _refuse(path: str, name: str, m) -> None:
    from sdtk.adapters.reading import KIND_LABELS

    if m.dora:
        raise SdtkError(path, f"module {name} has DoRA: DoRA is not linear, so it cannot be merged into a LoRA")
    if m.kind not in MERGEABLE or (m.kind == "full" and "diff" not in m.parts):
        raise SdtkError(path, f"module {name} is {KIND_LABELS.get(m.kind, m.kind)}: only LoRA, LoCon, LoHa, LoKr and full-diff modules can be merged at a rank")
    if m.kind == "full" and "diff_b" in m.parts:
        raise SdtkError(path, f"module {name} has a bias diff (diff_b): a LoRA cannot carry it")


def _dense(m, peft, weight: float, shape: Tuple[int, ...]) -> np.ndarray:
    """weight * scale * dW of one module, flattened to (out, in*kh*kw), float32."""
    from sdtk.ops.lora.patch import additive_delta

    d = additive_delta(m, np.empty(shape, dtype=F32))  # only the shape of the dummy is used
    scale = 1.0 if m.kind == "full" else module_scale(m, peft)
    return (d.reshape(shape[0], -1) * F32(weight * scale)).astype(F32, copy=False)


def rank_merge(inputs: Sequence[Tuple[str, float]], dest: str, rank: int, method: Optional[str] = None,
               param: float = 0.0, overwrite: bool = False, out_dtype: Optional[str] = None):
    """Write the rank-`rank` merge of `inputs` ((path, weight), ...) to `dest` (see the module
    docstring); returns (MergeSummary, [RankMergeModule])."""
    from sdtk.adapters.reading import natural_shape
    from sdtk.ops.lora.lowrank import svd_exact
    from sdtk.ops.lora.resize import dynamic_rank, factor_svd

    if rank < 1:
        raise SdtkError(None, "--rank must be at least 1")
    cats = []
    try:
        adapters, dt, names = _open_inputs(inputs, cats, _refuse, out_dtype)
        plan: List[LazyTensor] = []
        rows: List[RankMergeModule] = []
        ranks: Dict[int, int] = {}
        for name in names:
            parts = [(a.modules[name], w, a.peft_config, p) for a, w, p in adapters if name in a.modules]
            shapes = [natural_shape(m) for m, _, _, _ in parts]
            numels = {int(np.prod(s)) for s in shapes}
            outs = {s[0] for s in shapes}
            if len(numels) > 1 or len(outs) > 1:
                raise SdtkError(parts[-1][3], f"module {name} has shape {shapes[-1]} but {shapes[0]} in another input")
            shape = max(shapes, key=len)  # a conv kernel, if any input records it
            factored = all(m.kind in ("lora", "locon") and "mid" not in m.parts for m, _, _, _ in parts)
            if factored:
                cs = [w * module_scale(m, peft) for m, w, peft, _ in parts]
                up = np.concatenate([np.asarray(m.parts["up"].read(), F32).reshape(shape[0], -1) * F32(np.sign(c) * np.sqrt(abs(c)))
                                     for (m, _, _, _), c in zip(parts, cs)], axis=1)
                down = np.concatenate([np.asarray(m.parts["down"].read(), F32).reshape(m.parts["down"].shape[0], -1) * F32(np.sqrt(abs(c)))
                                       for (m, _, _, _), c in zip(parts, cs)], axis=0)
                u, s, vt = factor_svd(up, down)  # the whole spectrum of M (rank <= stacked)
                stacked, s_all = up.shape[1], s
                energy = float(np.sum(np.asarray(s, F64) ** 2))
            else:
                total = None
                for m, w, peft, _ in parts:
                    d = _dense(m, peft, w, shape)
                    total = d if total is None else total + d
                energy = float(sum(np.sum(np.square(blk, dtype=F64)) for blk in np.array_split(total, max(1, total.shape[0] // 256))))
                u, s, vt, full = svd_exact(total, min(rank, *total.shape), spectrum=method is not None)
                stacked, s_all = 0, (full if full is not None else s)
                del total
            k = min(dynamic_rank(s_all, method, param, rank), len(s))
            kept = float(np.sum(np.asarray(s[:k], F64) ** 2))
            rows.append(RankMergeModule(name, k, stacked, not factored, *_fractions(kept, energy)))
            ranks[k] = ranks.get(k, 0) + 1
            new_up = (u[:, :k] * s[:k]).astype(F32)
            new_down = np.ascontiguousarray(vt[:k]).astype(F32)
            if len(shape) == 4:
                down_shape, up_shape = (k, shape[1], shape[2], shape[3]), (shape[0], k, 1, 1)
            else:
                down_shape, up_shape = (k,) + tuple(shape[1:]), (shape[0], k)
            up_key, down_key = _keys(name, parts[0][0])
            plan += [LazyTensor(down_key, dt, down_shape, lambda a=new_down, sh=down_shape: a.reshape(sh).astype(dt.numpy)),
                     LazyTensor(up_key, dt, up_shape, lambda a=new_up, sh=up_shape: a.reshape(sh).astype(dt.numpy)),
                     LazyTensor(name + ".alpha", dt, (), lambda v=k: np.array(v, dtype=dt.numpy))]
        one = next(iter(ranks)) if len(ranks) == 1 else None
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(one) if one else "Dynamic",
                "ss_network_alpha": str(one) if one else "Dynamic",
                "sdtk.lora_merge": ", ".join(f"{os.path.basename(p)}:{w:g}" for p, w in inputs)
                + f" at rank {rank}" + (f" ({method} {param:g})" if method else "")}
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation"):
            if key in cats[0].metadata:
                meta[key] = cats[0].metadata[key]
        write_safetensors(dest, plan, meta, inputs=[p for p, _ in inputs], overwrite=overwrite)
        return MergeSummary(os.fspath(dest), len(names), ranks, list(inputs)), rows
    finally:
        for c in cats:
            c.close()


def _fractions(kept: float, energy: float) -> Tuple[float, float]:
    """(retained, error) Frobenius fractions from the kept and the total squared singular values."""
    if energy <= 0:
        return 1.0, 0.0
    return float(np.sqrt(min(1.0, kept / energy))), float(np.sqrt(max(0.0, energy - kept) / energy))


def _keys(name: str, m) -> Tuple[str, str]:
    """kohya suffixes for the output (`.lora_up.weight` / `.lora_down.weight`)."""
    return name + ".lora_up.weight", name + ".lora_down.weight"


def kohya_merge(inputs: Sequence[Tuple[str, float]], dest: str, overwrite: bool = False,
                out_dtype: Optional[str] = None) -> MergeSummary:
    """kohya merge_lora.py's merge of LoRAs (see the module docstring): not exact, on purpose."""
    cats = []
    try:
        adapters, dt, names = _open_inputs(inputs, cats, _refuse_for_concat, out_dtype)
        plan: List[LazyTensor] = []
        ranks: Dict[int, int] = {}
        for name in names:
            parts = [(a.modules[name], w, p) for a, w, p in adapters if name in a.modules]
            shapes = {(tuple(m.parts["down"].shape), tuple(m.parts["up"].shape)) for m, _, _ in parts}
            if len(shapes) > 1:
                raise SdtkError(parts[-1][2], f"module {name}: factor shapes {sorted(shapes)} differ between inputs; "
                                              f"kohya's merge sums factors tensor by tensor (equal ranks only); drop --kohya-ratios")
            alphas = [m.scalar("alpha") if m.scalar("alpha") is not None else float(m.parts["down"].shape[0]) for m, _, _ in parts]
            base_alpha = alphas[0]
            ks = [float(np.sqrt(a / base_alpha)) * w for a, (_, w, _) in zip(alphas, parts)]
            rank = parts[0][0].parts["down"].shape[0]
            ranks[rank] = ranks.get(rank, 0) + 1
            up_key, down_key = _keys(name, parts[0][0])

            def summed(role, parts=parts, ks=ks):
                total = None
                for (m, _, _), k in zip(parts, ks):
                    term = np.asarray(m.parts[role].read(), F32) * F32(abs(k) if role == "up" else k)
                    total = term if total is None else total + term
                return total.astype(dt.numpy)

            first = parts[0][0]
            plan += [LazyTensor(down_key, dt, tuple(first.parts["down"].shape), lambda f=summed: f("down")),
                     LazyTensor(up_key, dt, tuple(first.parts["up"].shape), lambda f=summed: f("up")),
                     LazyTensor(name + ".alpha", dt, (), lambda a=base_alpha: np.array(a, dtype=dt.numpy))]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": "Dynamic",
                "sdtk.lora_merge": ", ".join(f"{os.path.basename(p)}:{w:g}" for p, w in inputs) + " (kohya ratios: w|w|, cross terms)"}
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation"):
            if key in cats[0].metadata:
                meta[key] = cats[0].metadata[key]
        write_safetensors(dest, plan, meta, inputs=[p for p, _ in inputs], overwrite=overwrite)
        return MergeSummary(os.fspath(dest), len(names), ranks, list(inputs))
    finally:
        for c in cats:
            c.close()
