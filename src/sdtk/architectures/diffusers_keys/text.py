"""Text encoders: CLIP-L/CLIP-G saved under transformers names (a prefix strip only), OpenCLIP
ViT-H/bigG saved under OpenCLIP names (renames, q/k/v split, projection transpose), and T5
(prefix strip only). Sources: shared reference diffusers-interop.md 1.4, 1.5, 1.9 and 2.4;
transformers 5.24 CLIPTextConfig / T5Config (what each config key means).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

from sdtk.architectures.diffusers_keys.links import Link, check_unique, same, split, weight_and_bias
from sdtk.architectures.diffusers_keys.unet import GeometryError, _count

# Keys diffusers' text encoders do not hold: transformers >= 4.31 keeps position_ids as a
# non-persistent buffer (reference 1.4); OpenCLIP logit_scale / attn_mask are not represented (1.5).
NOT_IN_DIFFUSERS = ("text_model.embeddings.position_ids", "embeddings.position_ids", "logit_scale", "attn_mask")

# OpenCLIP resblock -> transformers CLIPEncoderLayer (reference 1.5).
OPEN_CLIP_LAYER_PARTS = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))


def hf_clip_links(keys) -> List[Link]:
    """A CLIP text encoder already in transformers names: kept as is (position_ids aside), under
    `text_model.` (written that way so transformers 4.x and 5.x both load it, reference 1.4)."""
    links = []
    for k in keys:
        if k in NOT_IN_DIFFUSERS:
            continue
        links.append(same(k, k if (k.startswith("text_model.") or k == "text_projection.weight") else "text_model." + k))
    return links


def open_clip_layers(shapes: Mapping[str, Tuple[int, ...]]) -> int:
    return _count(shapes, r"transformer\.resblocks\.(\d+)\.")


def open_clip_links(shapes: Mapping[str, Tuple[int, ...]], keep_layers: int, projection: bool) -> List[Link]:
    """OpenCLIP text tower -> transformers CLIPTextModel(WithProjection), its first `keep_layers`
    layers (SD2 keeps 23 of 24: it conditions on the penultimate layer, reference 1.5)."""
    if "token_embedding.weight" not in shapes:
        raise GeometryError("no token_embedding.weight")
    width = shapes["token_embedding.weight"][1]
    links = [same("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             same("positional_embedding", "text_model.embeddings.position_embedding.weight")]
    for i in range(keep_layers):
        src, dst = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        for a, b in OPEN_CLIP_LAYER_PARTS:
            links += weight_and_bias(f"{src}.{a}", f"{dst}.{b}")
        for kind in ("weight", "bias"):
            links.append(split(f"{src}.attn.in_proj_{kind}", [f"{dst}.self_attn.{p}_proj.{kind}" for p in "qkv"], (width,) * 3))
    links += weight_and_bias("ln_final", "text_model.final_layer_norm")
    if projection:
        links.append(Link("text_projection", ("text_projection.weight",), "transpose"))
    check_unique(links)
    return links


def t5_links(keys) -> List[Link]:
    """T5 encoder: transformers names already (reference 1.9)."""
    return [same(k, k) for k in keys if k not in NOT_IN_DIFFUSERS]


def clip_config(shapes: Mapping[str, Tuple[int, ...]], *, hidden_act: str, projection: bool, torch_dtype: str,
                layers: Optional[int] = None) -> Dict:
    """CLIPTextConfig from transformers-named shapes (`text_model.` prefixed). Heads are 64 wide
    (CLIP-L 12 x 64, OpenCLIP-H 16 x 64, bigG 20 x 64)."""
    tok = shapes["text_model.embeddings.token_embedding.weight"]
    hidden = tok[1]
    n = layers if layers is not None else _count(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
    fc1 = shapes["text_model.encoder.layers.0.mlp.fc1.weight"]
    proj = shapes.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "dropout": 0.0, "hidden_act": hidden_act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": fc1[0], "layer_norm_eps": 1e-5,
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "num_attention_heads": max(1, hidden // 64), "num_hidden_layers": n,
        "projection_dim": proj[0] if proj else hidden, "torch_dtype": torch_dtype, "vocab_size": tok[0],
    }


def t5_config(shapes: Mapping[str, Tuple[int, ...]], torch_dtype: str) -> Dict:
    """T5Config of a T5 v1.1 encoder (gated-gelu) from its shapes (values: reference 2.4)."""
    rab = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = rab[1]
    q = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"]
    n = _count(shapes, r"encoder\.block\.(\d+)\.")
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        "d_kv": q[0] // heads, "d_model": q[1], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
        "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-6, "num_decoder_layers": n, "num_heads": heads, "num_layers": n,
        "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": rab[0],
        "tie_word_embeddings": False, "torch_dtype": torch_dtype, "vocab_size": shapes["shared.weight"][0],
    }


def hf_shapes(links: List[Link], shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The diffusers-side shapes of `links` given the single-file shapes (for configs)."""
    from sdtk.architectures.diffusers_keys.plan import diffusers_shapes

    out: Dict[str, Tuple[int, ...]] = {}
    for link in links:
        if link.single in shapes:
            out.update(zip(link.diffusers, diffusers_shapes(link, shapes[link.single])))
    return out
