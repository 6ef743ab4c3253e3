"""catalogue -> Identity: what a model file is, what is inside, what is wrong, what to do.

Header-only by default: names, shapes and dtypes, plus the few tiny tensors whose values matter
(CLIP position_ids, LoRA alphas). `deep=True` also reads every tensor (inf/NaN scan, SD2
prediction heuristic)."""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, Mapping, Optional

from sdtk.architectures import ARCHITECTURES, component_prefixes
from sdtk.formats import Catalogue, open_model
from sdtk.identify import adapters, checks
from sdtk.identify.advice import choose_advice
from sdtk.identify.components import split_components
from sdtk.identify.config_yaml import ConfigBeside, config_path_for, parse_config, read_config_beside
from sdtk.identify.detect import (ADAPTER_KINDS, BARE, PREFIXED_DIFFUSION, AdjacentMatch, DiffusionMatch, component_model,
                                  match_adjacent, match_diffusion, strip)
from sdtk.identify.diffusers_folder import identify_diffusers_folder
from sdtk.identify.metadata import summarise_metadata
from sdtk.identify.model import Component, Identity, Problem
from sdtk.identify.scaled import match_scaled_layout
from sdtk.quant import nf4
from sdtk.identify.prediction import predict

ADAPTER_FILE_KINDS = ("lora", "embedding", "hypernetwork")
NOT_WEIGHTS = ("ddpm_buffers", "markers", "model_sampling")
SAFETY = {
    "safetensors": {"verdict": "safe", "reason": "safetensors holds only tensors and text; it cannot run code"},
    "torch-zip": {"verdict": "read-safely", "reason": "pickle read by sdtk's restricted reader (allowlisted tensor types only, nothing executed)"},
    "torch-legacy": {"verdict": "read-safely", "reason": "pickle read by sdtk's restricted reader (allowlisted tensor types only, nothing executed)"},
    "pickle": {"verdict": "read-safely", "reason": "pickle read by sdtk's restricted reader (allowlisted tensor types only, nothing executed)"},
    "gguf": {"verdict": "safe", "reason": "GGUF holds only tensors and metadata; it cannot run code"},
}


