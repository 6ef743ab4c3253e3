"""LoRA module names -> checkpoint weights: an alias table built from the base's own keys.

A LoRA file names modules (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
`unet.down_blocks.0.attentions.0...to_q`, `transformer.single_transformer_blocks.0.attn.to_q`...).
Parsing such a name is ambiguous (`_` is both a separator and part of names), so, as ComfyUI
(`comfy/lora.py::model_lora_keys_unet/_clip`) and A1111 (`networks.py::
assign_network_names_to_compvis_modules`) do, we go the other way: enumerate the checkpoint's keys,
generate every name each module is known by, and look LoRA names up in that table. Nothing here
opens a file: the input is a {key: shape} mapping.

A target may be a row slice of a fused weight (OpenCLIP `attn.in_proj_weight` = [q; k; v], FLUX
`img_attn.qkv`, `single_blocks.N.linear1` = [q; k; v; mlp]), the transpose of the weight (OpenCLIP
`text_projection` is used as x @ P, HF stores P^T) or its rows with the two halves swapped
(diffusers orders FLUX's final adaLN modulation (scale, shift), BFL (shift, scale):
`comfy/utils.py::swap_scale_shift`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's update goes: a weight key (and its bias), maybe a row slice."""

    weight: str
    bias: Optional[str] = None
    rows: Optional[Tuple[int, int]] = None  # (offset, length) along dim 0
    transpose: bool = False  # the update applies to weight.T (OpenCLIP text_projection)
    swap_halves: bool = False  # the update's rows are (scale, shift); the weight's (shift, scale)
    component: str = "unet"  # "unet" (UNet / DiT) or the text encoder ("te1", "te2", "te3")


# ---------------------------------------------------------------------------------------------
# Components: where each part of a checkpoint lives, and the LoRA prefixes that name it.
# Sources: ComfyUI comfy/lora.py model_lora_keys_clip (lora_te_ / lora_te1_ -> CLIP-L, lora_te2_ ->
# CLIP-G when CLIP-L exists else lora_te_ (SDXL refiner), lora_te3_ -> T5 in kohya FLUX/SD3
# (sd-scripts networks/lora_flux.py, lora_sd3.py LORA_PREFIX_TEXT_ENCODER_T5), text_encoder(_2)(_3).
# diffusers names (diffusers loaders/lora_pipeline.py: FLUX's text_encoder_2 is T5, SD3's is CLIP-G).
# ComfyUI's generic TE names `text_encoders.clip_{l,h,g}.transformer.` + HF path (comfy/lora.py
# model_lora_keys_clip over its clip_l / clip_h (SD2) / clip_g state dicts, as its LoraSave writes).

UNET_PREFIXES = ("model.diffusion_model.",)
# (checkpoint prefix of the HF-layout text model, component, kohya prefixes, diffusers prefixes).
# `{t5}` is text_encoder_3 when a CLIP-G is present (SD3), else text_encoder_2 (FLUX).
HF_TEXT_ENCODERS = (
    ("cond_stage_model.transformer.", "te1", ("lora_te_", "lora_te1_"), ("text_encoder.", "text_encoders.clip_l.transformer.")),  # SD1 CLIP-L
    ("conditioner.embedders.0.transformer.", "te1", ("lora_te1_", "lora_te_"), ("text_encoder.", "text_encoders.clip_l.transformer.")),  # SDXL CLIP-L
    ("text_encoders.clip_l.transformer.", "te1", ("lora_te1_", "lora_te_"), ("text_encoder.",)),  # ComfyUI SD3/FLUX
    ("text_encoders.clip_g.transformer.", "te2", ("lora_te2_",), ("text_encoder_2.",)),  # ComfyUI SD3
    ("text_encoders.t5xxl.transformer.", "te3", ("lora_te3_",), ("{t5}",)),  # ComfyUI SD3/FLUX
)
# OpenCLIP text models stored in the LDM layout (fused attention): SD2 (OpenCLIP-H), SDXL te2
# (OpenCLIP-bigG). LoRAs name them with HF CLIP names (kohya trains on transformers' CLIPTextModel).
OPENCLIP_TEXT_ENCODERS = (
    ("cond_stage_model.model.", "te1", ("lora_te_", "lora_te1_"), ("text_encoder.", "text_encoders.clip_h.transformer.")),  # SD2
    ("conditioner.embedders.1.model.", "te2", ("lora_te2_",), ("text_encoder_2.", "text_encoders.clip_g.transformer.")),  # SDXL
)
# SDXL refiner: only the OpenCLIP-bigG, which LoRAs call lora_te_ / text_encoder.
REFINER_OPENCLIP = ("conditioner.embedders.0.model.", "te1", ("lora_te_", "lora_te1_"), ("text_encoder.", "text_encoders.clip_g.transformer."))

