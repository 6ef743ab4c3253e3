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