def identify(cat: Catalogue, *, deep: bool = False, config: Optional[ConfigBeside] = None,
             config_text: Optional[str] = None, has_config: Optional[bool] = None,
             vae_ref: Optional[str] = None, deep_prediction: bool = False) -> Identity:
    """Identify an opened catalogue. `config`: the `<model>.yaml` beside the file, read by
    `config_yaml.read_config_beside` (identify_path, convert and the library fill it in; None: not
    looked for); `config_text`/`has_config`: the same given as text. `vae_ref`: a VAE file to
    compare the baked-in VAE with. `deep_prediction`: the value check of the prediction type
    (part of `deep`) without the rest of it."""
    if config is None and has_config is not None:
        path = config_path_for(cat.path)
        config = (parse_config(path, config_text) if config_text is not None
                  else ConfigBeside(path, bool(has_config), error="cannot be read" if has_config else None))
    tensors = cat.tensors
    bnb4 = cat.format != "gguf" and nf4.detect(tensors)
    if bnb4:  # bitsandbytes 4-bit (Forge NF4): the weights with their real shapes; quant-state keys are no model keys
        tensors, _ = nf4.dequantized_view(cat.path, tensors)
    shapes = {k: t.shape for k, t in tensors.items()}
    ident = Identity(path=cat.path, format=cat.format, file_size=cat.file_size, kind="unknown", architecture="unknown")
    ident.deep = deep
    ident.tensor_count = len(cat.tensors)
    ident.parameters = sum(t.numel for t in tensors.values())
    ident.tensor_bytes = sum(t.nbytes for t in cat.tensors.values())
    ident.dtypes = dict(Counter(t.dtype.short for t in cat.tensors.values()))
    ident.metadata = summarise_metadata(cat.metadata)
    ident.safety = dict(SAFETY.get(cat.format, {"verdict": "unknown", "reason": cat.format}))
    ident.notes = list(cat.notes)

    table: Dict[str, list] = {}
    diffusion = match_diffusion(shapes, PREFIXED_DIFFUSION)
    adjacent = None
    if diffusion is None:
        adjacent = match_adjacent(shapes, ADAPTER_KINDS)
        if adjacent is None:
            diffusion = match_diffusion(shapes, (BARE,))
            if diffusion is None:
                adjacent = match_adjacent(shapes, ("vae", "text-encoder"))
                if adjacent is not None and not _covers_file(adjacent.prefix, shapes):
                    adjacent = None  # a VAE inside an unidentified model is not a VAE file
    # a scaled-down copy of a known layout (test/toy files): shapes may fit a family by chance
    said = diffusion.variant.architecture if diffusion else (adjacent.row.architecture or "?") if adjacent else None
    scaled = match_scaled_layout(shapes, said)
    if scaled is not None:  # its shapes are not the real ones: the layout it copies names it
        diffusion, adjacent = _scaled_match(scaled[1])

    if diffusion is not None:
        table = _identify_diffusion(ident, diffusion, tensors, shapes)
    elif adjacent is not None:
        _identify_adjacent(ident, adjacent, tensors, shapes, cat)
    else:
        _identify_unknown(ident, tensors)

    ident.precision = precision_of(ident.components, tensors)
    if cat.format == "gguf":
        _describe_gguf(ident, cat)
    elif bnb4:
        from sdtk.identify.quantized import describe_bnb4, quant_precision

        ident.quantization = describe_bnb4(cat.tensors, ident.components)
        ident.precision = quant_precision(ident.quantization)
        for name, comp in ident.components.items():  # sizes and types as stored
            stored = ident.quantization["components"].get(name)
            if stored is not None:
                comp.bytes, comp.dtypes = stored["bytes"], dict(stored["types"])
    if scaled is not None:
        ident.problems.append(Problem("scaled_copy", "warning", "problem.scaled_copy",
                                      {"layout": scaled[0], "scale": scaled[2], "title": ident.title}))
    if ident.kind in ("checkpoint", "diffusion-model"):
        unet_tensors = strip_tensors(tensors, ident.components.get("unet"))
        pred = predict(set(shapes), cat.metadata, cat.extras, ident.architecture, ident.family,
                       unet_tensors, config, deep or deep_prediction)
        ident.prediction_type, ident.prediction_confidence = pred.type, pred.confidence
        ident.prediction_source, ident.zero_terminal_snr = pred.source, pred.zero_terminal_snr
        ident.prediction_evidence = [e.as_dict() for e in pred.evidence]
        if pred.detail:
            ident.notes.append(f"prediction: {pred.detail}")
        _refine_by_prediction(ident)
        checks.check_config_beside(ident, config)
        programs = checks.check_programs_agree_sd2(ident, pred.evidence, unet_tensors, config)
        checks.check_prediction_conflicts(ident, pred.conflicts, config, programs)
        checks.check_components(ident, _expected_components(ident))
        checks.check_known_keys(ident, table)
        checks.check_old_clip_keys(ident, tensors)
        checks.check_sd2_config(ident, config)
        checks.check_sdxl_vae_fp16(ident)
    elif ident.kind in ("vae", "text-encoder"):
        first = next(iter(ident.components.values()))
        checks.check_known_keys(ident, {first.name: [first.prefix]})
    if ident.kind in ("checkpoint", "text-encoder"):
        checks.check_position_ids(ident, tensors)
    checks.check_leftovers(ident, cat.extras)
    checks.check_modelspec(ident, cat.metadata)
    checks.check_unidentified(ident)
    if deep:
        checks.check_non_finite(ident, tensors)
    if vae_ref is not None:
        from sdtk.identify.vae_compare import compare_vae

        ident.vae_comparison = compare_vae(tensors, ident.components.get("vae"), vae_ref)
    choose_advice(ident)
    return ident