# OpenCLIP -> HF CLIP module names inside one layer. Sources: A1111 networks.py
# convert_diffusers_name_to_compvis (SD2 `mlp_fc1 -> mlp_c_fc`, `self_attn -> attn`, q/k/v onto
# in_proj), sd-mecha convert_sdxl_diffusers_clip_g_to_original.py.
OPENCLIP_LAYER_MODULES = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
OPENCLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # rows of attn.in_proj_weight


def under(name: str) -> str:
    """kohya's naming rule: every '.' becomes '_' (sd-scripts networks/lora.py create_modules)."""
    return name.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# SD UNets: LDM (checkpoint) module path -> diffusers module path, derived from the base's keys
# (so any depth / channel multiplier works: SD1, SD2, SDXL and the scaled-down test UNets).
# Source: the diffusers <-> LDM correspondence of diffusers scripts/convert_original_stable_
# diffusion_to_diffusers.py (renew_resnet_paths, assign_to_checkpoint), ComfyUI comfy/utils.py
# unet_to_diffusers, A1111 convert_diffusers_name_to_compvis.

RESNET_PARTS = {  # LDM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
UNET_TOP = {  # top-level LDM modules -> diffusers
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.*)$")


def _is_resblock(subkeys: Iterable[str]) -> bool:
    return any(s.startswith("in_layers.") for s in subkeys)


def sd_unet_to_diffusers(modules: Iterable[str]) -> Dict[str, str]:
    """{LDM module path (no `model.diffusion_model.`): diffusers module path} for an SD-family UNet."""
    modules = list(modules)
    parts: Dict[Tuple[str, int, int], List[str]] = {}
    for m in modules:
        hit = _BLOCK.match(m)
        if hit:
            parts.setdefault((hit.group(1), int(hit.group(2)), int(hit.group(3))), []).append(hit.group(4))
    block_prefix: Dict[Tuple[str, int, int], str] = {}
    for side, diff_side, sampler in (("input_blocks", "down_blocks", "downsamplers"), ("output_blocks", "up_blocks", "upsamplers")):
        indices = sorted({i for (s, i, _) in parts if s == side})
        level, j = 0, 0
        for i in indices:
            if side == "input_blocks" and i == 0:
                continue
            subs = sorted(sub for (s, ii, sub) in parts if s == side and ii == i)
            if side == "input_blocks" and subs == [0] and any(p == "op" or p.startswith("op.") for p in parts[(side, i, 0)]):
                block_prefix[(side, i, 0)] = f"{diff_side}.{level}.{sampler}.0"  # Downsample: `op` is its conv
                level, j = level + 1, 0
                continue
            upsample = None
            for sub in subs:
                p = parts[(side, i, sub)]
                if _is_resblock(p):
                    block_prefix[(side, i, sub)] = f"{diff_side}.{level}.resnets.{j}"
                elif any(x == "conv" or x.startswith("conv.") for x in p) and side == "output_blocks":
                    upsample = sub
                    block_prefix[(side, i, sub)] = f"{diff_side}.{level}.{sampler}.0"
                else:
                    block_prefix[(side, i, sub)] = f"{diff_side}.{level}.attentions.{j}"
            j += 1
            if upsample is not None:
                level, j = level + 1, 0
    out: Dict[str, str] = {}
    for m in modules:
        if m in UNET_TOP:
            out[m] = UNET_TOP[m]
            continue
        hit = _BLOCK.match(m)
        if hit:
            key = (hit.group(1), int(hit.group(2)), int(hit.group(3)))
            prefix, rest = block_prefix.get(key), hit.group(4)
            if prefix is None:
                continue
            if ".resnets." in prefix:
                rest = _resnet_rest(rest)
            elif prefix.endswith("samplers.0") and rest.startswith("op"):
                rest = "conv" + rest[2:]
            if rest is not None:
                out[m] = f"{prefix}.{rest}"
            continue
        hit = _MIDDLE.match(m)
        if hit:
            idx, rest = int(hit.group(1)), hit.group(2)
            if rest.startswith(("in_layers.", "out_layers.", "emb_layers.", "skip_connection")):
                rest = _resnet_rest(rest)
                if rest is not None:
                    out[m] = f"mid_block.resnets.{idx // 2}.{rest}"
            else:
                out[m] = f"mid_block.attentions.{(idx - 1) // 2}.{rest}"
    return out


def _resnet_rest(rest: str) -> Optional[str]:
    for ldm, diff in RESNET_PARTS.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm):]
    return None


