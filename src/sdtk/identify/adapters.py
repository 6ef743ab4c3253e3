"""Details of adapter files: LoRA / LyCORIS (algorithm, rank, alpha, targets, base model),
textual-inversion embeddings (vectors, base), hypernetworks and ControlNets (base model).

Only names and shapes are used, plus the scalar `alpha` tensors of LoRAs (one value each)."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

from sdtk.architectures import CONTEXT_WIDTH_BASE, EMBEDDING_WIDTH_BASE, KOHYA_BASE
from sdtk.architectures.adjacent import LORA_MODULE_HINTS
from sdtk.tensors import LazyTensor

Shape = Tuple[int, ...]

# Suffix -> role, for grouping adapter tensors by module. Sources: kohya networks/lora.py,
# LyCORIS modules (loha.py, lokr.py, locon.py, dylora), peft tuners/lora, diffusers loaders.
_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
    ".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".dora_scale", ".diff", ".diff_b",
)
_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight", ".hada_w1_b")
_CROSS_ATTN_K = re.compile(r"attn2[._](processor[._])?to_k")


def _module_of(key: str) -> Tuple[str, str]:
    for suf in _SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)], suf
    return key, ""


def _target(module: str) -> str:
    m = module
    if m.startswith(("lora_te1_", "lora_te2_", "lora_te_", "text_encoder", "te_", "lora_te")):
        return "text_encoder_2" if m.startswith(("lora_te2_", "text_encoder_2")) else "text_encoder"
    return "unet"


def _scalar(t: LazyTensor) -> Optional[float]:
    import numpy as np

    if t.numel != 1:
        return None
    try:
        return float(np.asarray(t.read(), dtype=np.float64).reshape(-1)[0])
    except Exception:  # an unreadable alpha is reported as unknown, never a crash
        return None


def _base_from_metadata(metadata: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    arch = metadata.get("modelspec.architecture")
    if arch:
        return arch.split("/", 1)[0], "modelspec"
    base = metadata.get("ss_base_model_version")
    if base in KOHYA_BASE:
        return KOHYA_BASE[base], "kohya"
    if metadata.get("ss_v2") == "True":
        return ("stable-diffusion-v2-768-v" if metadata.get("ss_v_parameterization") == "True" else "stable-diffusion-v2-512"), "kohya"
    return None


def analyse_lora(tensors: Mapping[str, LazyTensor], subtype: str, metadata: Mapping[str, str]) -> Dict[str, Any]:
    modules: Dict[str, Dict[str, LazyTensor]] = {}
    for key, t in tensors.items():
        module, suf = _module_of(key)
        modules.setdefault(module, {})[suf] = t
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    algorithms: Counter = Counter()
    targets: Counter = Counter()
    context_width = None
    conv = False
    for module, parts in modules.items():
        if not any(s for s in parts):
            continue
        targets[_target(module)] += 1
        down = next((parts[s] for s in _DOWN if s in parts), None)
        rank = None
        if down is not None:
            rank = down.shape[0] if down.shape else None
            if len(down.shape) == 4 and down.shape[2] > 1:
                conv = True
            if _CROSS_ATTN_K.search(module) and len(down.shape) >= 2 and _target(module) == "unet":
                context_width = down.shape[1]
        if ".hada_w1_a" in parts:
            algorithms["loha"] += 1
            rank = parts[".hada_w1_a"].shape[1] if len(parts[".hada_w1_a"].shape) > 1 else None
        elif any(s.startswith(".lokr") for s in parts):
            algorithms["lokr"] += 1
            w1 = parts.get(".lokr_w1")
            w2 = parts.get(".lokr_w2") or parts.get(".lokr_w2_b")
            if w1 is not None and w2 is not None and len(w1.shape) == 2 and len(w2.shape) >= 2 and _CROSS_ATTN_K.search(module):
                context_width = w1.shape[1] * w2.shape[1]  # Kronecker product: in = in1 * in2
            if ".lokr_w2_a" in parts:
                rank = parts[".lokr_w2_a"].shape[1]
        elif down is not None:
            algorithms["lora"] += 1
        if rank is not None:
            ranks[rank] += 1
        if ".alpha" in parts:
            a = _scalar(parts[".alpha"])
            if a is not None:
                alphas[round(a, 4)] += 1
    algorithm = algorithms.most_common(1)[0][0] if algorithms else subtype
    if algorithm == "lora" and conv:
        algorithm = "locon"
    base, base_source = None, None
    meta = _base_from_metadata(metadata)
    if meta:
        base, base_source = meta
    elif context_width in CONTEXT_WIDTH_BASE:
        base, base_source = CONTEXT_WIDTH_BASE[context_width], "shapes"
    else:
        for hint, arch in LORA_MODULE_HINTS:
            if arch and any(m.startswith(hint) for m in modules):
                base, base_source = arch, "key names"
                break
    rank_list = sorted(ranks)
    return {
        "format": subtype, "algorithm": algorithm, "modules": sum(targets.values()),
        "targets": dict(targets), "ranks": rank_list, "rank": rank_list[-1] if rank_list else None,
        "alphas": sorted(alphas), "alpha": (sorted(alphas)[-1] if alphas else None),
        "scale": (round(sorted(alphas)[-1] / rank_list[-1], 4) if alphas and rank_list and rank_list[-1] and len(alphas) == 1 and len(rank_list) == 1 else None),
        "dora": any(".dora_scale" in p for p in modules.values()),
        "base_architecture": base, "base_source": base_source,
    }


# Text-encoder names by embedding width (CLIP ViT-L/14 768, OpenCLIP ViT-H 1024, OpenCLIP ViT-bigG 1280).
ENCODER_NAMES = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "OpenCLIP-bigG"}
PROMPT_CHUNK = 75  # tokens of one CLIP prompt chunk (A1111 sd_hijack_clip)


def analyse_embedding(tensors: Mapping[str, LazyTensor], subtype: str, extras: Mapping[str, Any]) -> Dict[str, Any]:
    vectors: Dict[str, Any] = {}
    widths = set()
    encoders = []
    for key, t in tensors.items():
        if len(t.shape) >= 1:
            n = t.shape[0] if len(t.shape) == 2 else 1
            width = t.shape[-1]
            vectors[key] = {"vectors": n, "width": width}
            widths.add(width)
            encoders.append({"tensor": key, "encoder": ENCODER_NAMES.get(width, f"width {width}"), "width": width, "vectors": n})
    if {768, 1280} <= widths:
        base = "stable-diffusion-xl-v1-base"
    elif len(widths) == 1:
        base = EMBEDDING_WIDTH_BASE.get(next(iter(widths)))
    else:
        base = None
    encoders.sort(key=lambda e: e["width"])
    total = max((v["vectors"] for v in vectors.values()), default=0)
    out = {"format": subtype, "vectors": total, "tensors": vectors, "encoders": encoders, "base_architecture": base,
           "base_source": "shapes" if base else None}
    terms = [k.split(".", 1)[1] for k in tensors if k.startswith("string_to_param.")]
    if subtype == "a1111" and terms:
        out["token"] = terms[0] if len(terms) == 1 else None
        out["terms"] = terms
        token_id = extras.get(f"string_to_token.{terms[0]}")
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            out["token_id"] = token_id
    elif subtype == "diffusers" and tensors:
        out["token"] = next(iter(tensors))
    elif isinstance(extras.get("token"), str):
        out["token"] = extras["token"]
    for field in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if field in extras and isinstance(extras[field], (str, int, float)):
            out[field] = extras[field]
    return out


def embedding_problems(a: Mapping[str, Any]) -> list:
    """[(code, severity, details)] for an analysed embedding: what A1111 refuses or mangles."""
    out = []
    terms = a.get("terms") or []
    if len(terms) > 1:  # A1111 create_embedding_from_data: assert len(param_dict) == 1
        out.append(("embedding_multiple_terms", "error", {"count": len(terms), "tokens": terms[:5]}))
    tensors = a.get("tensors") or {}
    if "clip_l" in tensors and "clip_g" in tensors and tensors["clip_l"]["vectors"] != tensors["clip_g"]["vectors"]:
        out.append(("embedding_pair_mismatch", "error", {"l": tensors["clip_l"]["vectors"], "g": tensors["clip_g"]["vectors"]}))
    if (a.get("vectors") or 0) > PROMPT_CHUNK:
        out.append(("embedding_too_many_vectors", "warning", {"vectors": a["vectors"]}))
    return out


def analyse_hypernetwork(tensors: Mapping[str, LazyTensor], extras: Mapping[str, Any]) -> Dict[str, Any]:
    """A1111 hypernetwork (modules/hypernetworks/hypernetwork.py): {width: [module_k, module_v]},
    each module a Sequential whose Linear weights give the layer sizes (768 -> 1536 -> 768), plus
    the training options saved beside them."""
    widths = sorted({int(k.split(".", 1)[0]) for k in tensors if k.split(".", 1)[0].isdigit()})
    base = "stable-diffusion-v2" if 1024 in widths else ("stable-diffusion-v1" if 768 in widths else None)
    sizes: Dict[str, List[int]] = {}
    norms = False
    for w in widths:
        linear = []
        for key, t in tensors.items():
            parts = key.split(".")
            if len(parts) == 5 and parts[0] == str(w) and parts[1] == "0" and parts[2] == "linear" and parts[3].isdigit() and parts[4] == "weight":
                if len(t.shape) == 2:
                    linear.append((int(parts[3]), t.shape))
                elif len(t.shape) == 1:
                    norms = True
        linear.sort()
        if linear:
            sizes[str(w)] = [linear[0][1][1]] + [s[0] for _, s in linear]
    out: Dict[str, Any] = {"format": "a1111", "widths": widths, "layer_sizes": sizes, "modules_per_width": 2,
                           "base_architecture": base, "base_source": "shapes" if base else None}
    if "is_layer_norm" not in extras and sizes:
        out["is_layer_norm"] = norms
    for field in ("name", "step", "layer_structure", "activation_func", "is_layer_norm", "use_dropout", "weight_initialization",
                  "activate_output", "last_layer_dropout", "dropout_structure", "sd_checkpoint", "sd_checkpoint_name"):
        value = extras.get(field)
        if isinstance(value, (str, int, float, bool)) or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)):
            out[field] = value
    return out


def analyse_controlnet(stripped: Mapping[str, Shape], subtype: str) -> Dict[str, Any]:
    width = None
    for key in ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
        if key in stripped and len(stripped[key]) == 2:
            width = stripped[key][1]
            break
    base = CONTEXT_WIDTH_BASE.get(width) if width else None
    return {"format": subtype, "base_architecture": base, "base_source": "shapes" if base else None, "context_width": width}


def summarise_ss_metadata(metadata: Mapping[str, str]) -> Dict[str, Any]:
    """kohya ss_* training metadata in a few readable fields (the rest stays in the file)."""
    keep = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name",
            "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_resolution", "ss_clip_skip", "ss_steps", "ss_epoch",
            "ss_num_train_images", "ss_learning_rate", "ss_output_name", "ss_training_started_at", "ss_network_args")
    out: Dict[str, Any] = {k: metadata[k] for k in keep if k in metadata}
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            freq: Counter = Counter()
            for tags in json.loads(raw).values():
                for tag, n in tags.items():
                    freq[tag.strip()] += int(n)
            out["top_tags"] = [t for t, _ in freq.most_common(10)]
        except (ValueError, AttributeError, TypeError):
            out["top_tags"] = None
    out["other_ss_keys"] = sum(1 for k in metadata if k.startswith("ss_") and k not in out and k != "ss_tag_frequency")
    return out
