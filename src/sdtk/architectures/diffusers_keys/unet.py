"""SD1.x / SD2.x / SDXL (base, refiner, inpainting) UNet: LDM `model.diffusion_model.*` keys <->
diffusers `UNet2DConditionModel`, driven by the UNet's geometry (levels, layers per block, which
levels have attention, transformer depth per level), never by a fixed number of blocks.

The geometry is read from the single file's shapes (`geometry_from_ldm`) or from a diffusers
`config.json` (`geometry_from_config`); `unet_links(geometry)` gives every link and
`unet_config(geometry, ...)` the config.json diffusers needs.
Sources: shared reference diffusers-interop.md 1.2 (block index formulas, resnet and transformer
names) and 2.2 (configs); diffusers 0.42.1 `create_unet_diffusers_config_from_ldm` and
`UNet2DConditionModel` (what each config key means); ComfyUI `comfy/utils.py unet_to_diffusers`
(the same formulas iterated per level).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from sdtk.architectures.diffusers_keys.links import Link, check_unique, same, weight_and_bias

# LDM ResBlock -> diffusers ResnetBlock2D (diffusers-interop.md 1.2 "Inside a resnet").
RESNET_PARTS = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
# SpatialTransformer: same names on both sides; per transformer block (with bias?).
TRANSFORMER_BLOCK_PARTS = (("attn1.to_q", False), ("attn1.to_k", False), ("attn1.to_v", False), ("attn1.to_out.0", True),
                           ("attn2.to_q", False), ("attn2.to_k", False), ("attn2.to_v", False), ("attn2.to_out.0", True),
                           ("ff.net.0.proj", True), ("ff.net.2", True), ("norm1", True), ("norm2", True), ("norm3", True))


@dataclass(frozen=True)
class UNetGeometry:
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    attention: Tuple[bool, ...]  # per level, down side (the up side mirrors it)
    depth: Tuple[int, ...]  # transformer blocks per level (0 without attention)
    mid_depth: int
    in_channels: int
    out_channels: int
    context_dim: int
    linear_projection: bool
    adm_in_channels: Optional[int] = None  # SDXL label_emb input (text_time addition embedding)

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


class GeometryError(ValueError):
    """The tensors do not have the block structure of an SD UNet."""


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def geometry_from_ldm(shapes: Mapping[str, Tuple[int, ...]]) -> UNetGeometry:
    """The UNet's geometry from its LDM keys (prefix removed) and shapes."""
    keys = list(shapes)
    if "input_blocks.0.0.weight" not in shapes:
        raise GeometryError("no input_blocks.0.0.weight")
    blocks = _count(keys, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in range(blocks) if f"input_blocks.{i}.0.op.weight" in shapes]
    if not downsamplers:
        raise GeometryError("no downsampling block")
    n = downsamplers[0] - 1
    levels = len(downsamplers) + 1
    if n < 1 or blocks != 1 + levels * n + (levels - 1):
        raise GeometryError(f"{blocks} input blocks do not form levels of equal size")
    chans, attention, depth = [], [], []
    for i in range(levels):
        first = 1 + i * (n + 1)
        chans.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        has = f"input_blocks.{first}.1.proj_in.weight" in shapes
        attention.append(has)
        depth.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") if has else 0)
    ctx_key = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj = next((k for k in keys if k.endswith(".1.proj_in.weight")), None)
    adm = shapes.get("label_emb.0.0.weight")
    return UNetGeometry(
        block_out_channels=tuple(chans), layers_per_block=n, attention=tuple(attention), depth=tuple(depth),
        mid_depth=_count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        in_channels=shapes["input_blocks.0.0.weight"][1], out_channels=shapes["out.2.weight"][0],
        context_dim=shapes[ctx_key][1] if ctx_key else 0,
        linear_projection=bool(proj) and len(shapes[proj]) == 2,
        adm_in_channels=adm[1] if adm else None)


def geometry_from_config(cfg: Mapping) -> UNetGeometry:
    """The geometry a diffusers UNet2DConditionModel config.json describes."""
    chans = tuple(cfg["block_out_channels"])
    levels = len(chans)
    attention = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = tuple(tl) if isinstance(tl, (list, tuple)) else (tl,) * levels
    depth = tuple(d if a else 0 for d, a in zip(tl, attention))
    adm = cfg.get("projection_class_embeddings_input_dim") if cfg.get("addition_embed_type") == "text_time" else None
    return UNetGeometry(chans, cfg.get("layers_per_block", 2), attention, depth, tl[-1], cfg.get("in_channels", 4),
                        cfg.get("out_channels", 4), cfg.get("cross_attention_dim", 1280),
                        bool(cfg.get("use_linear_projection", False)), adm)


