"""Diffusion transformers: SD3/SD3.5 MMDiT <-> `SD3Transformer2DModel`, FLUX.1 <-> 
`FluxTransformer2DModel`, Qwen-Image (already in diffusers names). Driven by the geometry read
from the shapes (depth, hidden size, qk-norm, dual-attention layers, guidance embedder).
Sources: shared reference diffusers-interop.md 1.6, 1.7, 1.8 and 2.5; ComfyUI
`comfy/utils.py` mmdit_to_diffusers / flux_to_diffusers (the same maps, read in reverse).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Tuple

from sdtk.architectures.diffusers_keys.links import Link, check_unique, same, split, weight_and_bias
from sdtk.architectures.diffusers_keys.unet import GeometryError, _count


def _swap(single: str, diff: str) -> List[Link]:
    return [Link(f"{single}.weight", (f"{diff}.weight",), "swap"), Link(f"{single}.bias", (f"{diff}.bias",), "swap")]


def _qkv(single: str, parts, width: int) -> List[Link]:
    return [split(f"{single}.weight", [f"{p}.weight" for p in parts], (width,) * 3),
            split(f"{single}.bias", [f"{p}.bias" for p in parts], (width,) * 3)]


# ------------------------------------------------------------------------------------- SD3 MMDiT

def sd3_links(shapes: Mapping[str, Tuple[int, ...]]) -> List[Link]:
    if "x_embedder.proj.weight" not in shapes:
        raise GeometryError("no x_embedder.proj.weight")
    depth = _count(shapes, r"joint_blocks\.(\d+)\.")
    width = shapes["x_embedder.proj.weight"][0]
    links = [same("pos_embed", "pos_embed.pos_embed")] if "pos_embed" in shapes else []
    links += weight_and_bias("x_embedder.proj", "pos_embed.proj")
    links += weight_and_bias("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    links += weight_and_bias("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    links += weight_and_bias("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    links += weight_and_bias("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    links += weight_and_bias("context_embedder", "context_embedder")
    for i in range(depth):
        s, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1  # the last block's context stream is "pre-only" (reference 1.6)
        links += _qkv(f"{s}.x_block.attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], width)
        links += weight_and_bias(f"{s}.x_block.attn.proj", f"{d}.attn.to_out.0")
        links += weight_and_bias(f"{s}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        links += weight_and_bias(f"{s}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        links += weight_and_bias(f"{s}.x_block.mlp.fc2", f"{d}.ff.net.2")
        links += _qkv(f"{s}.context_block.attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], width)
        if f"{s}.x_block.attn.ln_q.weight" in shapes:  # SD3.5 qk-norm
            for a, b in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                         ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k")):
                links.append(same(f"{s}.{a}.weight", f"{d}.{b}.weight"))
        if f"{s}.x_block.attn2.qkv.weight" in shapes:  # SD3.5 medium dual attention (MMDiT-X)
            links += _qkv(f"{s}.x_block.attn2.qkv", [f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"], width)
            links += weight_and_bias(f"{s}.x_block.attn2.proj", f"{d}.attn2.to_out.0")
            if f"{s}.x_block.attn2.ln_q.weight" in shapes:
                links += [same(f"{s}.x_block.attn2.ln_q.weight", f"{d}.attn2.norm_q.weight"),
                          same(f"{s}.x_block.attn2.ln_k.weight", f"{d}.attn2.norm_k.weight")]
        if last:
            links += _swap(f"{s}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
        else:
            links += weight_and_bias(f"{s}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
            links += weight_and_bias(f"{s}.context_block.attn.proj", f"{d}.attn.to_add_out")
            links += weight_and_bias(f"{s}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
            links += weight_and_bias(f"{s}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
    links += weight_and_bias("final_layer.linear", "proj_out")
    links += _swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    check_unique(links)
    return links


def sd3_config(shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
    proj = shapes["x_embedder.proj.weight"]
    width, patch = proj[0], proj[2]
    depth = _count(shapes, r"joint_blocks\.(\d+)\.")
    pos = shapes.get("pos_embed")
    dual = [i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes]
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": patch, "in_channels": proj[1],
        "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch), "num_layers": depth,
        "attention_head_dim": 64, "num_attention_heads": width // 64,
        "joint_attention_dim": shapes["context_embedder.weight"][1], "caption_projection_dim": width,
        "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": int(math.isqrt(pos[1])) if pos else 192,
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
        "dual_attention_layers": dual,
    }


# ----------------------------------------------------------------------------------------- FLUX

def flux_links(shapes: Mapping[str, Tuple[int, ...]]) -> List[Link]:
    if "img_in.weight" not in shapes:
        raise GeometryError("no img_in.weight")
    width = shapes["img_in.weight"][0]
    doubles = _count(shapes, r"double_blocks\.(\d+)\.")
    singles = _count(shapes, r"single_blocks\.(\d+)\.")
    links = []
    for a, b in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        if a == "guidance_in" and "guidance_in.in_layer.weight" not in shapes:
            continue  # schnell has no guidance embedder (reference 1.7)
        links += weight_and_bias(f"{a}.in_layer", f"time_text_embed.{b}.linear_1")
        links += weight_and_bias(f"{a}.out_layer", f"time_text_embed.{b}.linear_2")
    links += weight_and_bias("txt_in", "context_embedder") + weight_and_bias("img_in", "x_embedder")
    for i in range(doubles):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        links += weight_and_bias(f"{s}.img_mod.lin", f"{d}.norm1.linear")
        links += weight_and_bias(f"{s}.txt_mod.lin", f"{d}.norm1_context.linear")
        links += _qkv(f"{s}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], width)
        links += _qkv(f"{s}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], width)
        links += [same(f"{s}.img_attn.norm.query_norm.scale", f"{d}.attn.norm_q.weight"),
                  same(f"{s}.img_attn.norm.key_norm.scale", f"{d}.attn.norm_k.weight"),
                  same(f"{s}.txt_attn.norm.query_norm.scale", f"{d}.attn.norm_added_q.weight"),
                  same(f"{s}.txt_attn.norm.key_norm.scale", f"{d}.attn.norm_added_k.weight")]
        links += weight_and_bias(f"{s}.img_attn.proj", f"{d}.attn.to_out.0")
        links += weight_and_bias(f"{s}.txt_attn.proj", f"{d}.attn.to_add_out")
        links += weight_and_bias(f"{s}.img_mlp.0", f"{d}.ff.net.0.proj") + weight_and_bias(f"{s}.img_mlp.2", f"{d}.ff.net.2")
        links += weight_and_bias(f"{s}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        links += weight_and_bias(f"{s}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(singles):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        mlp = shapes[f"{s}.linear1.weight"][0] - 3 * width
        parts = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
        links.append(split(f"{s}.linear1.weight", [f"{p}.weight" for p in parts], (width, width, width, mlp)))
        links.append(split(f"{s}.linear1.bias", [f"{p}.bias" for p in parts], (width, width, width, mlp)))
        links += [same(f"{s}.norm.query_norm.scale", f"{d}.attn.norm_q.weight"),
                  same(f"{s}.norm.key_norm.scale", f"{d}.attn.norm_k.weight")]
        links += weight_and_bias(f"{s}.linear2", f"{d}.proj_out") + weight_and_bias(f"{s}.modulation.lin", f"{d}.norm.linear")
    links += weight_and_bias("final_layer.linear", "proj_out")
    links += _swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    check_unique(links)
    return links


def flux_config(shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
    width = shapes["img_in.weight"][0]
    return {
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "num_attention_heads": width // 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "in_channels": shapes["img_in.weight"][1], "out_channels": shapes["final_layer.linear.weight"][0],
        "joint_attention_dim": shapes["txt_in.weight"][1], "num_layers": _count(shapes, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_blocks\.(\d+)\."), "patch_size": 1,
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
    }


# ----------------------------------------------------------------------- Lumina-Image 2.0, Z-Image
# Both keep the original block structure (x_embedder, t_embedder, cap_embedder, noise_refiner,
# context_refiner, layers, final_layer) and differ from diffusers by renames and a fused qkv.
# Sources: diffusers 0.42.1 single_file_utils.py convert_lumina2_to_diffusers (l.3034) and
# convert_z_image_transformer_checkpoint_to_diffusers (l.4080); shared reference 1.8. Each rule
# is (regex on the single-file key, replacement), applied in order, as the diffusers converters do.
LUMINA2_TOP = ("x_embedder.", "t_embedder.", "cap_embedder.", "noise_refiner.", "context_refiner.", "layers.",
               "final_layer.")
LUMINA2_RENAMES = (
    (r"^context_refiner\.(\d+)\.attention_norm([12])\.", r"context_refiner.\1.norm\2."),  # no modulation there
    (r"^final_layer\.adaLN_modulation\.1\.", "norm_out.linear_1."), (r"^final_layer\.linear\.", "norm_out.linear_2."),
    (r"\.attention_norm1\.", ".norm1.norm."), (r"\.attention_norm2\.", ".norm2."),
    (r"^cap_embedder\.", "time_caption_embed.caption_embedder."),
    (r"^t_embedder\.mlp\.0\.", "time_caption_embed.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_caption_embed.timestep_embedder.linear_2."),
    (r"\.attention\.", ".attn."), (r"\.out\.", ".to_out.0."), (r"\.k_norm\.", ".norm_k."), (r"\.q_norm\.", ".norm_q."),
    (r"\.feed_forward\.w([123])\.", r".feed_forward.linear_\1."), (r"\.adaLN_modulation\.1\.", ".norm1.linear."),
)
Z_IMAGE_TOP = LUMINA2_TOP + ("x_pad_token", "cap_pad_token")
Z_IMAGE_PATCH = "2-1"  # diffusers names the embedder and final layer by patch size 2 / frame patch 1
Z_IMAGE_RENAMES = (
    (r"^final_layer\.", f"all_final_layer.{Z_IMAGE_PATCH}."), (r"^x_embedder\.", f"all_x_embedder.{Z_IMAGE_PATCH}."),
    (r"\.attention\.out\.", ".attention.to_out.0."), (r"\.attention\.k_norm\.", ".attention.norm_k."),
    (r"\.attention\.q_norm\.", ".attention.norm_q."),
)
# the way back: diffusers key -> single-file key (the inverse rules, checked by the forward map)
LUMINA2_BACK = (
    (r"^time_caption_embed\.caption_embedder\.", "cap_embedder."),
    (r"^time_caption_embed\.timestep_embedder\.linear_([12])\.", lambda m: f"t_embedder.mlp.{2 * int(m.group(1)) - 2}."),
    (r"^norm_out\.linear_1\.", "final_layer.adaLN_modulation.1."), (r"^norm_out\.linear_2\.", "final_layer.linear."),
    (r"^context_refiner\.(\d+)\.norm([12])\.", r"context_refiner.\1.attention_norm\2."),
    (r"\.norm1\.norm\.", ".attention_norm1."), (r"\.norm1\.linear\.", ".adaLN_modulation.1."),
    (r"^((?:layers|noise_refiner)\.\d+)\.norm2\.", r"\1.attention_norm2."),
    (r"\.attn\.to_out\.0\.", ".attention.out."), (r"\.attn\.norm_k\.", ".attention.k_norm."),
    (r"\.attn\.norm_q\.", ".attention.q_norm."), (r"\.attn\.to_([qkv])\.", r".attention.to_\1."),
    (r"\.feed_forward\.linear_([123])\.", r".feed_forward.w\1."),
)
Z_IMAGE_BACK = (
    (rf"^all_final_layer\.{Z_IMAGE_PATCH}\.", "final_layer."), (rf"^all_x_embedder\.{Z_IMAGE_PATCH}\.", "x_embedder."),
    (r"\.attention\.to_out\.0\.", ".attention.out."), (r"\.attention\.norm_k\.", ".attention.k_norm."),
    (r"\.attention\.norm_q\.", ".attention.q_norm."),
)


def _renamed(key: str, rules) -> str:
    import re

    for rx, rep in rules:
        key = re.sub(rx, rep, key)
    return key


def _lumina_family_links(shapes: Mapping[str, Tuple[int, ...]], top, rules, kv_from_out: bool) -> List[Link]:
    """Links of a Lumina2-style DiT. The fused `attention.qkv` splits into q, k, v: Lumina2 uses
    grouped-query attention (q rows = the output projection's input width, k = v = the rest
    halved; diffusers hard-codes 2304/768/768 for the 2B model), Z-Image three equal parts.
    `norm_final.weight` (unused by the original too) and unknown keys are not linked."""
    if "x_embedder.weight" not in shapes or "cap_embedder.1.weight" not in shapes:
        raise GeometryError("no x_embedder.weight / cap_embedder.1.weight")
    links: List[Link] = []
    for key, shape in shapes.items():
        if not key.startswith(top):
            continue
        if key.endswith(".attention.qkv.weight"):
            block = key[: -len(".attention.qkv.weight")]
            diff = _renamed(block + ".attention.", rules)
            rows = shape[0]
            if kv_from_out:
                q = shapes[f"{block}.attention.out.weight"][1]
                if (rows - q) % 2:
                    raise GeometryError(f"{key}: {rows} rows do not split into q {q} and two equal k, v")
                sizes = (q, (rows - q) // 2, (rows - q) // 2)
            else:
                if rows % 3:
                    raise GeometryError(f"{key}: {rows} rows do not split into three")
                sizes = (rows // 3,) * 3
            links.append(split(key, [f"{diff}to_{p}.weight" for p in "qkv"], sizes))
        else:
            links.append(same(key, _renamed(key, rules)))
    check_unique(links)
    return links


def lumina2_links(shapes: Mapping[str, Tuple[int, ...]]) -> List[Link]:
    return _lumina_family_links(shapes, LUMINA2_TOP, LUMINA2_RENAMES, kv_from_out=True)


def z_image_links(shapes: Mapping[str, Tuple[int, ...]]) -> List[Link]:
    return _lumina_family_links(shapes, Z_IMAGE_TOP, Z_IMAGE_RENAMES, kv_from_out=False)


def lumina_probe(shapes: Mapping[str, Tuple[int, ...]], back) -> Dict[str, Tuple[int, ...]]:
    """The single-file keys and shapes a Lumina2/Z-Image diffusers component stands for (the
    q, k, v parts fused back into one qkv)."""
    probe: Dict[str, Tuple[int, ...]] = {}
    for key, shape in shapes.items():
        single = _renamed(key, back)
        for p in "qkv":
            tail = f".attention.to_{p}.weight"
            if single.endswith(tail):
                fused = single[: -len(tail)] + ".attention.qkv.weight"
                rows = probe.get(fused, (0,) + tuple(shape[1:]))[0] + shape[0]
                probe[fused] = (rows,) + tuple(shape[1:])
                break
        else:
            probe[single] = tuple(shape)
    return probe


def _head_dim(shapes, block: str) -> int:
    key = f"{block}.attention.q_norm.weight"
    if key not in shapes:
        raise GeometryError(f"no {key}: the head width is unknown")
    return shapes[key][0]


def lumina2_config(shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
    """Lumina2Transformer2DModel config.json (defaults: diffusers 0.42.1 transformer_lumina2.py)."""
    width, patch_in = shapes["x_embedder.weight"]
    hd = _head_dim(shapes, "layers.0")
    q = shapes["layers.0.attention.out.weight"][1]
    kv = (shapes["layers.0.attention.qkv.weight"][0] - q) // 2
    inner = shapes["layers.0.feed_forward.w1.weight"][0]
    base = 4 * width  # LuminaFeedForward: inner 4*dim, times ffn_dim_multiplier, rounded up to multiple_of
    if 256 * ((base + 255) // 256) == inner:
        multiple_of, mult = 256, None
    else:
        multiple_of, mult = inner, (None if base <= inner else (inner + 0.5) / base)
    patch = 2
    out = shapes["final_layer.linear.weight"][0] // (patch * patch)
    return {
        "_class_name": "Lumina2Transformer2DModel", "sample_size": 128, "patch_size": patch,
        "in_channels": patch_in // (patch * patch), "out_channels": out, "hidden_size": width,
        "num_layers": _count(shapes, r"layers\.(\d+)\."), "num_refiner_layers": _count(shapes, r"noise_refiner\.(\d+)\."),
        "num_attention_heads": q // hd, "num_kv_heads": kv // hd, "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
        "norm_eps": 1e-5, "scaling_factor": 1.0, "axes_dim_rope": _rope_axes(hd, (32, 32, 32)),
        "axes_lens": [300, 512, 512], "cap_feat_dim": shapes["cap_embedder.0.weight"][0],
    }


def z_image_config(shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
    """ZImageTransformer2DModel config.json (defaults: diffusers 0.42.1 transformer_z_image.py)."""
    width, patch_in = shapes["x_embedder.weight"]
    hd = _head_dim(shapes, "layers.0")
    heads = shapes["layers.0.attention.qkv.weight"][0] // 3 // hd
    return {
        "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
        "in_channels": patch_in // 4, "dim": width, "n_layers": _count(shapes, r"layers\.(\d+)\."),
        "n_refiner_layers": _count(shapes, r"noise_refiner\.(\d+)\."), "n_heads": heads, "n_kv_heads": heads,
        "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": shapes["cap_embedder.0.weight"][0], "rope_theta": 256.0,
        "t_scale": 1000.0, "axes_dims": _rope_axes(hd, (32, 48, 48)), "axes_lens": [1024, 512, 512],
    }


def _rope_axes(head_dim: int, released: Tuple[int, ...]) -> List[int]:
    """The rotary axes of the released models (their head width); others cannot be guessed."""
    if sum(released) != head_dim:
        raise GeometryError(f"head width {head_dim}: the rotary axes are known only for the released "
                            f"width {sum(released)} ({list(released)})")
    return list(released)
