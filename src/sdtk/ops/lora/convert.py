"""`lora convert`: a LoRA renamed into another naming convention (kohya, diffusers, ComfyUI), with
FLUX's fused qkv / linear1 split or fused, so that applying the result gives the same weights.

Each module is resolved to its base target through the base's alias table
(architectures/lora_keys.py; the base is `--base` or the shipped layout of the architecture the
LoRA was made for) and named with the target convention's table (ops/lora/naming.py). Facts
(reference/lora.md):
- kohya and ComfyUI files keep a per-module `.alpha` (§1.1); diffusers / PEFT files have none
  (scale 1, §2.1). Going to diffusers, the scale s = alpha / rank is folded into the factors with
  kohya's split (sd-scripts networks/convert_flux_lora.py, §1.3): start with s on down and 1 on
  up; while 2 * down-factor < up-factor, double the down factor and halve the up factor. Going to
  kohya / ComfyUI the factors are copied byte for byte and alpha = s * rank (= rank for a
  diffusers file without header alpha). A header PEFT config (`lora_adapter_metadata`,
  SimpleTuner `*.lora_alpha`) is used for s and not carried over: the output's alphas say it.
- FLUX (§1.3): kohya / ComfyUI name BFL's fused `img_attn.qkv`, `txt_attn.qkv` and
  `single_blocks.N.linear1` (= [q; k; v; mlp]); diffusers splits them (to_q/to_k/to_v, add_*_proj,
  proj_mlp) as row slices whose sizes come from the base's shapes. Split: down copied to every
  part, up split by rows; unless up is block-diagonal with a rank divisible by the number of
  parts (what a fuse of independent parts writes), then both are chunked. Fuse: downs stacked
  (rank sum), up block-diagonal, alpha = the rank sum (each part's scale folded first); when all
  parts share one down (what a split writes) that down is kept and the ups stacked by rows, so
  kohya -> diffusers -> kohya keeps the rank. Parts a LoRA does not train are zero rows of the
  fused up.
- diffusers orders FLUX's final adaLN modulation (scale, shift), BFL (shift, scale): up's two row
  halves are swapped when one side's target has `swap_halves` and the other's not.
- kohya / ComfyUI hold every LyCORIS type under the same suffixes (renamed only); diffusers holds
  plain LoRA / LoCon only, and DoRA with a per-output-row magnitude (`dora_scale` ->
  `lora_magnitude_vector`, as diffusers' own kohya converter renames it; PEFT normalises W + s dW
  per output row, the same as an output-axis `dora_scale`); Tucker `lora_mid`, input-axis DoRA,
  LoHa / LoKr / ... are refused.
Output: atomically through the safetensors writer, input metadata kept (ss_*, modelspec), stale
hashes replaced by the output's own (sshs_model_hash when the input had one, modelspec.hash_sha256),
one `sdtk.lineage` step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdtk.adapters.matching import LoraInput, check_reports, plan_patches
from sdtk.adapters.reading import KIND_LABELS, Module, SUFFIX_ROLES, read_adapter
from sdtk.architectures.lora_keys import Target
from sdtk.errors import SdtkError, UsageError
from sdtk.ops.lora.naming import base_units
from sdtk.ops.lora.patch import module_scale
from sdtk.tensors import LazyTensor, dtype as dtype_named

F32 = np.float32
# --to values: sdtk's convention names (ops/lora/naming.py CONVENTIONS) and their aliases.
TARGETS = {"kohya": "kohya", "diffusers": "diffusers", "comfyui": "comfyui", "comfy": "comfyui"}
# Header keys of a PEFT config (diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY, SimpleTuner):
# folded into the output's alphas / factors, so not carried over.
PEFT_HEADER_KEYS = ("lora_adapter_metadata", "lora_alpha", "r", "transformer.lora_alpha", "transformer.r",
                    "unet.lora_alpha", "unet.r")
# Tensor suffixes written per role: kohya / LyCORIS spellings (kohya and ComfyUI files), diffusers / PEFT's.
KOHYA_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "weight": ".weight"}
for _suffix, _role in SUFFIX_ROLES:  # every other role under its first (LyCORIS) spelling
    KOHYA_SUFFIX.setdefault(_role, _suffix)
KOHYA_SUFFIX["magnitude"] = ".dora_scale"  # PEFT's lora_magnitude_vector (out,) -> kohya/LyCORIS (out, 1[, 1, 1])
DIFFUSERS_SUFFIX = {"down": ".lora_A.weight", "up": ".lora_B.weight",
                    # DoRA magnitude: diffusers _convert_non_diffusers_lora_to_diffusers (dora_scale -> lora_magnitude_vector)
                    "magnitude": ".lora_magnitude_vector.weight"}
# Kinds the diffusers / PEFT format can hold (peft tuners/lora: Linear and Conv2d LoRA).
DIFFUSERS_KINDS = ("lora", "locon")


@dataclass
class ConvertResult:
    output: str
    source: str
    to: str
    base: str  # the --base file or the shipped layout used
    modules_in: int
    modules_out: int
    renamed: int = 0
    split: int = 0  # fused source modules split into parts
    fused: int = 0  # fused output modules made from parts
    folded: int = 0  # modules whose alpha / rank went into the factors
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    bytes: int = 0

    def as_dict(self) -> dict:
        return {"output": self.output, "source": self.source, "to": self.to, "base": self.base,
                "modules_in": self.modules_in, "modules_out": self.modules_out, "renamed": self.renamed,
                "split": self.split, "fused": self.fused, "alpha_folded": self.folded, "bytes": self.bytes,
                "skipped": [{"module": m, "reason": r} for m, r in self.skipped]}


def scale_split(s: float) -> Tuple[float, float]:
    """kohya's split of a scale between down and up (convert_flux_lora.py): (down factor, up factor)."""
    down, up = float(s), 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def normalise_target(to: str) -> str:
    key = (to or "").strip().lower()
    if key not in TARGETS:
        raise UsageError(None, f"--to {to!r}: expected one of kohya, diffusers, comfyui (or comfy)")
    return TARGETS[key]