# ---------------------------------------------------------------------------------------------
# FLUX: diffusers (ai-toolkit, SimpleTuner, diffusers) module names -> BFL modules and row slices.
# Source: ComfyUI comfy/utils.py flux_to_diffusers; diffusers FluxTransformer2DModel module names.

FLUX_DOUBLE = (  # (diffusers name inside transformer_blocks.N, BFL name inside double_blocks.N, slice index of [q,k,v] or None)
    ("attn.to_q", "img_attn.qkv", 0), ("attn.to_k", "img_attn.qkv", 1), ("attn.to_v", "img_attn.qkv", 2),
    ("attn.add_q_proj", "txt_attn.qkv", 0), ("attn.add_k_proj", "txt_attn.qkv", 1), ("attn.add_v_proj", "txt_attn.qkv", 2),
    ("attn.to_out.0", "img_attn.proj", None), ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None), ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None), ("ff_context.net.2", "txt_mlp.2", None),
    ("norm1.linear", "img_mod.lin", None), ("norm1_context.linear", "txt_mod.lin", None),
    ("attn.norm_q", "img_attn.norm.query_norm", None), ("attn.norm_k", "img_attn.norm.key_norm", None),
    ("attn.norm_added_q", "txt_attn.norm.query_norm", None), ("attn.norm_added_k", "txt_attn.norm.key_norm", None),
)
FLUX_SINGLE = (  # inside single_transformer_blocks.N / single_blocks.N; linear1 rows = [q; k; v; mlp]
    ("attn.to_q", "linear1", 0), ("attn.to_k", "linear1", 1), ("attn.to_v", "linear1", 2), ("proj_mlp", "linear1", 3),
    ("proj_out", "linear2", None), ("norm.linear", "modulation.lin", None),
    ("attn.norm_q", "norm.query_norm", None), ("attn.norm_k", "norm.key_norm", None),
)
FLUX_TOP = (  # (diffusers, BFL, swap_halves)
    ("x_embedder", "img_in", False), ("context_embedder", "txt_in", False),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", False),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", False),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", False),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", False),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", False),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", False),
    ("proj_out", "final_layer.linear", False),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", True),
)
# XLabs FLUX LoRAs (double blocks only). Source: diffusers _convert_xlabs_flux_lora_to_diffusers.
XLABS_DOUBLE = (("processor.qkv_lora1", "img_attn.qkv"), ("processor.qkv_lora2", "txt_attn.qkv"),
                ("processor.proj_lora1", "img_attn.proj"), ("processor.proj_lora2", "txt_attn.proj"))