def identify_path(path: "os.PathLike[str] | str", *, deep: bool = False, vae_ref: Optional[str] = None,
                  hashes: bool = True, adapter_scan: bool = True) -> Identity:
    """Open a model file (or a diffusers folder) and identify it. Raises SdtkError when unreadable.
    An adapter file (LoRA, embedding, hypernetwork) is also read whole (`adapter_scan`, default;
    adapters are small): hashed as A1111 and Civitai show it (`hashes`) and scanned for NaN / inf."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model_index.json")):
        return identify_diffusers_folder(path, identify_path, deep=deep)
    config = read_config_beside(path)
    with open_model(path) as cat:
        ident = identify(cat, deep=deep, config=config, vae_ref=vae_ref)
        if adapter_scan and ident.kind in ADAPTER_FILE_KINDS:  # a local adapter: its hashes and a NaN / inf scan (small files)
            from sdtk.identify.adapter_file import check_adapter_file

            check_adapter_file(ident, cat, hashes=hashes)
        return ident


# ---------------------------------------------------------------------------------------------


def _covers_file(prefix: str, shapes, share: float = 0.95) -> bool:
    inside = sum(1 for k in shapes if k.startswith(prefix))
    return inside >= share * len(shapes)


def _scaled_match(arch_id: str):
    """The table rows of a layout's architecture, for a scaled-down copy of that layout."""
    from sdtk.architectures import ADJACENT, FAMILIES, VARIANTS

    for var in VARIANTS:
        if var.architecture == arch_id:
            fam = next(f for f in FAMILIES if f.name == var.family and f.implementation == "ldm")
            return DiffusionMatch(fam, var, "model.diffusion_model.", None), None
    row = next(r for r in ADJACENT if r.architecture == arch_id)
    return None, AdjacentMatch(row, "")


def _identify_diffusion(ident: Identity, m, tensors, shapes) -> Dict[str, list]:
    ident.family = m.family.name
    ident.implementation = m.family.implementation
    ident.architecture = m.variant.architecture
    ident.variant = m.variant.variant
    if "flux_depth_or_canny" in m.variant.notes:
        ident.notes.append("FLUX.1 Depth and Canny [dev] have the same shapes; the file cannot tell which")
    if ident.family == "sdxl" and "edm_mean" in shapes and ident.architecture == "stable-diffusion-xl-v1-base":
        ident.architecture, ident.variant = "playground-v2.5", "edm"  # Playground v2.5: SDXL + EDM markers
    table = component_prefixes(ident.family)
    table["unet"] = [m.prefix] if m.prefix else []
    ident.components = split_components(tensors, table, bare_component="unet" if not m.prefix else "other")
    for name, comp in ident.components.items():
        if name.startswith("text_encoder"):
            comp.model = component_model(strip(shapes, comp.prefix), "text-encoder") or component_model(
                {k[len(comp.prefix):]: shapes[k] for k in comp.keys}, "text-encoder")
        elif name == "vae":
            comp.model = component_model(strip(shapes, comp.prefix), "vae")
        elif name == "unet":
            comp.model = m.family.network
    ema = ident.components.get("unet_ema")
    ident.has_ema = ema is not None and len(ema.keys) > 100  # architectures reference: EMA = >100 model_ema.* keys
    weights = [n for n in ident.components if n not in NOT_WEIGHTS + ("unet", "unet_ema", "leftovers", "other")]
    ident.kind = "checkpoint" if any(n in ("vae",) or n.startswith("text_encoder") for n in weights) else "diffusion-model"
    arch = ARCHITECTURES.get(ident.architecture)
    ident.title = arch.title if arch else ident.architecture
    return table


def _refine_by_prediction(ident: Identity) -> None:
    """SD 2.x 512 and 768-v have the same shapes: name them by their prediction type when known."""
    if ident.architecture == "stable-diffusion-v2" and ident.prediction_type in ("v", "epsilon"):
        ident.architecture = "stable-diffusion-v2-768-v" if ident.prediction_type == "v" else "stable-diffusion-v2-512"
        ident.title = ARCHITECTURES[ident.architecture].title
    if ident.prediction_type == "v" and ident.family in ("sd1", "sdxl") and ident.variant is None:
        ident.variant = "v-prediction"


def _expected_components(ident: Identity):
    arch = ARCHITECTURES.get(ident.architecture)
    return list(arch.full_components) if arch else ["unet"]