def _base_shapes(src: str, cat, base: Optional[str]):
    """({key: shape}, alias table or None, label) of `--base` or of the LoRA's own architecture's layout."""
    if base is not None:
        from sdtk.formats import open_model
        from sdtk.quant.views import dequantize_catalogue

        with open_model(base) as b:
            dequantize_catalogue(b)
            return {k: tuple(t.shape) for k, t in b.tensors.items()}, None, os.path.basename(base)
    from sdtk.identify.adapters import analyse_lora
    from sdtk.identify.lora_facts import BASE_LAYOUTS, _layout_table

    arch = analyse_lora(cat.tensors, "lora", cat.metadata).get("base_architecture")
    layout = BASE_LAYOUTS.get(arch or "")
    if layout is None:
        what = f"it looks made for {arch}, which has no shipped layout" if arch else "cannot tell which base it was made for"
        raise SdtkError(src, f"{what}; give the base model with --base CKPT")
    shapes, table = _layout_table(layout)
    return shapes, table, f"{layout} (shipped layout of {arch})"


def _key(t: Target) -> Tuple[str, Optional[Tuple[int, int]], bool]:
    return t.weight, t.rows, t.transpose


class _Out:
    """The output plan: tensors in order, each name written once."""

    def __init__(self, src: str):
        self.src = src
        self.plan: List[LazyTensor] = []
        self.names: Dict[str, str] = {}  # output module name -> source module

    def module(self, name: str, source: str) -> None:
        if name in self.names:
            raise SdtkError(self.src, f"modules {self.names[name]} and {source} both become {name}")
        self.names[name] = source

    def add(self, name: str, dt, shape, loader) -> None:
        self.plan.append(LazyTensor(name, dt, tuple(shape), loader))


def _f32(t: LazyTensor) -> np.ndarray:
    return np.asarray(t.read(), dtype=F32)


def _refuse_kind(src: str, m: Module, why: str) -> None:
    what = "DoRA" if m.dora else ("Tucker LoCon (lora_mid)" if "mid" in m.parts else KIND_LABELS.get(m.kind, m.kind))
    raise SdtkError(src, f"module {m.name} is {what}: {why}")


def _plain(src: str, m: Module, why: str, dora: bool = False) -> None:
    """Refuse anything but a plain LoRA / LoCon (with `dora`: output-axis DoRA allowed too)."""
    if m.kind not in DIFFUSERS_KINDS or "mid" in m.parts or (m.dora and not dora):
        _refuse_kind(src, m, why)
    if m.dora and "dora_scale" in m.parts:
        scale, out = m.parts["dora_scale"].shape, m.parts["up"].shape[0]
        if scale[0] != out or m.parts["dora_scale"].numel != out:
            raise SdtkError(src, f"module {m.name}: DoRA magnitude {list(scale)} is per input column (old LyCORIS); "
                                 f"PEFT's lora_magnitude_vector is per output row (convert to kohya or comfyui)")


