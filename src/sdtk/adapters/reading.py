"""Reading an adapter file: its tensors grouped into modules, each with its adapter type.

A LoRA key is `<module name><suffix>`; the suffix says which adapter tensor it is. The table
below is the suffix families of reference/lora.md §1.1 (ComfyUI comfy/weight_adapter/*::load,
A1111 network_*.py, LyCORIS modules/*, PEFT, diffusers); the longest suffix wins.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from sdtk.tensors import LazyTensor

# (file suffix, role). Roles are our names for the tensors of each family.
SUFFIX_ROLES: Tuple[Tuple[str, str], ...] = (
    # LoRA / LoCon: kohya, LyCORIS
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    # PEFT / diffusers (adapter-named PEFT keys: `.default`), Mochi (no `.weight`)
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    # old diffusers: attention processors (`to_q_lora.up`), `.lora.up`, text encoder `lora_linear_layer`
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    # XLabs FLUX (`double_blocks.N.processor.qkv_lora1.down.weight`)
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
    # DoRA: kohya / LyCORIS `dora_scale`; PEFT `lora_magnitude_vector` (per output row)
    (".dora_scale", "dora_scale"), (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector.default.weight", "magnitude"), (".lora_magnitude_vector.default", "magnitude"),
    # LoHa
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    # LoKr
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "lokr_t2"),
    # (IA)^3: `weight` + `on_input` (the `weight` role is only taken when `on_input` is there)
    (".on_input", "on_input"),
    # GLoRA
    (".a1.weight", "a1"), (".a2.weight", "a2"), (".b1.weight", "b1"), (".b2.weight", "b2"), (".bm.weight", "bm"),
    # OFT / BOFT (old LyCORIS diag-oft: `oft_diag`), LyCORIS `rescale`
    (".oft_blocks", "oft_blocks"), (".oft_diag", "oft_blocks"), (".rescale", "rescale"),
    # full diff, norm diffs, ComfyUI extras; BFL control LoRAs' `lora_B.bias` is a bias diff
    (".diff", "diff"), (".diff_b", "diff_b"), (".lora_B.bias", "diff_b"), (".w_norm", "w_norm"), (".b_norm", "b_norm"),
    (".set_weight", "set_weight"), (".reshape_weight", "reshape_weight"),
    # old LyCORIS sparse bias
    (".bias_indices", "bias_indices"), (".bias_values", "bias_values"), (".bias_size", "bias_size"),
)
_BY_LENGTH = tuple(sorted(SUFFIX_ROLES, key=lambda sr: -len(sr[0])))
# Keys of LoRA files that are not adapters of a model weight (A1111/Forge Network.bundle_embeddings).
IGNORED_PREFIXES = ("bundle_emb.",)

KIND_LABELS = {
    "lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)^3", "glora": "GLoRA",
    "oft": "OFT", "boft": "BOFT", "full": "full diff", "norm": "norm diff", "set": "set weight",
}


@dataclass
class Module:
    """One adapter module: its tensors by role, its type, and (for DoRA) its magnitude."""

    name: str
    parts: Dict[str, LazyTensor] = field(default_factory=dict)
    kind: str = "incomplete"

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts or "magnitude" in self.parts

    @property
    def rank(self) -> Optional[int]:
        p = self.parts
        if "down" in p and p["down"].shape:
            return p["down"].shape[0]
        if "hada_w1_b" in p:
            return p["hada_w1_b"].shape[0]
        if "lokr_w2_b" in p:
            return p["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in p:
            return p["lokr_w1_b"].shape[0]
        if "a2" in p:
            return p["a2"].shape[0]
        if "oft_blocks" in p:
            return p["oft_blocks"].shape[-3] if len(p["oft_blocks"].shape) >= 3 else None
        return None

    def scalar(self, role: str) -> Optional[float]:
        t = self.parts.get(role)
        if t is None or t.numel != 1:
            return None
        return float(np.asarray(t.read(), dtype=np.float64).reshape(-1)[0])


@dataclass
class Adapter:
    modules: Dict[str, Module]
    ignored: List[str]  # keys that are not model adapters (bundled embeddings)
    unknown: List[str]  # keys with no known suffix
    peft_config: Dict[str, object]  # diffusers' lora_adapter_metadata / SimpleTuner header alpha

    def kinds(self) -> Counter:
        c: Counter = Counter(m.kind for m in self.modules.values())
        return c


def split_key(key: str) -> Tuple[str, Optional[str]]:
    for suffix, role in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return key, None


def _kind(parts: Mapping[str, LazyTensor]) -> str:
    roles = set(parts)
    if {"up", "down"} <= roles:
        down = parts["down"]
        return "locon" if len(down.shape) == 4 and (down.shape[2] > 1 or "mid" in roles) else "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        return "loha"
    if ("lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles) and ("lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles):
        return "lokr"
    if {"on_input", "weight"} <= roles:
        return "ia3"
    if {"a1", "a2", "b1", "b2"} <= roles:
        return "glora"
    if "oft_blocks" in roles:
        return "boft" if len(parts["oft_blocks"].shape) == 4 else "oft"
    if "diff" in roles or "diff_b" in roles:
        return "full"
    if "w_norm" in roles or "b_norm" in roles:
        return "norm"
    if "set_weight" in roles:
        return "set"
    return "incomplete"


def read_adapter(tensors: Mapping[str, LazyTensor], metadata: Optional[Mapping[str, str]] = None) -> Adapter:
    """Group a LoRA file's tensors into modules (names and shapes only; nothing is read)."""
    modules: Dict[str, Module] = {}
    ignored, unknown = [], []
    plain: Dict[str, LazyTensor] = {}
    for key, t in tensors.items():
        if key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        module, role = split_key(key)
        if role is None:
            plain[key] = t
            continue
        modules.setdefault(module, Module(module)).parts[role] = t
    for key, t in plain.items():  # (IA)^3 `.weight`: only beside an `.on_input`
        if key.endswith(".weight") and key[: -len(".weight")] in modules and "on_input" in modules[key[: -len(".weight")]].parts:
            modules[key[: -len(".weight")]].parts["weight"] = t
        else:
            unknown.append(key)
    for m in modules.values():
        m.kind = _kind(m.parts)
    return Adapter(modules, ignored, unknown, peft_config(metadata or {}))