def _resnet(ldm: str, diff: str, shortcut: bool) -> List[Link]:
    links = [link for a, b in RESNET_PARTS for link in weight_and_bias(f"{ldm}.{a}", f"{diff}.{b}")]
    if shortcut:
        links += weight_and_bias(f"{ldm}.skip_connection", f"{diff}.conv_shortcut")
    return links


def _transformer(ldm: str, diff: str, depth: int) -> List[Link]:
    links = []
    for part in ("norm", "proj_in", "proj_out"):
        links += weight_and_bias(f"{ldm}.{part}", f"{diff}.{part}")
    for k in range(depth):
        for part, bias in TRANSFORMER_BLOCK_PARTS:
            links += weight_and_bias(f"{ldm}.transformer_blocks.{k}.{part}", f"{diff}.transformer_blocks.{k}.{part}", bias)
    return links


def unet_links(g: UNetGeometry) -> List[Link]:
    """Every LDM <-> diffusers link of a UNet of geometry `g` (diffusers-interop.md 1.2 formulas)."""
    n, L, ch = g.layers_per_block, g.levels, g.block_out_channels
    links: List[Link] = []
    links += weight_and_bias("time_embed.0", "time_embedding.linear_1")
    links += weight_and_bias("time_embed.2", "time_embedding.linear_2")
    if g.adm_in_channels:
        links += weight_and_bias("label_emb.0.0", "add_embedding.linear_1")
        links += weight_and_bias("label_emb.0.2", "add_embedding.linear_2")
    links += weight_and_bias("input_blocks.0.0", "conv_in")
    for i in range(L):
        for j in range(n):
            block = 1 + i * (n + 1) + j
            in_ch = ch[i - 1] if (j == 0 and i > 0) else ch[i]
            links += _resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", in_ch != ch[i])
            if g.attention[i]:
                links += _transformer(f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", g.depth[i])
        if i < L - 1:
            links += weight_and_bias(f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    links += _resnet("middle_block.0", "mid_block.resnets.0", False)
    links += _transformer("middle_block.1", "mid_block.attentions.0", g.mid_depth)
    links += _resnet("middle_block.2", "mid_block.resnets.1", False)
    for i in range(L):
        level = L - 1 - i  # up blocks count from the lowest resolution
        for j in range(n + 1):
            block = i * (n + 1) + j
            links += _resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", True)
            if g.attention[level]:
                links += _transformer(f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", g.depth[level])
        if i < L - 1:
            slot = 2 if g.attention[level] else 1
            links += weight_and_bias(f"output_blocks.{i * (n + 1) + n}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    links += weight_and_bias("out.0", "conv_norm_out")
    links += weight_and_bias("out.2", "conv_out")
    check_unique(links)
    return links


def heads(g: UNetGeometry, fixed_heads: Optional[int]) -> List[int]:
    """Attention heads per level: SD1 uses 8 everywhere (v1-inference.yaml num_heads 8), SD2/SDXL
    64-channel heads (num_head_channels 64). diffusers calls this `attention_head_dim`."""
    return [fixed_heads if fixed_heads else max(1, c // 64) for c in g.block_out_channels]


def unet_config(g: UNetGeometry, *, fixed_heads: Optional[int], sample_size: int, upcast_attention: bool = False) -> Dict:
    """config.json of the diffusers UNet2DConditionModel of geometry `g` (values: reference 2.2)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in g.attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(g.attention)]
    # levels without attention take the mid block's depth: diffusers reads the mid depth from the last entry
    tl = [d if a else g.mid_depth for d, a in zip(g.depth, g.attention)]
    h = heads(g, fixed_heads)
    cfg: Dict = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "attention_head_dim": h if not fixed_heads else fixed_heads,
        "block_out_channels": list(g.block_out_channels), "center_input_sample": False,
        "cross_attention_dim": g.context_dim, "down_block_types": down, "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": g.in_channels, "layers_per_block": g.layers_per_block,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": g.out_channels,
        "sample_size": sample_size, "transformer_layers_per_block": tl, "up_block_types": up,
        "use_linear_projection": g.linear_projection, "upcast_attention": upcast_attention,
    }
    if g.adm_in_channels:
        cfg.update({"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": g.adm_in_channels})
    return cfg