def convert_lora(src: str, dest: str, to: str, *, base: Optional[str] = None, overwrite: bool = False,
                 allow_unmatched: bool = False) -> ConvertResult:
    """Write `src` renamed into convention `to` at `dest` (see the module docstring)."""
    from sdtk.fileio import check_output_path
    from sdtk.formats import open_model
    from sdtk.formats.data_hash import DataSectionHasher
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.ops.lineage import LINEAGE_KEY, Lineage, lineage_value, with_output_hash
    from sdtk.ops.lora.apply import lora_file_facts

    conv = normalise_target(to)
    for p in (src, base):
        if p is not None and not os.path.exists(p):
            raise SdtkError(p, "no such file")
    check_output_path(dest, [src] + ([base] if base else []), overwrite)
    with open_model(src) as cat:
        adapter = read_adapter(cat.tensors, cat.metadata)
        if not adapter.modules:
            raise SdtkError(src, "has no adapter modules (is it a LoRA?)")
        shapes, table, base_label = _base_shapes(src, cat, base)
        patches, reports = plan_patches(shapes, [(LoraInput(src), adapter)], table)
        try:
            check_reports(reports, base_label, allow_unmatched)
        except SdtkError as e:
            if base is None:  # the shipped layout is full size: a LoRA for a scaled or other model needs its base
                raise SdtkError(e.path, e.problem + "; give its base model with --base CKPT") from None
            raise
        result = ConvertResult(os.fspath(dest), src, conv, base_label, len(adapter.modules), 0,
                               skipped=list(reports[0].unmatched))
        matched: Dict[int, Tuple[Module, Target]] = {}
        for plist in patches.values():
            for p in plist:
                matched.setdefault(id(p.module), (p.module, p.target))
        order = {name: i for i, name in enumerate(adapter.modules)}
        pairs = sorted(matched.values(), key=lambda mt: order[mt[0].name])

        units = base_units(shapes, conv)
        by_key = {_key(u.target): u for u in units}
        row_units: Dict[Tuple[str, bool], list] = {}
        for u in units:
            if u.target.rows is not None:
                row_units.setdefault((u.target.weight, u.target.transpose), []).append(u)
        peft = adapter.peft_config
        out = _Out(src)
        fuse: Dict[Tuple[str, bool], List[Tuple[Module, Target]]] = {}
        for m, t in pairs:
            if conv == "diffusers":
                _plain(src, m, "the diffusers / PEFT format holds plain LoRA / LoCon (and output-axis DoRA) only "
                               "(convert to kohya or comfyui)", dora=_key(t) in by_key)
            u = by_key.get(_key(t))
            if u is not None:
                _rename(out, m, t, u.name, u.target, conv, peft, result)
            elif t.rows is None and (t.weight, t.transpose) in row_units:
                _plain(src, m, f"only a plain LoRA can be split into the {conv} parts of {t.weight}")
                _split(out, m, t, sorted(row_units[(t.weight, t.transpose)], key=lambda x: x.target.rows[0]), conv, peft, result)
            elif t.rows is not None and (t.weight, None, t.transpose) in by_key:
                _plain(src, m, f"only plain LoRAs can be fused into {t.weight} (the {conv} name of its parts)")
                fuse.setdefault((t.weight, t.transpose), []).append((m, t))
            else:
                why = f"no {conv} name for {t.weight}" + (f" rows {t.rows[0]}:{t.rows[0] + t.rows[1]}" if t.rows else "")
                if not allow_unmatched:
                    raise SdtkError(src, f"module {m.name}: {why}; --allow-unmatched leaves it out")
                result.skipped.append((m.name, why))
        for (w, tr), parts in fuse.items():
            u = by_key[(w, None, tr)]
            _fuse(out, parts, u.name, shapes[w], conv, peft, result)
        result.modules_out = len(out.names)

        meta = {k: v for k, v in cat.metadata.items() if k not in PEFT_HEADER_KEYS}
        meta = with_output_hash(meta, None)
        had_sshs = "sshs_model_hash" in cat.metadata
        facts = lora_file_facts(src)
        step = Lineage(os.path.basename(src), os.path.getsize(src),
                       [f"lora convert to {conv} (base {base_label}): {result.renamed} renamed, {result.split} split, "
                        f"{result.fused} fused, {result.folded} alpha folded, {len(result.skipped)} skipped"],
                       {"sha256": facts["sha256"], "autov3": facts["addnet"]})
        meta[LINEAGE_KEY] = lineage_value(cat.metadata.get(LINEAGE_KEY), step)
        meta["modelspec.hash_sha256"] = "0x" + "0" * 64
        if had_sshs:
            meta["sshs_model_hash"] = "0" * 64
        hasher = DataSectionHasher()

        def final_metadata():
            done = dict(meta)
            done["modelspec.hash_sha256"] = "0x" + hasher.hexdigest
            if had_sshs:
                done["sshs_model_hash"] = hasher.hexdigest
            return done

        result.bytes = write_safetensors(dest, out.plan, meta, inputs=[src] + ([base] if base else []), overwrite=overwrite,
                                         final_metadata=final_metadata, data_hasher=hasher)
    return result


