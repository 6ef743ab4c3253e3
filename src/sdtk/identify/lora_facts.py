"""The deeper facts of a LoRA / LyCORIS file for `sdtk inspect`: adapter types, rank and alpha per
module (summarised), components and blocks touched, the base it was made for with its evidence
and confidence, trigger words and training facts from the metadata, and the problems found.

Names, shapes, the scalar `alpha` tensors and the header only; nothing here reads a weight.
Sources: reference/lora.md §1.1 (suffix families), §4.1 (kohya `ss_*` keys, written by
sd-scripts train_network.py), §4.3 (A1111 `NetworkOnDisk.detect_version`, trigger words).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple

from sdtk.tensors import LazyTensor

# LoRA module-name prefix -> the component it adapts. Source: reference/lora.md §1.1 prefix table
# (kohya lora_te_/lora_te1_/2_/3_, diffusers text_encoder(_2/_3)., ComfyUI text_encoders.clip_l/g/t5xxl.).
COMPONENT_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"), ("lora_prior_te_", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"), ("text_encoder.", "text_encoder"),
    ("text_encoders.clip_l.", "text_encoder"), ("text_encoders.clip_g.", "text_encoder_2"),
    ("text_encoders.t5xxl.", "text_encoder_3"),
)

# Block groups in module names (dots already turned into underscores), leftmost match wins.
# SD1/2 kohya+diffusers: down_blocks/mid_block/up_blocks; SDXL SGM: input_blocks/middle_block/
# output_blocks; FLUX BFL: double_blocks/single_blocks, diffusers: transformer_blocks/
# single_transformer_blocks; SD3: joint_blocks; CLIP: encoder_layers; T5: encoder_block.
_BLOCK = re.compile(r"(?:^|_)(input_blocks|output_blocks|down_blocks|up_blocks|double_blocks|single_blocks|joint_blocks|"
                    r"single_transformer_blocks|transformer_blocks|layers|block|blocks)_(\d+)(?=_|$)")
_MIDDLE = re.compile(r"(?:^|_)(middle_block|mid_block)(?=_|$)")
_CROSS_K = re.compile(r"attn2[._](processor[._])?to_k")

# kohya's ss_* training keys shown, in this order (sd-scripts train_network.py metadata block).
TRAINING_KEYS: Tuple[Tuple[str, str], ...] = (
    ("steps", "ss_steps"), ("max_steps", "ss_max_train_steps"), ("epoch", "ss_epoch"), ("epochs", "ss_num_epochs"),
    ("learning_rate", "ss_learning_rate"), ("unet_lr", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr"),
    ("optimizer", "ss_optimizer"), ("lr_scheduler", "ss_lr_scheduler"), ("network_module", "ss_network_module"),
    ("network_dim", "ss_network_dim"), ("network_alpha", "ss_network_alpha"), ("network_args", "ss_network_args"),
    ("resolution", "ss_resolution"), ("clip_skip", "ss_clip_skip"), ("train_images", "ss_num_train_images"),
    ("reg_images", "ss_num_reg_images"), ("batch_size", "ss_total_batch_size"), ("mixed_precision", "ss_mixed_precision"),
    ("seed", "ss_seed"), ("noise_offset", "ss_noise_offset"), ("min_snr_gamma", "ss_min_snr_gamma"),
    ("base_model", "ss_sd_model_name"), ("base_model_hash", "ss_new_sd_model_hash"), ("output_name", "ss_output_name"),
    ("comment", "ss_training_comment"), ("started_at", "ss_training_started_at"), ("finished_at", "ss_training_finished_at"),
    ("sd_scripts_commit", "ss_sd_scripts_commit_hash"),
)
_ABSENT = ("", "None", "null", "none")
MAX_TRIGGERS = 10


# ---- types, ranks and alphas ----------------------------------------------------------------


def _is_conv(m) -> bool:
    """A k x k convolution module (LoCon / conv LoHa / conv LoKr / Tucker): the conv rank of kohya's conv_dim."""
    p = m.parts
    down = p.get("down")
    if down is not None and len(down.shape) == 4 and (down.shape[2] > 1 or "mid" in p):
        return True
    if "hada_t1" in p or "lokr_t2" in p:
        return True
    w2 = p.get("lokr_w2")
    return w2 is not None and len(w2.shape) == 4 and w2.shape[2] > 1


def _alpha(m) -> Optional[float]:
    try:
        a = m.scalar("alpha")
    except Exception:  # an unreadable alpha is reported as missing, never a crash
        return None
    return None if a is None else round(a, 4)


