"""The merge plan: per-key decisions, then a write plan whose loaders compute each output tensor
from the inputs' lazy tensors, chunk by chunk, when the writer asks for it.

Nothing is computed up front. Merged tensors are computed in float32 (float64 if an input is
float64) over flat chunks of CHUNK elements and cast once into the output array, so the peak
memory is the output tensor plus a few chunks, whatever the model size. Intermediate steps of
a recipe are evaluated the same way (chunk by chunk, no intermediate file, no full intermediate
tensor), except for the few keys that need a whole tensor (inpainting first conv, TIES trim).
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk import fastcast
from sdtk.errors import SdtkError, UsageError
from sdtk.ops.merge import methods as M
from sdtk.ops.merge.arch import LATENT_CHANNELS, component_of, family_label, is_channel_extension
from sdtk.ops.merge.blocks import block_of, resolve_blocks
from sdtk.tensors import DType, FileSpan, LazyTensor, dtype as dtype_named, numel

CHUNK = 1 << 20  # elements per computed chunk (4 MiB of float32); chunks of one tensor run on `workers` threads


class FileSource:
    """An input model file (an open Catalogue) seen as a source of tensors."""

    def __init__(self, label: str, cat, family: Optional[str], title: Optional[str] = None):
        self.label = label
        self.cat = cat
        self.family = family
        self.title = title or family_label(family)
        self.entries: Dict[str, Tuple[Tuple[int, ...], DType]] = {k: (tuple(t.shape), t.dtype) for k, t in cat.tensors.items()}
        # a quantized input (GGUF, fp8-scaled, NF4): its weights read dequantized (f32) and count as
        # the dtype of its unquantized weights (bf16 mostly), which the output then takes
        self.quantized = getattr(cat, "dequantized", None) or {}
        if self.quantized:
            from sdtk.quant.views import output_dtype

            stored = output_dtype(cat)
            for k in self.quantized:
                self.entries[k] = (self.entries[k][0], stored)
        self._values: Tuple[Optional[str], Optional[np.ndarray]] = (None, None)
        self._lock = threading.Lock()

    def computed(self, key: str) -> bool:
        return False

    def prepare(self, key: str) -> None:
        pass

    def read_full(self, key: str) -> np.ndarray:
        return self.cat.tensors[key].read()

    def _flat(self, key: str) -> np.ndarray:
        """The values of `key`; a dequantized tensor is decoded once and kept while its chunks are
        read (the last one only), not once per chunk."""
        if key not in self.quantized:
            return self.cat.tensors[key].read().reshape(-1)
        with self._lock:
            if self._values[0] != key:
                self._values = (None, None)
                self._values = (key, np.asarray(self.cat.tensors[key].read()).reshape(-1))
            return self._values[1]

    def read_chunk(self, key: str, lo: int, hi: int, ctype) -> np.ndarray:
        return fastcast.astype(self._flat(key)[lo:hi], ctype)

    def span(self, key: str) -> Optional[FileSpan]:
        return self.cat.tensors[key].span


@dataclass
class Decision:
    """What a step does with one key."""

    action: str  # "merge", "slice" (merge [:, :4], keep the rest), "copy" (from input `source`)
    source: int = 0
    alpha: float = 0.0
    reason: str = ""


@dataclass
class StepReport:
    name: str
    method: str
    merged: int = 0
    sliced: List[str] = field(default_factory=list)
    copied: Dict[str, int] = field(default_factory=dict)  # reason -> count
    only_in_primary: List[str] = field(default_factory=list)
    not_in_primary: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "merged": self.merged, "sliced": self.sliced,
                "copied": dict(sorted(self.copied.items())), "only_in_primary": self.only_in_primary,
                "not_in_primary": self.not_in_primary}


# Top-level keys of LDM checkpoints that are schedule buffers or markers (copied, never merged).
# Source: ldm/models/diffusion/ddpm.py register_schedule (betas, alphas_cumprod, ...), and the
# v_pred / ztsnr empty marker tensors of v-prediction SDXL checkpoints.
def _protected_reason(key: str, shape, dt: DType) -> Optional[str]:
    if not dt.is_float:
        return "integer"
    if numel(shape) == 0:
        return "empty marker"
    comp = component_of(key)
    if comp == "ema":
        return "model_ema"
    if comp == "buffers":
        return "schedule buffer or marker"
    return None


class StepSource:
    """One merge step (method over 2-3 sources), seen as a source of tensors."""

    def __init__(self, name: str, method: str, inputs: Sequence, alpha: float, beta: Optional[float], seed: int,
                 blocks=None, te: str = "merge", vae: str = "merge", exclude: Optional[str] = None):
        meth = M.METHODS[method]
        if len(inputs) not in meth.inputs:
            want = " or ".join(str(n) for n in meth.inputs)
            raise UsageError(None, f"{method} takes {want} models, got {len(inputs)}")
        self.name, self.method, self.inputs = name, method, list(inputs)
        self.alpha, self.beta, self.seed = alpha, beta, seed
        self.label = name
        primary = self.inputs[0]
        self.family = primary.family
        self.title = primary.title
        self.entries = dict(primary.entries)
        self.report = StepReport(name, method)
        block_weights = resolve_blocks(blocks, self.family, alpha) if blocks is not None else None
        for block, weight in (block_weights or {}).items():
            M.check_scalars(method, weight, None, what=f"block {block} weight")
        exclude_re = re.compile(exclude) if exclude else None
        self.decisions: Dict[str, Decision] = {}
        for key, (shape, dt) in primary.entries.items():
            self.decisions[key] = self._decide(key, shape, dt, block_weights, exclude_re, te, vae)
        seen = set()
        for src in self.inputs[1:]:
            for key in src.entries:
                if key not in primary.entries and key not in seen:
                    seen.add(key)
                    self.report.not_in_primary.append(key)
        self._stats: Dict[str, tuple] = {}
        self._full_cache: Tuple[Optional[str], Optional[np.ndarray]] = (None, None)

    def _copy(self, reason: str, source: int = 0) -> Decision:
        self.report.copied[reason] = self.report.copied.get(reason, 0) + 1
        return Decision("copy", source=source, reason=reason)

    def _decide(self, key, shape, dt, block_weights, exclude_re, te, vae) -> Decision:
        reason = _protected_reason(key, shape, dt)
        if reason:
            return self._copy(reason)
        missing = [s.label for s in self.inputs[1:] if key not in s.entries]
        if missing:
            self.report.only_in_primary.append(key)
            return self._copy("only in primary")
        if exclude_re is not None and exclude_re.search(key):
            return self._copy("excluded")
        comp = component_of(key)
        choice = te if comp == "te" else vae if comp == "vae" else "merge"
        if choice in ("A", "B"):
            source = 0 if choice == "A" else 1
            if source and self.inputs[1].entries[key][0] != shape:
                return self._copy(f"{comp} from A (B's shape differs)")
            return self._copy(f"{comp} from {choice}", source)
        if any(not s.entries[key][1].is_float for s in self.inputs[1:]):
            return self._copy("not float in another input")
        alpha = self.alpha
        if block_weights is not None:
            alpha = block_weights[block_of(key, self.family)]
        others = [s.entries[key][0] for s in self.inputs[1:]]
        if all(o == shape for o in others):
            self.report.merged += 1
            return Decision("merge", alpha=alpha)
        if all(o == shape or is_channel_extension(key, shape, o) for o in others):
            self.report.sliced.append(key)
            return Decision("slice", alpha=alpha)
        raise SdtkError(self.inputs[1].label, f"tensor {key!r} has shape {list(others[0])}, {list(shape)} in {self.inputs[0].label}")

    # -- the source interface -------------------------------------------------------------
    def prepare(self, key: str) -> None:
        """Compute what needs a whole tensor (per-tensor scalars, sliced first conv) before the
        chunks of `key` are computed, possibly on several threads; forgets the previous key's."""
        for src in self.inputs:
            src.prepare(key)
        d = self.decisions[key]
        if d.action == "merge" and self.method in ("slerp", "cosine", "ties"):
            self._stats_for(key, d.alpha, self.compute_dtype(key))
        elif d.action == "slice" and self._full_cache[0] != key:
            self._full_cache = (key, self._sliced(key, d))

    def computed(self, key: str) -> bool:
        d = self.decisions[key]
        return d.action != "copy" or self.inputs[d.source].computed(key)

    def compute_dtype(self, key: str):
        wide = any(s.entries[key][1].name == "F64" for s in self.inputs if key in s.entries)
        return np.float64 if wide else np.float32

    def span(self, key: str) -> Optional[FileSpan]:
        d = self.decisions[key]
        return self.inputs[d.source].span(key) if d.action == "copy" else None

    def read_full(self, key: str) -> np.ndarray:
        d = self.decisions[key]
        if d.action == "copy":
            return self.inputs[d.source].read_full(key)
        shape = self.entries[key][0]
        if d.action == "slice":
            return self._sliced(key, d)
        ctype = self.compute_dtype(key)
        out = np.empty(numel(shape), dtype=ctype)
        for lo in range(0, out.size, CHUNK):
            hi = min(out.size, lo + CHUNK)
            out[lo:hi] = self.read_chunk(key, lo, hi, ctype)
        return out.reshape(shape)

    def fused_into(self, key: str, lo: int, hi: int, out: np.ndarray) -> bool:
        """The hot case in one C pass: a weighted sum of two fp16 files into fp16 (`out` gets values
        [lo, hi) of `key`, the same bits as `read_chunk` then the cast). False: not this case."""
        d = self.decisions[key]
        if d.action != "merge" or self.method != "weighted-sum" or len(self.inputs) != 2:
            return False
        if not all(isinstance(s, FileSource) and s.entries[key][1].name == "F16" and key not in s.quantized for s in self.inputs):
            return False
        a, b = (s.cat.tensors[key].read().reshape(-1)[lo:hi] for s in self.inputs)
        return fastcast.weighted_sum_f16(a, b, out, 1 - d.alpha, d.alpha) is not None

    def read_chunk(self, key: str, lo: int, hi: int, ctype) -> np.ndarray:
        d = self.decisions[key]
        if d.action == "copy":
            return self.inputs[d.source].read_chunk(key, lo, hi, ctype)
        if d.action == "slice":
            if self._full_cache[0] != key:
                self.prepare(key)
            return fastcast.astype(self._full_cache[1].reshape(-1)[lo:hi], ctype)
        arrays = [s.read_chunk(key, lo, hi, ctype) for s in self.inputs]  # fresh copies: ours to overwrite
        return self._apply(key, arrays, d.alpha, lo, ctype)

    # -- computing ------------------------------------------------------------------------
    def _apply(self, key: str, arrays, alpha: float, lo: int, ctype) -> np.ndarray:
        m = self.method
        if m in ("slerp", "cosine", "ties"):
            stats = self._stats_for(key, alpha, ctype)
            if m == "ties":
                return M.ties_apply(*arrays, alpha, stats)
            return M.combine(arrays[0], arrays[1], *stats)
        if m == "dare":
            keep = M.dare_keep_mask(self.seed, key, lo, arrays[0].size, self.beta)
            return M.dare(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, alpha, self.beta, keep)
        return M.elementwise(m, arrays, alpha, self.beta, owned=True)

    def _stats_for(self, key: str, alpha: float, ctype):
        """Per-tensor scalars that need a pass over the whole tensor (slerp/cosine: norms and
        dot product; ties: the trim thresholds). Computed once per key, chunk by chunk."""
        cached = self._stats.get(key)
        if cached is not None:
            return cached
        self._stats.clear()
        n = numel(self.entries[key][0])
        if self.method == "ties":
            thresholds = []
            for idx in (0, 1):
                mags = np.empty(n, dtype=ctype)
                for lo in range(0, n, CHUNK):
                    hi = min(n, lo + CHUNK)
                    mags[lo:hi] = np.abs(self.inputs[idx].read_chunk(key, lo, hi, ctype) - self.inputs[2].read_chunk(key, lo, hi, ctype))
                thresholds.append(M.top_k_threshold(mags, self.beta))
                del mags
            stats = tuple(thresholds)
        else:
            dot = na2 = nb2 = 0.0
            for lo in range(0, n, CHUNK):
                hi = min(n, lo + CHUNK)
                a = self.inputs[0].read_chunk(key, lo, hi, np.float64)
                b = self.inputs[1].read_chunk(key, lo, hi, np.float64)
                dot += float(np.dot(a, b))
                na2 += float(np.dot(a, a))
                nb2 += float(np.dot(b, b))
            if self.method == "slerp":
                stats = M.slerp_coefficients(dot, na2 ** 0.5, nb2 ** 0.5, alpha)
            else:
                stats = M.cosine_coefficients(dot, na2 ** 0.5, nb2 ** 0.5, alpha)
        self._stats[key] = stats
        return stats

    def _sliced(self, key: str, d: Decision) -> np.ndarray:
        """A1111's inpainting rule: merge the first conv's [:, 0:4], keep the primary's extra channels."""
        ctype = self.compute_dtype(key)
        full = [np.asarray(s.read_full(key), dtype=ctype) for s in self.inputs]
        out = full[0].copy()
        parts = [np.ascontiguousarray(x[:, :LATENT_CHANNELS]).reshape(-1) for x in full]
        view = _SliceView(self, parts)
        merged = view.apply(key, d.alpha, ctype)
        out[:, :LATENT_CHANNELS] = merged.reshape(out[:, :LATENT_CHANNELS].shape)
        return out