def _identify_adjacent(ident: Identity, m, tensors, shapes, cat: Catalogue) -> None:
    row = m.row
    ident.kind = row.kind
    ident.implementation = row.subtype
    view = strip(shapes, m.prefix)
    comp_name = {"vae": "vae", "text-encoder": "text_encoder"}.get(row.kind, row.kind.replace("-", "_"))
    comp = Component(name=comp_name, prefix=m.prefix)
    for k, t in tensors.items():
        if k.startswith(m.prefix):
            comp.keys.append(k)
            comp.parameters += t.numel
            comp.bytes += t.nbytes
            comp.dtypes[t.dtype.short] = comp.dtypes.get(t.dtype.short, 0) + 1
    comp.model = row.architecture
    ident.components = {comp_name: comp}
    rest = [k for k in tensors if not k.startswith(m.prefix)]
    if rest:
        other = Component(name="other", prefix="")
        for k in rest:
            t = tensors[k]
            other.keys.append(k)
            other.parameters += t.numel
            other.bytes += t.nbytes
            other.dtypes[t.dtype.short] = other.dtypes.get(t.dtype.short, 0) + 1
        ident.components["other"] = other
    base = None
    if row.kind == "lora":
        tensors = _scalars_read_once(tensors)  # alphas are read by both analyses (one range request each when remote)
        ident.adapter = adapters.analyse_lora(tensors, row.subtype, cat.metadata)
        _describe_lora(ident, tensors, cat.metadata)
        base, suffix = ident.adapter["base_architecture"], "lora"
    elif row.kind == "embedding":
        # name / step / token: pickle fields (A1111 .pt) or the text metadata sdtk embedding convert writes
        fields = {k: v for k, v in cat.metadata.items() if k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "token")}
        ident.adapter = adapters.analyse_embedding(tensors, row.subtype, {**fields, **cat.extras})
        for code, severity, details in adapters.embedding_problems(ident.adapter):
            ident.problems.append(Problem(code, severity, f"problem.{code}", details))
        base, suffix = ident.adapter["base_architecture"], "textual-inversion"
    elif row.kind == "hypernetwork":
        ident.adapter = adapters.analyse_hypernetwork(tensors, cat.extras)
        base, suffix = ident.adapter["base_architecture"], "hypernetwork"
    elif row.kind in ("controlnet", "t2i-adapter"):
        ident.adapter = adapters.analyse_controlnet(view, row.subtype)
        base, suffix = ident.adapter["base_architecture"], row.kind
    if row.kind in ("vae", "text-encoder"):
        ident.architecture = row.architecture or "unknown"
        ident.title = row.architecture
    else:
        ident.architecture = f"{base or 'unknown'}/{suffix}"
        ident.family = ARCHITECTURES[base].family if base in ARCHITECTURES else None
        ident.title = row.kind


def _scalars_read_once(tensors):
    """`tensors` with every one-element tensor's loader cached (the other tensors as they are)."""
    import dataclasses
    from functools import lru_cache

    out = dict(tensors)
    for key, t in tensors.items():
        if t.numel == 1:
            out[key] = dataclasses.replace(t, loader=lru_cache(maxsize=1)(t.loader))
    return out


def _describe_lora(ident: Identity, tensors, metadata) -> None:
    """The deeper LoRA facts (identify/lora_facts.py) merged into ident.adapter, their problems
    added; the base is the shapes' verdict when metadata disagrees."""
    from sdtk.identify import lora_facts

    try:
        found = lora_facts.describe_lora(tensors, metadata)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:  # odd shapes in a hostile file: the basic analysis stands
        ident.notes.append(f"LoRA details not available: {type(e).__name__}: {e}")
        return
    facts = found["facts"]
    ident.adapter.update(facts)
    verdict = facts["base"]
    # the deep verdict decides when it conflicts, when the quick look found nothing, or when it has
    # shapes against the quick look's key-name guess (diffusers-named SD3 vs FLUX joint blocks)
    guessed_by_names = ident.adapter.get("base_source") == "key names" and verdict["confidence"] == "high"
    if verdict["architecture"] and (verdict["conflict"] or not ident.adapter.get("base_architecture") or guessed_by_names):
        ident.adapter["base_architecture"] = verdict["architecture"]
        ident.adapter["base_source"] = next((e["source"] for e in verdict["evidence"] if e["architecture"] == verdict["architecture"]), None)
    ident.adapter["base_confidence"] = verdict["confidence"]
    for code, severity, details in found["problems"]:
        ident.problems.append(Problem(code, severity, f"problem.{code}", details))
    try:
        fit = lora_facts.check_against_base(found["adapter"], ident.adapter.get("base_architecture"))
    except (ValueError, KeyError, IndexError, TypeError) as e:
        ident.notes.append(f"LoRA keys not checked against the base layout: {type(e).__name__}: {e}")
        fit = None
    if fit is not None:
        ident.adapter["claimed_base_fit"] = fit
        if fit["unmatched"]:
            ident.problems.append(Problem("lora_unmatched_in_base", "warning", "problem.lora_unmatched_in_base",
                                          {**fit, "base": ident.adapter.get("base_architecture")}))