def rank_groups(modules) -> List[Dict[str, Any]]:
    """[{type, conv, rank, alpha, modules}], largest group first ("rank 32 (alpha 16) on 264 modules")."""
    groups: Counter = Counter()
    for m in modules:
        if m.kind == "incomplete":
            continue
        groups[(m.kind, _is_conv(m), m.rank if m.kind not in ("full", "norm", "set", "ia3") else None, _alpha(m))] += 1
    rows = [{"type": k, "conv": c, "rank": r, "alpha": a, "modules": n} for (k, c, r, a), n in groups.items()]
    rows.sort(key=lambda g: (g["conv"], -g["modules"], g["type"], g["rank"] or 0))
    return rows


def component_of(module: str) -> str:
    for prefix, comp in COMPONENT_PREFIXES:
        if module.startswith(prefix):
            return comp
    return "unet"


def block_of(module: str) -> Tuple[str, Optional[int]]:
    """("input_blocks", 4), ("middle_block", None), ("layers", 11), ("other", None)."""
    name = module.replace(".", "_")
    m = _BLOCK.search(name)
    mid = _MIDDLE.search(name)
    if mid and (not m or mid.start() < m.start()):
        return mid.group(1), None
    if m:
        return m.group(1), int(m.group(2))
    return "other", None


def blocks_touched(modules) -> Dict[str, Dict[str, List[int]]]:
    """{component: {block group: sorted indices}} (groups without an index map to [])."""
    out: Dict[str, Dict[str, set]] = {}
    for m in modules:
        group, index = block_of(m.name)
        slot = out.setdefault(component_of(m.name), {}).setdefault(group, set())
        if index is not None:
            slot.add(index)
    return {c: {g: sorted(ix) for g, ix in groups.items()} for c, groups in out.items()}