class _SliceView:
    """The [:, 0:4] slices of one key as a tiny step, so every method applies to them too."""

    def __init__(self, step: StepSource, parts: List[np.ndarray]):
        self.step, self.parts = step, parts

    def apply(self, key: str, alpha: float, ctype) -> np.ndarray:
        m = self.step.method
        a, b = self.parts[0], self.parts[1]
        c = self.parts[2] if len(self.parts) > 2 else None
        if m == "slerp":
            return M.slerp(a, b, alpha)
        if m == "cosine":
            return M.cosine(a, b, alpha)
        if m == "ties":
            return M.ties(a, b, c, alpha, self.step.beta)
        if m == "dare":
            keep = M.dare_keep_mask(self.step.seed, key, 0, a.size, self.step.beta)
            return M.dare(a, b, c, alpha, self.step.beta, keep)
        return M.elementwise(m, self.parts, alpha, self.step.beta)


# ---------------------------------------------------------------------------------------------
# The output plan


def output_dtype(stored: DType, requested: Optional[DType]) -> DType:
    """Float tensors take the requested dtype (default: the primary's); others keep theirs."""
    if requested is not None and stored.is_float:
        return requested
    return stored


def output_plan(final, requested: Optional[str] = None, bake_vae=None, workers: int = 1) -> List[LazyTensor]:
    """The write plan of the final step: one LazyTensor per key of the primary model, in its order.

    `bake_vae`: a FileSource whose tensors replace the VAE's (names mapped by `vae_key_map`)."""
    want = dtype_named(requested) if requested else None
    if want is not None and not want.is_float:
        raise UsageError(None, f"--dtype {requested}: the output dtype must be a float type (fp32, fp16, bf16, fp8-e4m3fn...)")
    baked = vae_key_map(final.entries, bake_vae) if bake_vae is not None else {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtk-merge") if workers > 1 else None
    plan = []
    for key, (shape, stored) in final.entries.items():
        out = output_dtype(stored, want)
        if key in baked:
            plan.append(_file_tensor(bake_vae, baked[key], key, out))
        else:
            plan.append(LazyTensor(key, out, tuple(shape), loader=_loader(final, key, out, pool),
                                   span=final.span(key) if (out == stored and not final.computed(key)) else None))
    return plan


def _loader(src, key: str, out: DType, pool: Optional[ThreadPoolExecutor]):
    def load() -> np.ndarray:
        shape = src.entries[key][0]
        if not src.computed(key):
            arr = src.read_full(key)
            return arr if arr.dtype == out.numpy else fastcast.astype(arr, out.numpy)
        src.prepare(key)
        ctype = src.compute_dtype(key) if hasattr(src, "compute_dtype") else np.float32
        n = numel(shape)
        result = np.empty(n, dtype=out.numpy)

        fused = getattr(src, "fused_into", None) if ctype is np.float32 else None

        def fill(lo: int) -> None:
            hi = min(n, lo + CHUNK)
            if fused is not None and fused(key, lo, hi, result[lo:hi]):
                return
            fastcast.assign(result[lo:hi], src.read_chunk(key, lo, hi, ctype))  # the one cast

        if pool is None or n <= CHUNK:
            for lo in range(0, n, CHUNK):
                fill(lo)
        else:
            for _ in pool.map(fill, range(0, n, CHUNK)):
                pass
        return result.reshape(shape)

    return load


def _file_tensor(src: FileSource, src_key: str, key: str, out: DType) -> LazyTensor:
    t = src.cat.tensors[src_key]

    def load() -> np.ndarray:
        arr = t.read()
        return arr if arr.dtype == out.numpy else fastcast.astype(arr, out.numpy)

    return LazyTensor(key, out, tuple(t.shape), loader=load, span=t.span if t.dtype == out else None)


def vae_key_map(entries: Dict[str, tuple], vae: FileSource) -> Dict[str, str]:
    """Output key -> key in the VAE file. A stand-alone VAE has `encoder.*`/`decoder.*` names;
    the checkpoint's VAE lives under `first_stage_model.` (or `vae.` in all-in-one FLUX files).
    Every VAE tensor must find its place with the same shape, or the bake is refused."""
    vae_keys = [k for k in entries if component_of(k) == "vae"]
    if not vae_keys:
        raise SdtkError(vae.label, "the merged model has no VAE to replace (--bake-vae)")
    prefix = vae_keys[0].split(".", 1)[0] + "."
    mapping = {}
    for k, (shape, dt) in vae.entries.items():
        if not dt.is_float:
            continue
        target = k if k.startswith(prefix) else prefix + k
        for p in ("first_stage_model.", "vae."):
            if k.startswith(p):
                target = prefix + k[len(p):]
        if target not in entries:
            if k.startswith("model_ema.") or k in ("model_ema.decay",):
                continue
            raise SdtkError(vae.label, f"VAE tensor {k!r} has no place in the model (expected {target!r}); not a VAE of this architecture")
        if tuple(entries[target][0]) != tuple(shape):
            raise SdtkError(vae.label, f"VAE tensor {k!r} is {list(shape)} but the model's is {list(entries[target][0])}")
        mapping[target] = k
    if len(mapping) < 0.9 * len(vae_keys):
        raise SdtkError(vae.label, f"covers only {len(mapping)} of the model's {len(vae_keys)} VAE tensors; not a VAE for this model")
    return mapping