def flux_diffusers_map(shapes: Mapping[str, Shape]) -> Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]]:
    """{diffusers module: (BFL module, rows or None, swap_halves)}, from a FLUX DiT's {module: weight shape}."""
    out: Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]] = {}
    for diff, bfl, swap in FLUX_TOP:
        if bfl in shapes:
            out[diff] = (bfl, None, swap)
    for m, shape in shapes.items():
        hit = re.match(r"^double_blocks\.(\d+)\.(.*)$", m)
        if hit:
            n, rest = hit.groups()
            for diff, bfl, part in FLUX_DOUBLE:
                if rest == bfl:
                    rows = None if part is None else (part * (shape[0] // 3), shape[0] // 3)
                    out[f"transformer_blocks.{n}.{diff}"] = (m, rows, False)
            continue
        hit = re.match(r"^single_blocks\.(\d+)\.(.*)$", m)
        if hit:
            n, rest = hit.groups()
            hidden = shapes.get(f"single_blocks.{n}.linear2", (None, None))[0]
            for diff, bfl, part in FLUX_SINGLE:
                if rest != bfl:
                    continue
                rows = None
                if part is not None:
                    if not hidden:
                        continue
                    rows = (part * hidden, hidden) if part < 3 else (3 * hidden, shape[0] - 3 * hidden)
                out[f"single_transformer_blocks.{n}.{diff}"] = (m, rows, False)
    return out


# SD3 / SD3.5 MMDiT: diffusers (diffusers' SD3 LoRA trainer, SimpleTuner, OneTrainer) module names ->
# the single-file (SAI) modules and row slices. Source: ComfyUI comfy/utils.py MMDIT_MAP_BASIC,
# MMDIT_MAP_BLOCK, mmdit_to_diffusers; diffusers SD3Transformer2DModel module names.
SD3_BLOCK = (  # (diffusers name inside transformer_blocks.N, SAI name inside joint_blocks.N, slice index of [q,k,v] or None)
    ("attn.to_q", "x_block.attn.qkv", 0), ("attn.to_k", "x_block.attn.qkv", 1), ("attn.to_v", "x_block.attn.qkv", 2),
    ("attn.add_q_proj", "context_block.attn.qkv", 0), ("attn.add_k_proj", "context_block.attn.qkv", 1),
    ("attn.add_v_proj", "context_block.attn.qkv", 2),
    ("attn2.to_q", "x_block.attn2.qkv", 0), ("attn2.to_k", "x_block.attn2.qkv", 1), ("attn2.to_v", "x_block.attn2.qkv", 2),  # SD3.5 MMDiT-X
    ("attn.to_out.0", "x_block.attn.proj", None), ("attn.to_add_out", "context_block.attn.proj", None),
    ("attn2.to_out.0", "x_block.attn2.proj", None),
    ("ff.net.0.proj", "x_block.mlp.fc1", None), ("ff.net.2", "x_block.mlp.fc2", None),
    ("ff_context.net.0.proj", "context_block.mlp.fc1", None), ("ff_context.net.2", "context_block.mlp.fc2", None),
    ("norm1.linear", "x_block.adaLN_modulation.1", None), ("norm1_context.linear", "context_block.adaLN_modulation.1", None),
    ("attn.norm_q", "x_block.attn.ln_q", None), ("attn.norm_k", "x_block.attn.ln_k", None),
    ("attn.norm_added_q", "context_block.attn.ln_q", None), ("attn.norm_added_k", "context_block.attn.ln_k", None),
    ("attn2.norm_q", "x_block.attn2.ln_q", None), ("attn2.norm_k", "x_block.attn2.ln_k", None),
)
SD3_TOP = (  # (diffusers, SAI, swap_halves)
    ("pos_embed.proj", "x_embedder.proj", False), ("context_embedder", "context_embedder", False),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", False),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", False),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0", False),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", False),
    ("proj_out", "final_layer.linear", False),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", True),
)