def ranges(indices: List[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(parts)


# ---- the base it was made for ---------------------------------------------------------------


def _shape_evidence(modules) -> List[Dict[str, Any]]:
    """What the shapes say: the UNet's cross-attention context width (Forge's shortcut), FLUX's
    hidden width, the text encoder's width."""
    from sdtk.architectures import CONTEXT_WIDTH_BASE

    found: List[Dict[str, Any]] = []
    for m in modules:
        if component_of(m.name) != "unet" or not _CROSS_K.search(m.name):
            continue
        down = m.parts.get("down")
        width = None
        if down is not None and len(down.shape) >= 2:
            width = down.shape[1]
        elif "hada_w1_b" in m.parts and len(m.parts["hada_w1_b"].shape) == 2:
            width = m.parts["hada_w1_b"].shape[1]
        elif "lokr_w1" in m.parts and len(m.parts["lokr_w1"].shape) == 2:
            w2 = m.parts.get("lokr_w2")
            w2_in = w2.shape[1] if w2 is not None and len(w2.shape) >= 2 else (
                m.parts["lokr_w2_b"].shape[1] if "lokr_w2_b" in m.parts and len(m.parts["lokr_w2_b"].shape) == 2 else None)
            width = m.parts["lokr_w1"].shape[1] * w2_in if w2_in else None
        if width in CONTEXT_WIDTH_BASE:
            found.append({"source": "shapes", "architecture": CONTEXT_WIDTH_BASE[width],
                          "detail": f"cross-attention context width {width}"})
            break
    names = [m.name for m in modules]
    # kohya FLUX (lora_unet_double_blocks_*), diffusers FLUX (transformer.single_transformer_blocks.*),
    # BFL/ComfyUI (diffusion_model.double_blocks.*): hidden width 3072 (FLUX.1 dev/schnell, Chroma)
    if any(re.search(r"double_blocks|single_transformer_blocks|single_blocks", n) for n in names):
        for m in modules:
            down = m.parts.get("down")
            if down is not None and len(down.shape) == 2 and re.search(r"(img_attn|attn)[._](qkv|to_q)", m.name):
                if down.shape[1] == 3072:
                    found.append({"source": "shapes", "architecture": "flux-1-dev", "detail": "FLUX double/single blocks, hidden width 3072"})
                break
    if any("joint_blocks" in n for n in names):
        found.append({"source": "key names", "architecture": "stable-diffusion-v3-medium", "detail": "MMDiT joint_blocks"})
    if not any(e["source"] == "shapes" for e in found):
        found.extend(_diffusers_dit_width(modules))
    return found


# diffusers-named joint blocks (transformer.transformer_blocks.N.attn.to_q ...), which FLUX and SD3
# share: the hidden width tells them apart. Source: diffusers FluxTransformer2DModel (3072) and
# SD3Transformer2DModel configs (heads x 64: SD3 / SD3.5 medium 24, SD3.5 large 38); the MMDiT
# variants of architectures/signatures.py. SD3.5 medium's MMDiT-X blocks have a second attention.
_DIT_ATTN = re.compile(r"(?<!single_)transformer_blocks[._]\d+[._]attn2?[._](to_[qkv]|add_[qkv]_proj)$")
DIT_WIDTH_BASE = {3072: "flux-1-dev", 1536: "stable-diffusion-v3-medium", 2432: "stable-diffusion-v3.5-large"}


def _diffusers_dit_width(modules) -> List[Dict[str, Any]]:
    for m in modules:
        down = m.parts.get("down")
        if down is None or len(down.shape) != 2 or not _DIT_ATTN.search(m.name):
            continue
        arch = DIT_WIDTH_BASE.get(down.shape[1])
        if arch is None:
            return []
        if arch == "stable-diffusion-v3-medium" and any(re.search(r"[._]attn2[._]", x.name) for x in modules):
            arch = "stable-diffusion-v3.5-medium"
        label = "FLUX" if arch.startswith("flux") else "MMDiT (SD3)"
        return [{"source": "shapes", "architecture": arch, "detail": f"diffusers-named {label} joint blocks, hidden width {down.shape[1]}"}]
    return []


def _metadata_evidence(metadata: Mapping[str, str]) -> List[Dict[str, Any]]:
    from sdtk.architectures import KOHYA_BASE

    found = []
    arch = (metadata.get("modelspec.architecture") or "").strip()
    if arch:
        found.append({"source": "modelspec", "architecture": arch.split("/", 1)[0], "detail": f"modelspec.architecture {arch}"})
    base = metadata.get("ss_base_model_version")
    if base in KOHYA_BASE:
        found.append({"source": "kohya", "architecture": KOHYA_BASE[base], "detail": f"ss_base_model_version {base}"})
    elif metadata.get("ss_v2") == "True":
        found.append({"source": "kohya", "architecture": "stable-diffusion-v2-768-v" if metadata.get("ss_v_parameterization") == "True"
                      else "stable-diffusion-v2-512", "detail": "ss_v2 True"})
    return found


def _name_evidence(modules) -> List[Dict[str, Any]]:
    from sdtk.architectures.adjacent import LORA_MODULE_HINTS

    for hint, arch in LORA_MODULE_HINTS:
        if arch and any(m.name.startswith(hint) for m in modules):
            return [{"source": "key names", "architecture": arch, "detail": f"module names {hint}*"}]
    return []


def base_verdict(modules, metadata: Mapping[str, str]) -> Dict[str, Any]:
    """{architecture, confidence (high/medium/low/none), evidence [...], conflict (or None)}.
    Shapes decide when they disagree with metadata (metadata is copied between files; shapes are
    what a loader sees); metadata refines the variant when the families agree (SD2 512 / 768-v)."""
    from sdtk.architectures import family_of

    shapes = _shape_evidence(modules)
    meta = _metadata_evidence(metadata)
    names = _name_evidence(modules)
    evidence = shapes + meta + names
    conflict = None
    strong = [e for e in shapes if e["source"] == "shapes"]
    if strong:
        arch = strong[0]["architecture"]
        agreeing = [e for e in meta if family_of(e["architecture"]) == family_of(arch)]
        if agreeing:
            arch = agreeing[0]["architecture"]  # the more precise id (variant)
        disagreeing = [e for e in meta if family_of(e["architecture"]) not in (family_of(arch), "unknown")]
        if disagreeing:
            conflict = {"claimed": disagreeing[0]["architecture"], "claimed_by": disagreeing[0]["detail"], "detected": arch}
        confidence = "high"
    elif meta:
        arch = meta[0]["architecture"]
        same = all(family_of(e["architecture"]) == family_of(arch) for e in meta + names)
        confidence = "high" if same and (len(meta) > 1 or names) else "medium"
        clash = [e for e in names + meta[1:] if family_of(e["architecture"]) not in (family_of(arch), "unknown")]
        if clash:
            conflict = {"claimed": arch, "claimed_by": meta[0]["detail"], "detected": clash[0]["architecture"]}
            confidence = "low"
    elif shapes or names:
        arch = (shapes or names)[0]["architecture"]
        confidence = "medium"
    else:
        arch, confidence = None, "none"
    return {"architecture": arch, "confidence": confidence, "evidence": evidence, "conflict": conflict}


# ---- metadata: triggers, training -----------------------------------------------------------


def _json(raw: Optional[str]):
    if not raw or not isinstance(raw, str) or raw[:1] not in "{[":
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def trigger_words(metadata: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Candidates, in A1111/Civitai priority: modelspec.trigger_phrase; the folder names of kohya
    DreamBooth datasets ("10_ohwx woman": repeats, then the class tokens, train_util.py); the most
    frequent caption tags (ss_tag_frequency, ss_datasets[*].tag_frequency)."""
    out: List[Dict[str, Any]] = []
    seen = set()

    def add(word: str, source: str, count: Optional[int] = None):
        word = " ".join(str(word).split())
        if word and word.lower() not in seen and len(out) < MAX_TRIGGERS:
            seen.add(word.lower())
            out.append({"word": word, "source": source, **({"count": count} if count is not None else {})})

    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        for part in phrase.split(","):
            add(part, "modelspec.trigger_phrase")
    dirs: List[str] = []
    for key in ("ss_dataset_dirs",):
        data = _json(metadata.get(key))
        if isinstance(data, dict):
            dirs += [str(d) for d in data]
    datasets = _json(metadata.get("ss_datasets"))
    freq: Counter = Counter()
    if isinstance(datasets, list):
        for ds in datasets:
            if not isinstance(ds, dict):
                continue
            for sub in ds.get("subsets") or []:
                if isinstance(sub, dict) and sub.get("class_tokens"):
                    add(sub["class_tokens"], "ss_datasets class_tokens")
                elif isinstance(sub, dict) and sub.get("image_dir"):
                    dirs.append(str(sub["image_dir"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
            _count_tags(ds.get("tag_frequency"), freq)
    for d in dirs:
        head, sep, rest = d.partition("_")
        if sep and head.isdigit() and rest.strip():
            add(rest, "ss_dataset_dirs")
    _count_tags(_json(metadata.get("ss_tag_frequency")), freq)
    for tag, n in freq.most_common(MAX_TRIGGERS):
        add(tag, "ss_tag_frequency", n)
    return out


def _count_tags(data, freq: Counter) -> None:
    if not isinstance(data, dict):
        return
    for tags in data.values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                try:
                    freq[str(tag).strip()] += int(n)
                except (TypeError, ValueError):
                    continue


def training_facts(metadata: Mapping[str, str]) -> Dict[str, Any]:
    """The kohya ss_* training facts present, by readable names (values as written, JSON parsed)."""
    out: Dict[str, Any] = {}
    for name, key in TRAINING_KEYS:
        value = metadata.get(key)
        if value is None or str(value).strip() in _ABSENT:
            continue
        parsed = _json(value) if key == "ss_network_args" else None
        out[name] = parsed if parsed is not None else value
    datasets = _json(metadata.get("ss_datasets"))
    images = 0
    if isinstance(datasets, list):
        for ds in datasets:
            if isinstance(ds, dict):
                for sub in ds.get("subsets") or []:
                    if isinstance(sub, dict) and isinstance(sub.get("img_count"), int):
                        images += sub["img_count"]
                if "resolution" not in out and ds.get("resolution"):
                    out["resolution"] = str(tuple(ds["resolution"])) if isinstance(ds["resolution"], list) else str(ds["resolution"])
                if "batch_size" not in out and ds.get("batch_size_per_device"):
                    out["batch_size"] = ds["batch_size_per_device"]
    dirs = _json(metadata.get("ss_dataset_dirs"))
    if isinstance(dirs, dict):
        for info in dirs.values():
            if isinstance(info, dict) and isinstance(info.get("img_count"), int):
                images += info["img_count"]
    if "train_images" not in out and images:
        out["train_images"] = images
    elif images:
        out["dataset_images"] = images  # distinct images; train_images counts repeats
    return out


# ---- the whole analysis ---------------------------------------------------------------------


def describe_lora(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str]) -> Dict[str, Any]:
    """The deeper LoRA facts (JSON-ready) plus the raw problems [(code, severity, details)]."""
    from sdtk.adapters.reading import KIND_LABELS, read_adapter

    adapter = read_adapter(tensors, metadata)
    modules = list(adapter.modules.values())
    complete = [m for m in modules if m.kind != "incomplete"]
    types = Counter(m.kind for m in complete)
    groups = rank_groups(complete)
    components = Counter(component_of(m.name) for m in complete)
    base = base_verdict(complete, metadata)
    facts: Dict[str, Any] = {
        "types": {KIND_LABELS.get(k, k): n for k, n in types.most_common()},
        "type_ids": dict(types.most_common()),
        "dora_modules": sum(1 for m in complete if m.dora),
        "rank_groups": groups,
        "components_touched": dict(components),
        "blocks": blocks_touched(complete),
        "base": base,
        "trigger_words": trigger_words(metadata),
        "training_facts": training_facts(metadata),
        "bundled_embeddings": sorted({k.split(".")[1] for k in adapter.ignored if k.count(".") >= 1}),
        "peft_config": {k: v for k, v in adapter.peft_config.items() if isinstance(v, (int, float, str, bool))},
    }
    problems: List[Tuple[str, str, Dict[str, Any]]] = []
    no_alpha = [m.name for m in complete if m.kind in ("lora", "locon", "loha", "lokr") and "alpha" not in m.parts]
    if no_alpha and not adapter.peft_config.get("lora_alpha"):
        problems.append(("lora_alpha_missing", "info", {"count": len(no_alpha), "examples": no_alpha[:3]}))
    # alpha 0: scale 1 in kohya and sdtk, 0 in ComfyUI (reference/lora.md §2.1); for OFT/BOFT alpha
    # is a constraint, and 0 means none (LyCORIS get_r), so it is not a problem there
    zero = [m.name for m in complete if "alpha" in m.parts and _alpha(m) == 0 and m.kind not in ("oft", "boft")]
    if zero:
        problems.append(("lora_alpha_zero", "warning", {"count": len(zero), "examples": zero[:3]}))
    incomplete = [m.name for m in modules if m.kind == "incomplete"]
    if incomplete:
        problems.append(("lora_incomplete_modules", "warning", {"count": len(incomplete), "examples": incomplete[:3]}))
    if adapter.unknown:
        problems.append(("lora_unknown_keys", "warning", {"count": len(adapter.unknown), "examples": adapter.unknown[:3]}))
    if base["conflict"]:
        from sdtk.architectures import title_of

        c = base["conflict"]
        problems.append(("lora_base_conflict", "warning", {**c, "claimed_title": title_of(c["claimed"]), "detected_title": title_of(c["detected"])}))
    return {"facts": facts, "problems": problems, "adapter": adapter}


# The shipped layouts a claimed base is checked against (src/sdtk/data/layouts, from real files).
BASE_LAYOUTS = {
    "stable-diffusion-v1": "sd15-emaonly", "stable-diffusion-v2": "sd21-768-v", "stable-diffusion-v2-512": "sd21-768-v",
    "stable-diffusion-v2-768-v": "sd21-768-v", "stable-diffusion-xl-v1-base": "sdxl-base",
    "flux-1-dev": "flux1-dev-aio", "flux-1-schnell": "flux1-dev-aio", "stable-diffusion-v3-medium": "sd3-medium-incl-clips",
}


@lru_cache(maxsize=4)
def _layout_table(name: str):
    from sdtk.architectures.lora_keys import build_alias_table
    from sdtk.samples import load_layout

    shapes = {k: tuple(s) for k, s, _ in load_layout(name).tensors}
    return shapes, build_alias_table(shapes)


def check_against_base(adapter, architecture: Optional[str]) -> Optional[Dict[str, Any]]:
    """How many modules match nothing in the base the file was made for (its shipped layout):
    {layout, matched, modules, unmatched, examples} or None when no layout is known."""
    name = BASE_LAYOUTS.get(architecture or "")
    if name is None:
        return None
    from sdtk.adapters.matching import LoraInput, plan_patches

    shapes, table = _layout_table(name)
    _, reports = plan_patches(shapes, [(LoraInput("lora"), adapter)], table)
    rep = reports[0]
    # incomplete modules and unknown tensors are problems of their own (describe_lora)
    skip = {n for n, m in adapter.modules.items() if m.kind == "incomplete"} | set(adapter.unknown)
    unmatched = [(m, why) for m, why in rep.unmatched if m not in skip]
    return {"layout": name, "matched": rep.matched, "modules": rep.modules - len(skip), "unmatched": len(unmatched),
            "examples": [f"{m} ({why})" for m, why in unmatched[:3]]}