def _identify_unknown(ident: Identity, tensors) -> None:
    groups: Dict[str, Dict] = {}
    for k, t in tensors.items():
        parts = k.split(".")
        head = ".".join(parts[:2]) + "." if len(parts) > 2 else (parts[0] + "." if len(parts) > 1 else k)
        g = groups.setdefault(head, {"prefix": head, "tensors": 0, "parameters": 0, "dtypes": Counter()})
        g["tensors"] += 1
        g["parameters"] += t.numel
        g["dtypes"][t.dtype.short] += 1
    top = sorted(groups.values(), key=lambda g: -g["parameters"])[:15]
    largest = sorted(tensors.values(), key=lambda t: -t.numel)[:8]
    ident.unknown_summary = {
        "prefixes": [{**g, "dtypes": dict(g["dtypes"])} for g in top],
        "prefix_count": len(groups),
        "largest_tensors": [{"key": t.name, "shape": list(t.shape), "dtype": t.dtype.short} for t in largest],
    }
    comp = Component(name="other", prefix="")
    for k, t in tensors.items():
        comp.keys.append(k)
        comp.parameters += t.numel
        comp.bytes += t.nbytes
        comp.dtypes[t.dtype.short] = comp.dtypes.get(t.dtype.short, 0) + 1
    if tensors:
        ident.components = {"other": comp}


def strip_tensors(tensors, comp: Optional[Component]):
    if comp is None:
        return {}
    n = len(comp.prefix)
    return {k[n:]: tensors[k] for k in comp.keys if k.startswith(comp.prefix)}


def _describe_gguf(ident: Identity, cat: Catalogue) -> None:
    """GGUF: sizes and dtypes as stored (block types), the quantization summary, its precision line."""
    from sdtk.identify.quantized import describe_quantization, quant_precision

    for comp in ident.components.values():
        comp.bytes = sum(cat.tensors[k].stored_nbytes for k in comp.keys)
        comp.dtypes = dict(Counter(cat.tensors[k].ggml_type.name for k in comp.keys))
    ident.tensor_bytes = sum(t.stored_nbytes for t in cat.tensors.values())
    ident.dtypes = dict(Counter(t.ggml_type.name for t in cat.tensors.values()))
    ident.quantization = describe_quantization(cat, ident.components)
    ident.precision = quant_precision(ident.quantization)


def precision_of(components: Mapping[str, Component], tensors) -> str:
    """The float dtype(s) of the weights, by bytes: "fp16", or "mixed fp32/fp16" (largest first;
    dtypes under 1% of the bytes are left out)."""
    by_bytes: Counter = Counter()
    for name, comp in components.items():
        if name in NOT_WEIGHTS:
            continue
        for k in comp.keys:
            t = tensors[k]
            if t.dtype.is_float and t.numel > 1:
                by_bytes[t.dtype.short] += t.nbytes
    if not by_bytes:
        return "none"
    total = sum(by_bytes.values())
    # a dtype holding under 1% of the weight bytes (a stray fp32 position_ids, a norm) does not make a file "mixed"
    names = [d for d, n in by_bytes.most_common() if n >= 0.01 * total]
    return names[0] if len(names) == 1 else "mixed " + "/".join(names)
