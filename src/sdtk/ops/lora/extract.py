"""`lora extract`: the difference between a fine-tuned model and its base, as a kohya LoRA.

Per module (naming.py: kohya's module set and names for the architecture): A = tuned - base in
float32 (a row third of OpenCLIP's fused in_proj for q/k/v), flattened to (out, in*kh*kw); its
top-k singular triplets (lowrank.py: randomized, or exact through the float64 Gram matrix);
kohya's formula (extract_lora_from_models.py, reference/lora.md §3.2): up = U diag(S), down = Vh,
optionally kohya's clamp of both to the 0.99 quantile of their entries (numpy: no 2^24 limit; off by
default: it costs accuracy, README), alpha = rank (scale 1).
Streaming: with a fixed rank the header is known before any SVD, so each module is computed when
the writer reaches it (memory: one module's difference and factors). A dynamic rank needs every
module's singular values first: the factors (the output itself) are kept until written.
Text encoders are included when they differ from the base by more than `min_diff` (kohya's
rule: the largest |difference| over the encoder's trained modules, default 0.01).
The reconstruction error of what is written (after clamp and cast): ||A - up down||_F / ||A||_F
per module, and over all modules.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sdtk import blas
from sdtk.version import __version__
from sdtk.errors import SdtkError, UsageError
from sdtk.fileio import check_output_path
from sdtk.formats import open_model
from sdtk.ops.lora import lowrank
from sdtk.ops.lora.naming import Unit, base_kind, base_units
from sdtk.ops.lora.resize import dynamic_rank
from sdtk.ops.prefetch import Prefetcher
from sdtk.tensors import LazyTensor, dtype as dtype_named

F32 = np.float32

# Architecture id (sdtk.identify, ModelSpec names) -> kohya metadata: (ss_base_model_version, ss_v2,
# ss_network_module, modelspec.implementation). Sources: sd-scripts library/train_util.py
# (get_model_version_str_for_sd1_sd2, "sdxl_base_v1-0", "flux1", "sd3"), library/sai_model_spec.py
# (determine_implementation: "diffusers" for SD1/2 LoRAs, SGM's and BFL's URLs), networks/lora_flux.py.
KOHYA_ARCH = {
    "stable-diffusion-v1": ("sd_v1", "False", "networks.lora", "diffusers"),
    "stable-diffusion-v2-512": ("sd_v2", "True", "networks.lora", "diffusers"),
    "stable-diffusion-v2-768-v": ("sd_v2_v", "True", "networks.lora", "diffusers"),
    "stable-diffusion-xl-v1-base": ("sdxl_base_v1-0", "False", "networks.lora", "https://github.com/Stability-AI/generative-models"),
    "flux-1-dev": ("flux1", "False", "networks.lora_flux", "https://github.com/black-forest-labs/flux"),
    "flux-1-schnell": ("flux1", "False", "networks.lora_flux", "https://github.com/black-forest-labs/flux"),
    "stable-diffusion-v3-medium": ("sd3", "False", "networks.lora_sd3", "https://github.com/Stability-AI/sd3.5"),
}
_FAMILY_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "flux": "flux-1-dev", "sd3": "stable-diffusion-v3-medium"}
COMPONENT_CHOICES = ("unet", "te", "te1", "te2", "te3")


@dataclass
class ExtractOptions:
    rank: int = 32
    conv_rank: Optional[int] = None  # None: 3x3 convs (ResNet / sampler layers) are not extracted (kohya)
    dynamic: Optional[Tuple[str, float]] = None  # ("sv_fro", 0.9) ...: kohya resize_lora conventions, --rank the cap
    components: Optional[Sequence[str]] = None  # None: the UNet/DiT, and text encoders that differ
    svd: str = "randomized"
    niter: int = 2
    clamp_quantile: float = 1.0  # kohya clamps at 0.99 (--clamp-quantile 0.99); it costs accuracy (README)
    min_diff: float = 0.01
    dtype: str = "fp16"
    seed: int = 0
    overwrite: bool = False


@dataclass
class ModuleStat:
    name: str
    key: str
    rank: int
    norm: float  # ||A||_F
    error: float  # ||A - up down||_F / ||A||_F of what is written (0 when A = 0)
    bound: Optional[float] = None  # the truncation's optimum sqrt(sum_{i>k} S_i^2) / ||A|| (exact SVD only)

    def as_dict(self) -> dict:
        d = {"module": self.name, "key": self.key, "rank": self.rank, "norm": self.norm, "error": self.error}
        if self.bound is not None:
            d["optimal_error"] = self.bound
        return d


@dataclass
class ExtractResult:
    output: str
    architecture: str
    modules: List[ModuleStat] = field(default_factory=list)
    text_encoders: Dict[str, Tuple[float, bool]] = field(default_factory=dict)  # comp -> (max |diff|, included)
    seconds: float = 0.0
    bytes: int = 0

    @property
    def total_error(self) -> float:
        num = sum((m.error * m.norm) ** 2 for m in self.modules)
        den = sum(m.norm ** 2 for m in self.modules)
        return float(np.sqrt(num / den)) if den else 0.0

    def as_dict(self) -> dict:
        return {"output": self.output, "architecture": self.architecture, "seconds": round(self.seconds, 3),
                "bytes": self.bytes, "total_error": self.total_error,
                "text_encoders": {c: {"max_diff": d, "included": inc} for c, (d, inc) in self.text_encoders.items()},
                "modules": [m.as_dict() for m in self.modules]}


def _read_rows(t: LazyTensor, unit: Unit) -> np.ndarray:
    a = t.read()
    if unit.target.rows is not None:
        off, n = unit.target.rows
        a = a[off:off + n]
    return np.asarray(a, dtype=F32)


def unit_diff(tuned: LazyTensor, base: LazyTensor, unit: Unit) -> np.ndarray:
    """tuned - base in float32, flattened to (out, in * kh * kw)."""
    a = _read_rows(tuned, unit)
    a = a - _read_rows(base, unit)
    return a.reshape(a.shape[0], -1)


def factorise(a: np.ndarray, rank: int, opts: ExtractOptions, dynamic_cap: Optional[int] = None):
    """(up (out, k), down (k, n) float32 after the clamp, k, optimal error or None) of a difference."""
    m, n = a.shape
    cap = min(rank if dynamic_cap is None else dynamic_cap, m, n)
    full = None
    if opts.svd == "exact":
        u, s, vt, full = lowrank.svd_exact(a, cap, spectrum=opts.dynamic is not None)
    else:
        u, s, vt = lowrank.svd_randomized(a, cap, niter=opts.niter, seed=opts.seed)
    k = cap
    if opts.dynamic is not None:
        spectrum = full if full is not None else s
        k = min(dynamic_rank(spectrum, opts.dynamic[0], opts.dynamic[1], cap), cap)
    u, s, vt = u[:, :k], s[:k], np.array(vt[:k])
    total = float(np.sum(a.astype(np.float64) ** 2))
    bound = None
    if opts.svd == "exact":  # the optimum of a rank-k approximation: sqrt(||A||^2 - sum_{i<=k} S_i^2) / ||A||
        bound = float(np.sqrt(max(total - float(np.sum(s.astype(np.float64) ** 2)), 0.0) / total)) if total > 0 else 0.0
    lowrank.fix_signs(u, vt)
    up = (u * s).astype(F32)
    down = vt.astype(F32)
    up, down = lowrank.kohya_clamp(up, down, opts.clamp_quantile)
    return up, down, k, bound


def residual_error(a: np.ndarray, up: np.ndarray, down: np.ndarray) -> Tuple[float, float]:
    """(||A||_F, ||A - up down||_F / ||A||_F), float64 sums."""
    norm = float(np.sqrt(np.sum(a.astype(np.float64) ** 2)))
    if norm == 0.0:
        return 0.0, 0.0
    r = a - up @ down
    return norm, float(np.sqrt(np.sum(r.astype(np.float64) ** 2))) / norm


def _select(units: Sequence[Unit], opts: ExtractOptions, comps: Sequence[str]) -> List[Unit]:
    out = []
    for u in units:
        comp = u.target.component
        if comp == "unet":
            if "unet" not in comps:
                continue
            if u.group == "attn" or (u.group == "conv" and opts.conv_rank):
                out.append(u)
        elif u.group == "te" and comp in comps:
            out.append(u)
    return out


def _module_rank(unit: Unit, shape, opts: ExtractOptions) -> int:
    conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    return int(opts.conv_rank if conv3 else opts.rank)


def _factor_shapes(shape, rows: Optional[Tuple[int, int]], k: int):
    out = rows[1] if rows else shape[0]
    if len(shape) == 4:
        return (k,) + tuple(shape[1:]), (out, k, 1, 1)
    return (k, int(np.prod(shape[1:]))), (out, k)


def _architecture(base_cat, shapes) -> str:
    try:
        from sdtk.identify import identify

        arch = identify(base_cat).architecture
        if arch in KOHYA_ARCH:
            return arch
    except Exception:  # identification only labels the metadata
        pass
    fam, _, sdxl = base_kind(shapes)
    if fam == "sd":
        if sdxl:
            return "stable-diffusion-xl-v1-base"
        width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        return "stable-diffusion-v2-512" if any(k.startswith("cond_stage_model.model.") for k in shapes) or width == 1024 \
            else "stable-diffusion-v1"
    return _FAMILY_ARCH.get(fam or "", "unknown")


def extract_metadata(arch: str, opts: ExtractOptions, rank_label: str, alpha_label: str, title: str,
                     tuned: str, base: str) -> Dict[str, str]:
    version, v2, module, impl = KOHYA_ARCH.get(arch, (None, "False", "networks.lora", None))
    meta = {"ss_network_module": module, "ss_network_dim": rank_label, "ss_network_alpha": alpha_label, "ss_v2": v2,
            "modelspec.sai_model_spec": "1.0.1", "modelspec.title": title,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "ss_training_comment": f"extracted by sdtk {__version__} from {os.path.basename(tuned)} - {os.path.basename(base)}",
            "sdtk.lora_extract": json.dumps({"tuned": os.path.basename(tuned), "base": os.path.basename(base),
                                             "rank": opts.rank, "conv_rank": opts.conv_rank, "svd": opts.svd,
                                             "niter": opts.niter if opts.svd == "randomized" else None,
                                             "dynamic": f"{opts.dynamic[0]}:{opts.dynamic[1]:g}" if opts.dynamic else None,
                                             "clamp_quantile": opts.clamp_quantile}, separators=(",", ":"))}
    if opts.conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(opts.conv_rank), "conv_alpha": str(opts.conv_rank)})
    if version:
        meta["ss_base_model_version"] = version
    if arch != "unknown":
        meta["modelspec.architecture"] = arch + "/lora"
    if impl:
        meta["modelspec.implementation"] = impl
    if arch == "stable-diffusion-v2-768-v":
        meta["modelspec.prediction_type"] = "v"
    return meta


def extract(tuned_path: str, base_path: str, dest: str, opts: ExtractOptions,
            on_module: Optional[Callable[[int, int, str], None]] = None) -> ExtractResult:
    """Write the LoRA of tuned - base to `dest` (atomically); nothing is written on any error."""
    from sdtk.formats.data_hash import DataSectionHasher
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.ops.merge.arch import describe

    t0 = time.monotonic()
    if opts.svd not in lowrank.METHODS:
        raise UsageError(None, f"--svd must be one of {', '.join(lowrank.METHODS)}")
    if opts.rank < 1 or (opts.conv_rank is not None and opts.conv_rank < 0):
        raise UsageError(None, "--rank must be at least 1 (and --conv-rank at least 0)")
    if not 0.0 < opts.clamp_quantile <= 1.0:
        raise UsageError(None, "--clamp-quantile must be in (0, 1] (1: no clamp)")
    for p in (tuned_path, base_path):
        if not os.path.exists(p):
            raise SdtkError(p, "no such file")
    if not str(dest).endswith(".safetensors"):
        raise UsageError(dest, "the output must be a .safetensors file")
    check_output_path(dest, [tuned_path, base_path], opts.overwrite)
    out_dt = dtype_named(opts.dtype)
    if not out_dt.is_float:
        raise UsageError(None, f"--dtype {opts.dtype}: a LoRA's factors must be a float type")
    with open_model(base_path) as base, open_model(tuned_path) as tuned:
        shapes = {k: tuple(t.shape) for k, t in base.tensors.items()}
        fam_b, title_b = describe(base)
        fam_t, title_t = describe(tuned)
        if fam_b and fam_t and fam_b != fam_t:
            raise SdtkError(tuned_path, f"is {title_t} but the base {os.path.basename(base_path)} is {title_b}: "
                                        "a LoRA can only be extracted between two models of one architecture")
        units = base_units(shapes, "kohya")
        if not any(u.target.component == "unet" for u in units):
            raise SdtkError(base_path, "has no UNet/DiT sdtk can name LoRA modules for (a checkpoint or a stand-alone UNet/DiT is needed)")
        te_comps = sorted({u.target.component for u in units if u.target.component != "unet" and u.group == "te"})
        comps = _components(opts.components, te_comps)
        chosen = _select(units, opts, comps + te_comps if opts.components is None else comps)
        for u in chosen:
            t = tuned.tensors.get(u.target.weight)
            if t is None:
                raise SdtkError(tuned_path, f"has no tensor {u.target.weight} (the base has it): not a fine-tune of this base")
            if tuple(t.shape) != shapes[u.target.weight]:
                raise SdtkError(tuned_path, f"tensor {u.target.weight} is {list(t.shape)} but {list(shapes[u.target.weight])} "
                                            f"in {os.path.basename(base_path)}: not a fine-tune of this base")
            if not t.dtype.is_float:
                raise SdtkError(tuned_path, f"tensor {u.target.weight} is {t.dtype.short}, not a float weight")
        result = ExtractResult(os.fspath(dest), _architecture(base, shapes))
        # text encoders: kohya's rule (the largest |difference| over the encoder's trained modules)
        if opts.components is None:
            keep = []
            for comp in te_comps:
                keys = sorted({u.target.weight for u in chosen if u.target.component == comp})
                biggest = 0.0
                for k in keys:
                    a = np.asarray(tuned.tensors[k].read(), F32) - np.asarray(base.tensors[k].read(), F32)
                    biggest = max(biggest, float(np.max(np.abs(a))) if a.size else 0.0)
                result.text_encoders[comp] = (biggest, biggest > opts.min_diff)
                if biggest > opts.min_diff:
                    keep.append(comp)
            chosen = [u for u in chosen if u.target.component == "unet" or u.target.component in keep]
        if not chosen:
            raise UsageError(None, "no module selected (see --components)")
        chosen.sort(key=lambda u: u.name)  # the order safetensors.torch.save writes (one dtype: by name)
        stats: Dict[str, ModuleStat] = {}

        def compute(u: Unit, cap: Optional[int] = None):
            a = unit_diff(tuned.tensors[u.target.weight], base.tensors[u.target.weight], u)
            if not np.isfinite(a).all():
                raise SdtkError(tuned_path, f"tensor {u.target.weight} (or the base's) holds NaN or inf values")
            shape = shapes[u.target.weight]
            rank = _module_rank(u, shape, opts) if cap is None else cap
            up, down, k, bound = factorise(a, rank, opts, dynamic_cap=cap)
            up_c = up.astype(out_dt.numpy)
            down_c = down.astype(out_dt.numpy)
            if not (np.isfinite(up_c).all() and np.isfinite(down_c).all()):
                raise SdtkError(None, f"module {u.name}: the factors do not fit {out_dt.short} (inf); use --dtype fp32 or bf16")
            norm, err = residual_error(a, up_c.astype(F32), down_c.astype(F32))
            stats[u.name] = ModuleStat(u.name, u.target.weight, k, norm, err, bound)
            if on_module is not None:
                on_module(len(stats), len(chosen), u.name)
            d_shape, u_shape = _factor_shapes(shape, u.target.rows, k)
            return up_c.reshape(u_shape), down_c.reshape(d_shape), k

        plan: List[LazyTensor] = []
        if opts.dynamic is None:
            # one SVD gives a module's up and down: the first of the two loads computes it (under the
            # module's lock: the prefetch workers may ask for both at once), the second takes it away
            cache: Dict[str, list] = {}
            locks = {u.name: threading.Lock() for u in chosen}

            def part(u: Unit, which: int):
                def load():
                    with locks[u.name]:
                        if u.name not in cache:
                            cache[u.name] = [*compute(u)[:2], 2]
                        got = cache[u.name]
                        got[2] -= 1
                        if got[2] == 0:
                            cache.pop(u.name)
                        return got[which]
                return load

            for u in chosen:
                shape = shapes[u.target.weight]
                out_rows = u.target.rows[1] if u.target.rows else shape[0]
                k = min(_module_rank(u, shape, opts), out_rows, int(np.prod(shape[1:])))
                d_shape, u_shape = _factor_shapes(shape, u.target.rows, k)
                plan += [LazyTensor(u.name + ".alpha", out_dt, (), lambda k=k: np.array(k, dtype=out_dt.numpy)),
                         LazyTensor(u.name + ".lora_down.weight", out_dt, d_shape, part(u, 1)),
                         LazyTensor(u.name + ".lora_up.weight", out_dt, u_shape, part(u, 0))]
            ranks = {opts.rank} | ({opts.conv_rank} if opts.conv_rank else set())
            rank_label = str(opts.rank)
        else:
            with blas.limited(1):
                factored = _in_parallel(lambda u: compute(u, cap=_module_rank(u, shapes[u.target.weight], opts)), chosen)
            for u, (up, down, k) in zip(chosen, factored):
                plan += [LazyTensor(u.name + ".alpha", out_dt, (), lambda k=k: np.array(k, dtype=out_dt.numpy)),
                         LazyTensor(u.name + ".lora_down.weight", out_dt, down.shape, lambda a=down: a),
                         LazyTensor(u.name + ".lora_up.weight", out_dt, up.shape, lambda a=up: a)]
            ranks = {s.rank for s in stats.values()}
            rank_label = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        title = os.path.basename(str(dest)).rsplit(".", 1)[0]
        meta = extract_metadata(result.architecture, opts, rank_label, rank_label, title, tuned_path, base_path)
        meta["sshs_model_hash"] = "0" * 64
        meta["modelspec.hash_sha256"] = "0x" + "0" * 64
        hasher = DataSectionHasher()

        def final_metadata():
            done = dict(meta)
            done["sshs_model_hash"] = hasher.hexdigest
            done["modelspec.hash_sha256"] = "0x" + hasher.hexdigest
            return done

        # two modules are factorised at once, one per core, each on one BLAS thread: the products are
        # thin (rank 32-128) and OpenBLAS's own threads mostly spin on them (sdtk.blas; measured: a
        # scaled SDXL extract took 127 s on OpenBLAS's threads beside another busy process, 12.5 s on one)
        with blas.limited(1):
            ahead = Prefetcher(plan, depth=4, workers=compute_workers())
            try:
                result.bytes = write_safetensors(dest, ahead.plan, meta, inputs=[tuned_path, base_path], overwrite=opts.overwrite,
                                                 final_metadata=final_metadata, data_hasher=hasher)
            finally:
                ahead.close()
        result.modules = [stats[u.name] for u in chosen if u.name in stats]
        result.seconds = time.monotonic() - t0
        return result


def compute_workers() -> int:
    """Modules factorised at once: the cores this process may use, at most 2 (memory: each holds a
    float32 difference and its factors, up to ~100 MB for SDXL's largest modules)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, n))


def _in_parallel(fn, items):
    """[fn(x) for x in items] on compute_workers() threads, in order (the first error is raised)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=compute_workers(), thread_name_prefix="sdtk-extract") as pool:
        return list(pool.map(fn, items))


def _components(given: Optional[Sequence[str]], te_comps: Sequence[str]) -> List[str]:
    if given is None:
        return ["unet"]
    out: List[str] = []
    for c in given:
        if c not in COMPONENT_CHOICES:
            raise UsageError(None, f"--components: {c!r} is not one of {', '.join(COMPONENT_CHOICES)}")
        if c == "te":
            out += list(te_comps)
        else:
            out.append(c)
    return out