def peft_config(metadata: Mapping[str, str]) -> Dict[str, object]:
    """The LoraConfig diffusers writes into the header (`lora_adapter_metadata`, loaders/lora_base.py
    LORA_ADAPTER_METADATA_KEY), or SimpleTuner's `*.lora_alpha` / `*.r`; {} when absent."""
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = json.loads(raw)
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    for prefix in ("transformer.", "unet.", ""):
        if prefix + "lora_alpha" in metadata:
            try:
                out: Dict[str, object] = {"lora_alpha": float(metadata[prefix + "lora_alpha"])}
                if prefix + "r" in metadata:
                    out["r"] = int(metadata[prefix + "r"])
                return out
            except ValueError:
                return {}
    return {}


def natural_shape(m: Module) -> Optional[Tuple[int, ...]]:
    """The shape of the module's dW as its tensors give it (numel is what must match the target);
    None for types that take the target's own shape ((IA)^3, GLoRA, OFT, norm, set)."""
    p = m.parts
    if m.kind in ("lora", "locon"):
        up, down = p["up"].shape, p["down"].shape
        if "mid" in p:
            return (up[0], down[1]) + tuple(p["mid"].shape[2:])
        return (up[0],) + tuple(down[1:])
    if m.kind == "loha":
        if "hada_t1" in p:
            return (p["hada_w1_a"].shape[1], p["hada_w1_b"].shape[1]) + tuple(p["hada_t1"].shape[2:])
        return (p["hada_w1_a"].shape[0], int(np.prod(p["hada_w1_b"].shape[1:])))
    if m.kind == "lokr":
        a, c = (p["lokr_w1"].shape[:2] if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1]))
        if "lokr_w2" in p:
            w2 = tuple(p["lokr_w2"].shape)
        elif "lokr_t2" in p:
            w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1]) + tuple(p["lokr_t2"].shape[2:])
        else:
            w2 = (p["lokr_w2_a"].shape[0], int(np.prod(p["lokr_w2_b"].shape[1:])))
        return (a * w2[0], c * w2[1]) + tuple(w2[2:])
    if m.kind == "full" and "diff" in p:
        return tuple(p["diff"].shape)
    return None


# What a module changes: its weight, its bias, or both.

def touches_bias(m: Module) -> bool:
    return "diff_b" in m.parts or "b_norm" in m.parts


def touches_weight(m: Module) -> bool:
    return not (m.kind in ("full", "norm") and "diff" not in m.parts and "w_norm" not in m.parts)