def sd3_diffusers_map(shapes: Mapping[str, Shape]) -> Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]]:
    """{diffusers module: (SAI module, rows or None, swap_halves)}, from an MMDiT's {module: weight shape}.
    The last block's context adaLN is pre-only (shift, scale: 2 chunks); diffusers' AdaLayerNormContinuous
    there orders them (scale, shift), so its halves swap as the final layer's do."""
    out: Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]] = {}
    for diff, sai, swap in SD3_TOP:
        if sai in shapes:
            out[diff] = (sai, None, swap)
    for m, shape in shapes.items():
        hit = re.match(r"^joint_blocks\.(\d+)\.(.*)$", m)
        if not hit:
            continue
        n, rest = hit.groups()
        pre_only = f"joint_blocks.{n}.context_block.attn.proj" not in shapes
        for diff, sai, part in SD3_BLOCK:
            if rest == sai:
                rows = None if part is None else (part * (shape[0] // 3), shape[0] // 3)
                swap = pre_only and sai == "context_block.adaLN_modulation.1"
                out[f"transformer_blocks.{n}.{diff}"] = (m, rows, swap)
    return out


# ---------------------------------------------------------------------------------------------
# The table.

@dataclass
class AliasTable:
    names: Dict[str, Target]
    ambiguous: Dict[str, List[Target]]
    family: Optional[str]  # "sd", "flux", "sd3", "other" (what the UNet/DiT looks like), None if no UNet/DiT
    unet_prefix: Optional[str]  # "model.diffusion_model." or "" (a stand-alone UNet/DiT file)

    def resolve(self, module: str) -> Optional[Target]:
        """The target of a LoRA module name, or None. Raw PEFT dumps' `base_model.model.` is ignored."""
        hit = self.names.get(module)
        if hit is None and module.startswith("base_model.model."):
            hit = self.names.get(module[len("base_model.model."):])
        return hit


def _module_keys(shapes: Mapping[str, Shape]) -> Dict[str, Tuple[str, Optional[str]]]:
    """{module path: (weight key, bias key)}; parameters without `.weight` are modules of their own."""
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for k in shapes:
        if k.endswith(".weight"):
            m = k[: -len(".weight")]
            b = m + ".bias"
            out[m] = (k, b if b in shapes else None)
    for k in shapes:
        if not k.endswith((".weight", ".bias")) and not k.endswith("_weight") and not k.endswith("_bias"):
            out.setdefault(k, (k, None))
    return out


def _stand_alone_unet(keys: Iterable[str]) -> bool:
    """A file holding only a UNet / DiT (ComfyUI models/unet, diffusion_models): no component prefixes."""
    starts = ("input_blocks.", "double_blocks.", "joint_blocks.", "transformer_blocks.", "layers.", "blocks.")
    return any(k.startswith(starts) for k in keys)


def build_alias_table(shapes: Mapping[str, Shape]) -> AliasTable:
    """Every LoRA name of every module of a checkpoint (or stand-alone UNet/DiT) with {key: shape}."""
    names: Dict[str, Target] = {}
    ambiguous: Dict[str, List[Target]] = {}

    def add(name: str, target: Target) -> None:
        old = names.get(name)
        if old is None:
            if name not in ambiguous:
                names[name] = target
        elif old != target:
            ambiguous.setdefault(name, [old]).append(target)
            del names[name]

    keys = list(shapes)
    unet_prefix = next((p for p in UNET_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if unet_prefix is None and _stand_alone_unet(keys):
        unet_prefix = ""
    modules = _module_keys(shapes)
    family = None
    if unet_prefix is not None:
        unet = {m[len(unet_prefix):]: wb for m, wb in modules.items() if m.startswith(unet_prefix)
                and not m[len(unet_prefix):].startswith(("text_encoders.", "vae.", "first_stage_model.", "conditioner.", "cond_stage_model."))}
        family = _unet_family(unet)
        for rel, (w, b) in unet.items():
            t = Target(w, b)
            # kohya (lora_unet_ + path with '_'), ComfyUI/BFL generic (diffusion_model.), bare names
            # (stand-alone DiT LoRAs, Qwen-Image), diffusers-named DiTs whose native names are the
            # diffusers names (Qwen-Image, Z-Image: transformer., lycoris_), the full key.
            for alias in ("lora_unet_" + under(rel), "diffusion_model." + rel, rel, unet_prefix + rel,
                          "transformer." + rel, "lycoris_" + under(rel), "lora_transformer_" + under(rel)):
                add(alias, t)
        if family == "sd":
            for ldm, diff in sd_unet_to_diffusers(unet).items():
                w, b = unet[ldm]
                t = Target(w, b)
                for alias in ("lora_unet_" + under(diff), "unet." + diff, "lycoris_" + under(diff)):
                    add(alias, t)
                # the old diffusers attention-processor format (attn1.processor.to_q_lora...)
                old = re.sub(r"\.(attn[12])\.(to_[qkv]|to_out)(\.0)?$", r".\1.processor.\2", diff)
                if old != diff:
                    add(old, t)
                    add("unet." + old, t)
        elif family == "flux":
            for diff, (bfl, rows, swap) in flux_diffusers_map({m: shapes[wb[0]] for m, wb in unet.items()}).items():
                w, b = unet[bfl]
                t = Target(w, b, rows=rows, swap_halves=swap)
                for alias in ("transformer." + diff, "lora_transformer_" + under(diff), "lycoris_" + under(diff), diff):
                    add(alias, t)
            for m in unet:
                hit = re.match(r"^double_blocks\.(\d+)\.(.*)$", m)
                if hit:
                    for xlabs, bfl in XLABS_DOUBLE:
                        if hit.group(2) == bfl:
                            add(f"double_blocks.{hit.group(1)}.{xlabs}", Target(*unet[m]))
        elif family == "sd3":
            # diffusers / SimpleTuner (transformer.), OneTrainer (lora_transformer_), SimpleTuner LyCORIS
            # (lycoris_), raw PEFT dumps (base_model.model., stripped by resolve): ComfyUI lora.py's SD3 keys
            for diff, (sai, rows, swap) in sd3_diffusers_map({m: shapes[wb[0]] for m, wb in unet.items()}).items():
                w, b = unet[sai]
                t = Target(w, b, rows=rows, swap_halves=swap)
                for alias in ("transformer." + diff, "lora_transformer_" + under(diff), "lycoris_" + under(diff), diff):
                    add(alias, t)
    _add_text_encoders(modules, shapes, add)
    for m, (w, b) in modules.items():  # any module by its own path (raw PEFT dumps, full-key LoRAs)
        if m not in names and m not in ambiguous:
            add(m, Target(w, b, component="te1" if name_component(m) == "te" or m.startswith(_TE_KEY_PREFIXES) else "unet"))
    return AliasTable(names, ambiguous, family, unet_prefix)


_TE_KEY_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")


def _unet_family(unet: Mapping[str, object]) -> Optional[str]:
    if not unet:
        return None
    if any(m.startswith("double_blocks.") for m in unet):
        return "flux"
    if any(m.startswith("joint_blocks.") for m in unet):
        return "sd3"
    if any(m.startswith("input_blocks.") for m in unet):
        return "sd"
    return "other"


def _add_text_encoders(modules, shapes, add) -> None:
    keys = list(shapes)
    has_clip_g = any(k.startswith("text_encoders.clip_g.") for k in keys)
    t5_diffusers = "text_encoder_3." if has_clip_g else "text_encoder_2."
    for prefix, comp, kohya, diffusers in HF_TEXT_ENCODERS:
        for m, (w, b) in modules.items():
            if not m.startswith(prefix):
                continue
            inner = m[len(prefix):]
            t = Target(w, b, component=comp)
            for alias in _te_aliases(inner, kohya, [d.replace("{t5}", t5_diffusers) for d in diffusers]):
                add(alias, t)
            if m.startswith("text_encoders."):
                add(m, t)  # ComfyUI's generic TE format: the checkpoint key minus `.weight`
    openclip = list(OPENCLIP_TEXT_ENCODERS)
    if any(k.startswith(REFINER_OPENCLIP[0]) for k in keys):
        openclip.append(REFINER_OPENCLIP)
    for prefix, comp, kohya, diffusers in openclip:
        for inner, t in _openclip_targets(prefix, shapes, comp).items():
            for alias in _te_aliases(inner, kohya, list(diffusers)):
                add(alias, t)


def _te_aliases(inner: str, kohya: Iterable[str], diffusers: Iterable[str]) -> List[str]:
    """Names of an HF CLIP/T5 module (`text_model.encoder.layers.0.self_attn.q_proj`) in LoRA files:
    kohya `lora_te*_` + path with '_', diffusers `text_encoder*.` + path; also without `text_model.`
    (transformers >= 5.6 dropped that level: sdnext PR #4987)."""
    inners = [inner] + ([inner[len("text_model."):]] if inner.startswith("text_model.") else [])
    out = []
    for i in inners:
        out += [k + under(i) for k in kohya] + [d + i for d in diffusers]
    return out


def _openclip_targets(prefix: str, shapes: Mapping[str, Shape], comp: str) -> Dict[str, Target]:
    """{HF CLIP module path: Target} for an OpenCLIP text model stored under `prefix`."""
    out: Dict[str, Target] = {}
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for k, shape in shapes.items():
        hit = pat.match(k)
        if not hit:
            continue
        n, rest = hit.groups()
        layer = f"text_model.encoder.layers.{n}."
        if rest == "attn.in_proj_weight":
            third = shape[0] // 3
            bias = k[: -len("weight")] + "bias"
            for i, name in enumerate(OPENCLIP_QKV):
                out[layer + name] = Target(k, bias if bias in shapes else None, rows=(i * third, third), component=comp)
        elif rest.endswith(".weight"):
            mod = rest[: -len(".weight")]
            if mod in OPENCLIP_LAYER_MODULES:
                b = k[: -len("weight")] + "bias"
                out[layer + OPENCLIP_LAYER_MODULES[mod]] = Target(k, b if b in shapes else None, component=comp)
    for ldm, hf, transpose in (("ln_final", "text_model.final_layer_norm", False),):
        if prefix + ldm + ".weight" in shapes:
            b = prefix + ldm + ".bias"
            out[hf] = Target(prefix + ldm + ".weight", b if b in shapes else None, transpose=transpose, component=comp)
    if prefix + "text_projection" in shapes:  # OpenCLIP x @ P; HF text_projection.weight = P^T (OneTrainer lora_te2_text_projection)
        out["text_projection"] = Target(prefix + "text_projection", None, transpose=True, component=comp)
    if prefix + "token_embedding.weight" in shapes:
        out["text_model.embeddings.token_embedding"] = Target(prefix + "token_embedding.weight", None, component=comp)
    return out


# What a LoRA module name says about the component it was made for, whether or not it resolves
# (for "made for another architecture" reports). Sources: §1.1 prefix table of the LoRA reference.
TE_NAME_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_prior_te_")
UNET_NAME_PREFIXES = ("lora_unet_", "unet.", "transformer.", "diffusion_model.", "lora_transformer_", "lycoris_",
                      "double_blocks.", "single_blocks.", "lora_prior_unet_", "base_model.model.", "oft_unet_")


def name_component(module: str) -> str:
    """"te" or "unet" from a LoRA module name's prefix (bare DiT names count as "unet")."""
    return "te" if module.startswith(TE_NAME_PREFIXES) else "unet"
