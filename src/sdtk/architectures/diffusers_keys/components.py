"""One row per kind of component: how its links and its config.json are built, from the single
file's shapes (writing a folder) or from the folder's own keys (reading one back)."""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

from sdtk.architectures.diffusers_keys import dit, text, unet, vae
from sdtk.architectures.diffusers_keys.links import Link

Shapes = Mapping[str, Tuple[int, ...]]


def links_from_single(kind: str, shapes: Shapes, options: Mapping) -> List[Link]:
    """The links of a component from its single-file keys (prefix removed) and shapes."""
    if kind == "unet":
        return unet.unet_links(unet.geometry_from_ldm(shapes))
    if kind == "vae":
        return vae.vae_links(vae.geometry_from_ldm(shapes))
    if kind == "clip-hf":
        links = text.hf_clip_links(shapes)
        if options.get("identity_projection"):  # the file's projection stays in the sidecar
            links = [link for link in links if link.single != "text_projection.weight"]
        return links
    if kind == "open-clip":
        n = text.open_clip_layers(shapes)
        return text.open_clip_links(shapes, n - options.get("drop_last_layers", 0), options.get("projection", False))
    if kind == "t5":
        return text.t5_links(shapes)
    if kind == "sd3":
        return dit.sd3_links(shapes)
    if kind == "flux":
        return dit.flux_links(shapes)
    if kind == "lumina2":
        return dit.lumina2_links(shapes)
    if kind == "z-image":
        return dit.z_image_links(shapes)
    if kind == "identity":
        return [Link(k, (k,)) for k in shapes]
    raise KeyError(kind)


def links_from_diffusers(kind: str, shapes: Shapes, config: Mapping, options: Mapping) -> List[Link]:
    """The links of a component from its diffusers keys and config.json (reading a folder)."""
    if kind == "unet":
        return unet.unet_links(unet.geometry_from_config(config))
    if kind == "vae":
        return vae.vae_links(vae.geometry_from_config(config))
    if kind in ("clip-hf", "t5", "identity"):
        return [Link(k, (k,)) for k in shapes]
    if kind == "open-clip":
        n = unet._count(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
        probe = {"token_embedding.weight": shapes["text_model.embeddings.token_embedding.weight"]}
        return text.open_clip_links(probe, n, "text_projection.weight" in shapes)
    if kind == "sd3":
        return dit.sd3_links(_sd3_probe(shapes))
    if kind == "flux":
        return dit.flux_links(_flux_probe(shapes))
    if kind == "lumina2":
        return dit.lumina2_links(dit.lumina_probe(shapes, dit.LUMINA2_BACK))
    if kind == "z-image":
        return dit.z_image_links(dit.lumina_probe(shapes, dit.Z_IMAGE_BACK))
    raise KeyError(kind)


def _sd3_probe(shapes: Shapes) -> Dict[str, Tuple[int, ...]]:
    """The single-file keys that decide the SD3 links (depth, width, qk-norm, dual attention,
    pos_embed), recovered from the diffusers keys."""
    probe: Dict[str, Tuple[int, ...]] = {"x_embedder.proj.weight": shapes["pos_embed.proj.weight"]}
    if "pos_embed.pos_embed" in shapes:
        probe["pos_embed"] = shapes["pos_embed.pos_embed"]
    for k in shapes:
        m = re.match(r"transformer_blocks\.(\d+)\.(attn\.norm_q|attn2\.to_q|attn2\.norm_q)\.weight$", k)
        if m:
            i, part = m.groups()
            single = {"attn.norm_q": "x_block.attn.ln_q", "attn2.to_q": "x_block.attn2.qkv",
                      "attn2.norm_q": "x_block.attn2.ln_q"}[part]
            probe[f"joint_blocks.{i}.{single}.weight"] = (0,)
        m = re.match(r"transformer_blocks\.(\d+)\.", k)
        if m:
            probe.setdefault(f"joint_blocks.{m.group(1)}.", (0,))
    return probe


def _flux_probe(shapes: Shapes) -> Dict[str, Tuple[int, ...]]:
    probe: Dict[str, Tuple[int, ...]] = {"img_in.weight": shapes["x_embedder.weight"]}
    if "time_text_embed.guidance_embedder.linear_1.weight" in shapes:
        probe["guidance_in.in_layer.weight"] = (0,)
    for k, s in shapes.items():
        m = re.match(r"(single_)?transformer_blocks\.(\d+)\.", k)
        if m:
            probe.setdefault(f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}.", (0,))
        m = re.match(r"single_transformer_blocks\.(\d+)\.proj_mlp\.weight$", k)
        if m:
            probe[f"single_blocks.{m.group(1)}.linear1.weight"] = (3 * probe["img_in.weight"][0] + s[0],)
    return probe


def config_for(kind: str, single_shapes: Shapes, diffusers_shapes: Shapes, family: str, options: Mapping,
               torch_dtype: str) -> Dict:
    """config.json of a component (generated from its shapes and the family; no hub)."""
    if kind == "unet":
        g = unet.geometry_from_ldm(single_shapes)
        return unet.unet_config(g, fixed_heads=options.get("fixed_heads"), sample_size=options["sample_size"],
                                upcast_attention=options.get("upcast_attention", False))
    if kind == "vae":
        return vae.vae_config(vae.geometry_from_ldm(single_shapes), family, options.get("vae_sample_size", 512))
    if kind in ("clip-hf", "open-clip"):
        return text.clip_config(diffusers_shapes, hidden_act=options["hidden_act"], projection=options.get("projection", False),
                                torch_dtype=torch_dtype)
    if kind == "t5":
        return text.t5_config(diffusers_shapes, torch_dtype)
    if kind == "sd3":
        return dit.sd3_config(single_shapes)
    if kind == "flux":
        return dit.flux_config(single_shapes)
    if kind == "lumina2":
        return dit.lumina2_config(single_shapes)
    if kind == "z-image":
        return dit.z_image_config(single_shapes)
    raise KeyError(kind)