def _swap_rows(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _alpha_tensor(out: _Out, name: str, value: float) -> None:
    out.add(name + ".alpha", dtype_named("fp32"), (), lambda v=value: np.array(v, dtype=F32))


def _rename(out: _Out, m: Module, t: Target, name: str, dest: Target, conv: str, peft, result: ConvertResult) -> None:
    out.module(name, m.name)
    result.renamed += 1
    swap = t.swap_halves != dest.swap_halves
    if swap and (m.kind not in DIFFUSERS_KINDS or m.dora):
        _refuse_kind(out.src, m, f"its rows would have to be swapped for {name} (only plain LoRAs can be)")
    if conv == "diffusers":
        s = module_scale(m, peft)
        sd, su = scale_split(s)
        if s != 1.0:
            result.folded += 1
        down, up = m.parts["down"], m.parts["up"]
        out.add(name + DIFFUSERS_SUFFIX["down"], down.dtype, down.shape,
                lambda d=down, f=sd: (_f32(d) * F32(f)).astype(d.dtype.numpy) if f != 1.0 else d.read())
        out.add(name + DIFFUSERS_SUFFIX["up"], up.dtype, up.shape,
                lambda u=up, f=su, sw=swap: _maybe_swap((_f32(u) * F32(f)).astype(u.dtype.numpy) if f != 1.0 else u.read(), sw))
        mag = m.parts.get("dora_scale", m.parts.get("magnitude"))
        if mag is not None:  # PEFT: (out,) for Linear, (1, out, 1, 1) for conv (reference §7.1)
            shape = (mag.numel,) if len(down.shape) == 2 else (1, mag.numel, 1, 1)
            out.add(name + DIFFUSERS_SUFFIX["magnitude"], mag.dtype, shape, lambda x=mag, sh=shape: np.asarray(x.read()).reshape(sh))
        return
    for role, tensor in m.parts.items():
        suffix = KOHYA_SUFFIX[role]
        if role == "magnitude":  # PEFT (out,) -> LyCORIS / kohya output-axis dora_scale (out, 1[, 1, 1])
            nd = len(m.parts["down"].shape) if "down" in m.parts else 2
            shape = (tensor.numel,) + (1,) * (nd - 1)
            out.add(name + suffix, tensor.dtype, shape, lambda x=tensor, s=shape: np.asarray(x.read()).reshape(s))
        elif role == "up" and swap:
            out.add(name + suffix, tensor.dtype, tensor.shape, lambda x=tensor: _swap_rows(np.asarray(x.read())))
        else:
            out.add(name + suffix, tensor.dtype, tensor.shape, tensor.read)
    if "alpha" not in m.parts and m.kind in ("lora", "locon", "loha") and m.rank:
        _alpha_tensor(out, name, module_scale(m, peft) * m.rank)


def _maybe_swap(a: np.ndarray, swap: bool) -> np.ndarray:
    return _swap_rows(np.asarray(a)) if swap else a


def _block_diagonal(up: np.ndarray, rows: List[Tuple[int, int]], offset: int) -> bool:
    """up (out, R) is zero outside the blocks (rows_i, i-th R/n columns)?"""
    n, r = len(rows), up.shape[1]
    if r % n:
        return False
    c = r // n
    for i, (off, length) in enumerate(rows):
        block = up[off - offset:off - offset + length]
        if np.any(block[:, :i * c]) or np.any(block[:, (i + 1) * c:]):
            return False
    return True


def _split(out: _Out, m: Module, t: Target, parts, conv: str, peft, result: ConvertResult) -> None:
    """A fused module (whole qkv / linear1) as its parts' modules (row slices of the same weight)."""
    result.split += 1
    down_t, up_t = m.parts["down"], m.parts["up"]
    s = module_scale(m, peft)
    rows = [u.target.rows for u in parts]
    offset = 0  # the fused module covers the whole weight
    cache: Dict[str, np.ndarray] = {}

    def factors():  # read once for all parts
        if not cache:
            up = _f32(up_t).reshape(up_t.shape[0], -1)
            cache["up"], cache["down"] = up, _f32(down_t)
        return cache

    # whether the parts are chunks of the rank (what a fuse writes) is known only from the values
    chunked = _block_diagonal(factors()["up"], rows, offset)
    n, rank = len(parts), down_t.shape[0]
    r_part = rank // n if chunked else rank
    if s != 1.0 and conv == "diffusers":
        result.folded += 1
    for i, u in enumerate(parts):
        off, length = u.target.rows
        out.module(u.name, m.name)
        cols = slice(i * r_part, (i + 1) * r_part) if chunked else slice(0, rank)
        keep_alpha = conv != "diffusers"
        sd, su = (1.0, 1.0) if keep_alpha else scale_split(s)

        def down_loader(cols=cols, sd=sd):
            return (factors()["down"][cols] * F32(sd)).astype(down_t.dtype.numpy)

        def up_loader(off=off, length=length, cols=cols, su=su):
            part = factors()["up"][off - offset:off - offset + length, cols] * F32(su)
            return part.reshape((length, cols.stop - cols.start) + tuple(up_t.shape[2:])).astype(up_t.dtype.numpy)

        suffix = DIFFUSERS_SUFFIX if conv == "diffusers" else KOHYA_SUFFIX
        out.add(u.name + suffix["down"], down_t.dtype, (r_part,) + tuple(down_t.shape[1:]), down_loader)
        out.add(u.name + suffix["up"], up_t.dtype, (length, r_part) + tuple(up_t.shape[2:]), up_loader)
        if keep_alpha:
            _alpha_tensor(out, u.name, s * r_part)


def _fuse(out: _Out, parts: List[Tuple[Module, Target]], name: str, wshape, conv: str, peft, result: ConvertResult) -> None:
    """Row-slice modules (to_q / to_k / to_v / proj_mlp) as one module of the fused weight: downs
    stacked, up block-diagonal (or, when the parts share one down, that down and the ups stacked),
    every part's scale folded in, alpha = the output rank (scale 1)."""
    parts = sorted(parts, key=lambda mt: mt[1].rows[0])
    for (a, ta), (b, tb) in zip(parts, parts[1:]):
        if ta.rows[0] + ta.rows[1] > tb.rows[0]:
            raise SdtkError(out.src, f"modules {a.name} and {b.name} overlap in {ta.weight}")
    out.module(name, ", ".join(m.name for m, _ in parts))
    result.fused += 1
    ranks = [m.parts["down"].shape[0] for m, _ in parts]
    total = sum(ranks)
    first = parts[0][0]
    down_dt, up_dt = first.parts["down"].dtype, first.parts["up"].dtype
    tail = tuple(first.parts["down"].shape[1:])
    for m, _ in parts:
        if tuple(m.parts["down"].shape[1:]) != tail:
            raise SdtkError(out.src, f"module {m.name}: input shape {list(m.parts['down'].shape[1:])} differs from {first.name}'s")
    scales = [scale_split(module_scale(m, peft)) for m, _ in parts]
    result.folded += sum(1 for m, _ in parts if module_scale(m, peft) != 1.0)
    # parts that share one down (what a split writes: kohya's down copied to q, k, v) fuse without
    # growing the rank: that down, the ups stacked by rows (read now: it decides the shapes)
    downs = [_f32(m.parts["down"]) * F32(sd) for (m, _), (sd, _) in zip(parts, scales)]
    shared = len(set(ranks)) == 1 and all(np.array_equal(downs[0], d) for d in downs[1:])
    first_down = downs[0] if shared else None
    del downs  # not kept while the plan waits to be written (read again by the loader)
    if shared:
        total = ranks[0]

    def down_loader():
        if shared:
            return first_down.astype(down_dt.numpy)
        return np.concatenate([_f32(m.parts["down"]) * F32(sd) for (m, _), (sd, _) in zip(parts, scales)], axis=0).astype(down_dt.numpy)

    def up_loader():
        up = np.zeros((wshape[0], total), dtype=F32)
        col = 0
        for (m, t), (_, su), r in zip(parts, scales, ranks):
            off, length = t.rows
            up[off:off + length, col:col + r] = _f32(m.parts["up"]).reshape(length, r) * F32(su)
            col += 0 if shared else r
        return up.astype(up_dt.numpy)

    suffix = DIFFUSERS_SUFFIX if conv == "diffusers" else KOHYA_SUFFIX
    out.add(name + suffix["down"], down_dt, (total,) + tail, down_loader)
    out.add(name + suffix["up"], up_dt, (wshape[0], total), up_loader)
    if conv != "diffusers":
        _alpha_tensor(out, name, float(total))  # scale 1: every part's scale is in its factors
