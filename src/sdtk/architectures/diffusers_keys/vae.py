"""AutoencoderKL (SD1/SD2/SDXL 4-channel, SD3/FLUX 16-channel): LDM `first_stage_model.*` /
`vae.*` keys <-> diffusers `vae/`, driven by the VAE's geometry (levels, blocks per level,
quant convs). The mid-block attention projections are 1x1 convs in LDM and linears in diffusers.
Sources: shared reference diffusers-interop.md 1.3 and 2.3; diffusers 0.42.1 AutoencoderKL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

from sdtk.architectures.diffusers_keys.links import Link, check_unique, weight_and_bias
from sdtk.architectures.diffusers_keys.unet import GeometryError, _count

# LDM mid attention -> diffusers Attention (diffusers-interop.md 1.3); the 1x1 conv ones reshape.
MID_ATTENTION = (("norm", "group_norm", "same"), ("q", "to_q", "conv1x1"), ("k", "to_k", "conv1x1"),
                 ("v", "to_v", "conv1x1"), ("proj_out", "to_out.0", "conv1x1"))
# Per-family config values diffusers' AutoencoderKL needs beyond the shapes (reference 2.3).
LATENT_SCALING = {  # latent channels, family -> (scaling_factor, shift_factor)
    "sdxl": (0.13025, None), "sdxl-refiner": (0.13025, None), "sd3": (1.5305, 0.0609), "flux1": (0.3611, 0.1159),
    "lumina2": (0.3611, 0.1159), "z-image": (0.3611, 0.1159),  # both use the FLUX.1 autoencoder
}


@dataclass(frozen=True)
class VaeGeometry:
    block_out_channels: Tuple[int, ...]
    layers_per_block: int  # encoder resnets per level (the decoder has one more)
    in_channels: int
    out_channels: int
    latent_channels: int
    quant_conv: bool

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


def geometry_from_ldm(shapes: Mapping[str, Tuple[int, ...]]) -> VaeGeometry:
    keys = list(shapes)
    if "decoder.conv_in.weight" not in shapes or "encoder.conv_in.weight" not in shapes:
        raise GeometryError("no encoder/decoder conv_in")
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    chans = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels))
    return VaeGeometry(chans, _count(keys, r"encoder\.down\.0\.block\.(\d+)\."), shapes["encoder.conv_in.weight"][1],
                       shapes["decoder.conv_out.weight"][0], shapes["decoder.conv_in.weight"][1],
                       "quant_conv.weight" in shapes)


def geometry_from_config(cfg: Mapping) -> VaeGeometry:
    return VaeGeometry(tuple(cfg["block_out_channels"]), cfg.get("layers_per_block", 2), cfg.get("in_channels", 3),
                       cfg.get("out_channels", 3), cfg.get("latent_channels", 4), cfg.get("use_quant_conv", True))


def _resnet(ldm: str, diff: str, shortcut: bool) -> List[Link]:
    links = [x for p in ("norm1", "conv1", "norm2", "conv2") for x in weight_and_bias(f"{ldm}.{p}", f"{diff}.{p}")]
    return links + (weight_and_bias(f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut") if shortcut else [])


def _mid(side: str, ch: int) -> List[Link]:
    links = _resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
    for a, b, kind in MID_ATTENTION:
        links.append(Link(f"{side}.mid.attn_1.{a}.weight", (f"{side}.mid_block.attentions.0.{b}.weight",), kind))
        links.append(Link(f"{side}.mid.attn_1.{a}.bias", (f"{side}.mid_block.attentions.0.{b}.bias",)))
    return links + _resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)


def vae_links(g: VaeGeometry) -> List[Link]:
    n, L, ch = g.layers_per_block, g.levels, g.block_out_channels
    links: List[Link] = []
    for side in ("encoder", "decoder"):
        links += weight_and_bias(f"{side}.conv_in", f"{side}.conv_in")
    for i in range(L):
        for j in range(n):
            in_ch = ch[i - 1] if (j == 0 and i > 0) else ch[i]
            links += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", in_ch != ch[i])
        if i < L - 1:
            links += weight_and_bias(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    links += _mid("encoder", ch[-1]) + weight_and_bias("encoder.norm_out", "encoder.conv_norm_out")
    links += weight_and_bias("encoder.conv_out", "encoder.conv_out")
    links += _mid("decoder", ch[-1])
    for k in range(L):  # decoder levels are numbered the other way round (reference 1.3)
        up = L - 1 - k
        for j in range(n + 1):
            in_ch = ch[k + 1] if (j == 0 and k < L - 1) else ch[k]
            links += _resnet(f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", in_ch != ch[k])
        if k > 0:
            links += weight_and_bias(f"decoder.up.{k}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    links += weight_and_bias("decoder.norm_out", "decoder.conv_norm_out")
    links += weight_and_bias("decoder.conv_out", "decoder.conv_out")
    if g.quant_conv:
        links += weight_and_bias("quant_conv", "quant_conv") + weight_and_bias("post_quant_conv", "post_quant_conv")
    check_unique(links)
    return links


def vae_config(g: VaeGeometry, family: str, sample_size: int) -> Dict:
    scaling, shift = LATENT_SCALING.get(family, (0.18215, None))
    cfg = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(g.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * g.levels, "up_block_types": ["UpDecoderBlock2D"] * g.levels,
        "in_channels": g.in_channels, "out_channels": g.out_channels, "latent_channels": g.latent_channels,
        "layers_per_block": g.layers_per_block, "norm_num_groups": 32, "sample_size": sample_size,
        "scaling_factor": scaling, "force_upcast": True, "use_quant_conv": g.quant_conv, "use_post_quant_conv": g.quant_conv,
    }
    if shift is not None:
        cfg["shift_factor"] = shift
    return cfg
