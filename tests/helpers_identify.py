"""Test files for `identify` / `sdtk inspect`, built from the real layouts (sdtk.samples) or, for
architectures without a shared layout, synthesised BY RULE from what the detection code of
ComfyUI / diffusers / kohya / LyCORIS shows (each builder says which rule it follows).

Full-size files are sparse (header + zero-filled hole: written in milliseconds, only the header is
ever read). Where values matter (LoRA alpha, position_ids, NaN checks, VAE comparison) the files
are scaled down and carry real values.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sdtk.formats.safetensors import write_safetensors
from sdtk.samples import Layout, layout_plan, load_layout, write_sparse_safetensors
from sdtk.tensors import LazyTensor, dtype

Row = Tuple[str, Tuple[int, ...], str]


def rows_layout(rows: Iterable[Sequence], name: str = "synthetic") -> Layout:
    return Layout(name, "synthetic test layout", tuple((k, tuple(s), d) for k, s, d in rows))


def write_sparse(path: Path, layout_or_rows, metadata: Optional[Dict[str, str]] = None) -> Path:
    layout = layout_or_rows if isinstance(layout_or_rows, Layout) else rows_layout(layout_or_rows)
    write_sparse_safetensors(path, layout, metadata)
    return Path(path)


def write_valued(path: Path, layout_or_rows, values: Optional[Dict[str, np.ndarray]] = None, metadata=None,
                 scale: Optional[int] = None, random: bool = False, seed: int = 0) -> Path:
    """A (small) safetensors file with real values: zeros or seeded random, `values` overriding
    named tensors (their dtype/shape come from the array)."""
    layout = layout_or_rows if isinstance(layout_or_rows, Layout) else rows_layout(layout_or_rows)
    plan = layout_plan(layout, values="random" if random else "zeros", seed=seed, scale=scale)
    values = values or {}
    out: List[LazyTensor] = []
    for t in plan:
        if t.name in values:
            arr = np.asarray(values[t.name])
            from sdtk.tensors import dtype_of_numpy

            out.append(LazyTensor(t.name, dtype_of_numpy(arr.dtype), tuple(arr.shape), loader=lambda a=arr: a))
        else:
            out.append(t)
    write_safetensors(path, out, metadata, overwrite=True)
    return Path(path)


def layout(name: str) -> Layout:
    return load_layout(name)


# ---- rules that transform real layouts -----------------------------------------------------------


def with_shape(lay: Layout, key: str, shape: Sequence[int]) -> Layout:
    """The layout with one tensor's shape replaced (e.g. UNet in_channels for inpainting)."""
    assert any(k == key for k, _, _ in lay.tensors), key
    return Layout(lay.name, lay.description, tuple((k, tuple(shape) if k == key else s, d) for k, s, d in lay.tensors))


def unet_in_channels(lay: Layout, n: int, key: str = "model.diffusion_model.input_blocks.0.0.weight") -> Layout:
    """Rule (ComfyUI model_detection / architectures reference): variants differ only in the
    first conv's input channels: 9 inpainting, 8 instruct-pix2pix, 5 depth, 7 x4 upscaler."""
    shape = dict((k, s) for k, s, _ in lay.tensors)[key]
    return with_shape(lay, key, (shape[0], n) + tuple(shape[2:]))


def sub_prefix(lay: Layout, prefix: str, new_prefix: str = "") -> Layout:
    """Only the keys under `prefix`, re-prefixed (stand-alone VAE/text-encoder files by rule)."""
    rows = tuple((new_prefix + k[len(prefix):], s, d) for k, s, d in lay.tensors if k.startswith(prefix))
    assert rows, prefix
    return Layout(lay.name, lay.description, rows)


def map_dims(lay: Layout, mapping: Dict[int, int], key_filter=lambda k: True) -> Layout:
    """Every dimension equal to a mapping key replaced (scaling a family by rule: e.g. SDXL's
    320/640/1280 channels -> the refiner's 384/768/1536)."""
    return Layout(lay.name, lay.description, tuple(
        (k, tuple(mapping.get(x, x) for x in s) if key_filter(k) else s, d) for k, s, d in lay.tensors))


# ---- SDXL family ------------------------------------------------------------------------------------


def sdxl_refiner() -> Layout:
    """Rule (sgm sd_xl_refiner.yaml, ComfyUI SDXLRefiner): model_channels 384 (SDXL's 320 x 1.2),
    context 1280 (CLIP-G only), adm 2560, only CLIP-G under conditioner.embedders.0.model."""
    base = load_layout("sdxl-base")
    unet = sub_prefix(base, "model.diffusion_model.", "model.diffusion_model.")
    unet = map_dims(unet, {320: 384, 640: 768, 1280: 1536, 2560: 3072, 2048: 1280, 2816: 2560, 5120: 6144, 10240: 12288})
    clip_g = sub_prefix(base, "conditioner.embedders.1.model.", "conditioner.embedders.0.model.")
    vae = sub_prefix(base, "first_stage_model.", "first_stage_model.")
    return Layout("sdxl-refiner", "synthetic", unet.tensors + clip_g.tensors + vae.tensors)


def sdxl_distilled(keep_depth: int) -> Layout:
    """Rule (ComfyUI supported_models.py SSD1B [0,0,2,2,4,4] / Segmind_Vega [0,0,1,1,2,2], no
    middle transformer): SDXL base with transformer blocks beyond the kept depth removed."""
    base = load_layout("sdxl-base")
    level1 = max(1, keep_depth // 2)

    def drop(k: str) -> bool:
        if k.startswith("model.diffusion_model.middle_block.1."):
            return True
        m = re.match(r"model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.1\.transformer_blocks\.(\d+)\.", k)
        if not m:
            return False
        blk, depth = int(m.group(2)), int(m.group(3))
        deep_level = (m.group(1) == "input_blocks" and blk in (7, 8)) or (m.group(1) == "output_blocks" and blk in (0, 1, 2))
        return depth >= (keep_depth if deep_level else level1)

    return base.without(drop)


def playground_v25() -> Layout:
    """Rule (ComfyUI model_detection.py): SDXL + `edm_mean` and `edm_std` [1, 4, 1, 1]."""
    return load_layout("sdxl-base").plus([("edm_mean", (1, 4, 1, 1), "float32"), ("edm_std", (1, 4, 1, 1), "float32")])


# ---- SD2 family -------------------------------------------------------------------------------------


def sd2_unclip(adm: int) -> Layout:
    """Rule (SD2 v2-1-stable-unclip-{l,h}: adm 1536 / 2048): SD2.1 + label_emb (Linear, SiLU, Linear)."""
    return load_layout("sd21-768-v").plus([
        ("model.diffusion_model.label_emb.0.0.weight", (1280, adm), "float32"), ("model.diffusion_model.label_emb.0.0.bias", (1280,), "float32"),
        ("model.diffusion_model.label_emb.0.2.weight", (1280, 1280), "float32"), ("model.diffusion_model.label_emb.0.2.bias", (1280,), "float32")])


def sd_x4_upscaler() -> Layout:
    """Rule (x4-upscaling.yaml: model_channels 256, in_channels 7, context 1024): the SD2 UNet
    with 320/640/1280 channels mapped to 256/512/512 and 7 input channels."""
    lay = sub_prefix(load_layout("sd21-768-v"), "model.diffusion_model.", "model.diffusion_model.")
    lay = map_dims(lay, {320: 256, 640: 512, 1280: 512, 2560: 2048}, key_filter=lambda k: "attn2.to_k" not in k and "attn2.to_v" not in k)
    lay = unet_in_channels(lay, 7)
    vae = sub_prefix(load_layout("sd21-768-v"), "first_stage_model.", "first_stage_model.")
    te = sub_prefix(load_layout("sd21-768-v"), "cond_stage_model.", "cond_stage_model.")
    return Layout("x4", "synthetic", lay.tensors + vae.tensors + te.tensors)


# ---- SD3 / SD3.5 ----------------------------------------------------------------------------------


def sd35(size: str) -> Layout:
    """Rule (ComfyUI model_detection.py): depth = x_embedder width / 64; SD3.5 adds
    context_block.attn.ln_q/ln_k (RMSNorm); SD3.5 Medium (MMDiT-X) adds x_block.attn2 in blocks 0..12.
    Large: depth 38, width 2432. Medium: depth 24, width 1536."""
    depth, width = (38, 2432) if size == "large" else (24, 1536)
    P = "model.diffusion_model."
    rows: List[Row] = [
        (P + "x_embedder.proj.weight", (width, 16, 2, 2), "float16"), (P + "x_embedder.proj.bias", (width,), "float16"),
        (P + "pos_embed", (1, 36864 if size == "large" else 147456, width), "float16"),
        (P + "context_embedder.weight", (width, 4096), "float16"), (P + "t_embedder.mlp.0.weight", (width, 256), "float16"),
        (P + "y_embedder.mlp.0.weight", (width, 2048), "float16"), (P + "final_layer.linear.weight", (64, width), "float16"),
    ]
    for i in range(depth):
        for blk in ("context_block", "x_block"):
            rows += [(f"{P}joint_blocks.{i}.{blk}.attn.qkv.weight", (3 * width, width), "float16"),
                     (f"{P}joint_blocks.{i}.{blk}.attn.proj.weight", (width, width), "float16"),
                     (f"{P}joint_blocks.{i}.{blk}.attn.ln_q.weight", (64,), "float16"),
                     (f"{P}joint_blocks.{i}.{blk}.attn.ln_k.weight", (64,), "float16"),
                     (f"{P}joint_blocks.{i}.{blk}.mlp.fc1.weight", (4 * width, width), "float16"),
                     (f"{P}joint_blocks.{i}.{blk}.adaLN_modulation.1.weight", (6 * width, width), "float16")]
        if size == "medium" and i <= 12:
            rows.append((f"{P}joint_blocks.{i}.x_block.attn2.qkv.weight", (3 * width, width), "float16"))
    return rows_layout(rows, f"sd35-{size}")


# ---- FLUX family and other DiTs (signature keys + enough realistic blocks) ---------------------------


def flux_img_in(channels: int) -> Layout:
    """Rule (BFL FLUX.1 Fill / Depth / Canny; ComfyUI model_detection.py): flux1-dev with
    img_in.weight [3072, channels]: 384 Fill, 128 Depth/Canny."""
    return with_shape(load_layout("flux1-dev"), "model.diffusion_model.img_in.weight", (3072, channels))


def _blocks(prefix: str, count: int, parts: Sequence[Tuple[str, Tuple[int, ...]]], dt: str = "bfloat16") -> List[Row]:
    return [(f"{prefix}{i}.{name}", shape, dt) for i in range(count) for name, shape in parts]


def dit(arch: str, prefix: str = "model.diffusion_model.") -> Layout:
    """Synthetic DiTs by rule: the signature keys of ComfyUI model_detection.py with their real
    widths, plus repeated blocks shaped like the released models."""
    P = prefix
    if arch == "flux-2":  # FLUX.2: shared modulation layers, img_in 128 (ComfyUI Flux2 detection)
        rows = [(P + "double_stream_modulation_img.lin.weight", (36864, 6144), "bfloat16"),
                (P + "double_stream_modulation_txt.lin.weight", (36864, 6144), "bfloat16"),
                (P + "single_stream_modulation.lin.weight", (18432, 6144), "bfloat16"),
                (P + "img_in.weight", (6144, 128), "bfloat16"), (P + "txt_in.weight", (6144, 15360), "bfloat16")]
        rows += _blocks(P + "double_blocks.", 8, [("img_attn.qkv.weight", (18432, 6144)), ("img_attn.norm.key_norm.scale", (128,)),
                                                  ("txt_attn.qkv.weight", (18432, 6144)), ("img_mlp.0.weight", (36864, 6144))])
        rows += _blocks(P + "single_blocks.", 48, [("linear1.weight", (55296, 6144)), ("norm.key_norm.scale", (128,))])
    elif arch == "chroma":  # Chroma: FLUX.1-schnell blocks, distilled_guidance_layer, no vector_in
        rows = [(P + "distilled_guidance_layer.in_proj.weight", (5120, 64), "bfloat16"),
                (P + "distilled_guidance_layer.out_proj.weight", (3072, 5120), "bfloat16"),
                (P + "img_in.weight", (3072, 64), "bfloat16"), (P + "txt_in.weight", (3072, 4096), "bfloat16")]
        rows += _blocks(P + "double_blocks.", 19, [("img_attn.qkv.weight", (9216, 3072)), ("img_attn.norm.key_norm.scale", (128,)),
                                                   ("txt_attn.qkv.weight", (9216, 3072))])
        rows += _blocks(P + "single_blocks.", 38, [("linear1.weight", (21504, 3072)), ("norm.key_norm.scale", (128,))])
    elif arch == "auraflow":  # AuraFlow: double_layers (w1q...) and single_layers, width 3072
        rows = [(P + "init_x_linear.weight", (3072, 16), "bfloat16"), (P + "cond_seq_linear.weight", (3072, 2048), "bfloat16"),
                (P + "positional_encoding", (1, 9216, 3072), "bfloat16"), (P + "register_tokens", (1, 8, 3072), "bfloat16")]
        rows += _blocks(P + "double_layers.", 4, [("attn.w1q.weight", (3072, 3072)), ("attn.w1k.weight", (3072, 3072)),
                                                  ("attn.w2q.weight", (3072, 3072)), ("mlpX.c_fc1.weight", (8192, 3072))])
        rows += _blocks(P + "single_layers.", 32, [("attn.w1q.weight", (3072, 3072)), ("mlp.c_fc1.weight", (8192, 3072))])
    elif arch == "hunyuan-dit":  # HunyuanDiT: mlp_t5 projection of mT5 features, 40 blocks of 1408
        rows = [(P + "mlp_t5.0.weight", (8192, 2048), "float16"), (P + "mlp_t5.2.weight", (1024, 8192), "float16"),
                (P + "x_embedder.proj.weight", (1408, 4, 2, 2), "float16"), (P + "text_embedding_padding", (333, 1024), "float16")]
        rows += _blocks(P + "blocks.", 40, [("attn1.Wqkv.weight", (4224, 1408)), ("attn2.q_proj.weight", (1408, 1408)),
                                            ("mlp.fc1.weight", (6144, 1408))], "float16")
    elif arch in ("lumina-2", "z-image"):  # Lumina 2 (cap 2304, Gemma-2) / Z-Image (cap 3840, Qwen3)
        cap, width = (2304, 2304) if arch == "lumina-2" else (3840, 3840)
        rows = [(P + "cap_embedder.0.weight", (cap,), "bfloat16"), (P + "cap_embedder.1.weight", (width, cap), "bfloat16"),
                (P + "x_embedder.weight", (width, 64), "bfloat16")]
        rows += _blocks(P + "noise_refiner.", 2, [("attention.k_norm.weight", (128,)), ("attention.qkv.weight", (3 * width, width))])
        rows += _blocks(P + "context_refiner.", 2, [("attention.k_norm.weight", (128,))])
        rows += _blocks(P + "layers.", 26 if arch == "lumina-2" else 30, [("attention.qkv.weight", (3 * width, width)),
                                                                          ("feed_forward.w1.weight", (4 * width, width))])
    elif arch == "qwen-image":  # Qwen-Image: txt_norm over Qwen2.5-VL features (3584), 60 blocks of 3072
        rows = [(P + "txt_norm.weight", (3584,), "bfloat16"), (P + "txt_in.weight", (3072, 3584), "bfloat16"),
                (P + "img_in.weight", (3072, 64), "bfloat16")]
        rows += _blocks(P + "transformer_blocks.", 60, [("attn.to_q.weight", (3072, 3072)), ("img_mlp.net.0.proj.weight", (12288, 3072))])
    elif arch in ("pixart-alpha", "pixart-sigma"):  # PixArt: t_block; alpha adds ar_embedder (aspect ratio)
        rows = [(P + "t_block.1.weight", (6912, 1152), "float16"), (P + "x_embedder.proj.weight", (1152, 4, 2, 2), "float16"),
                (P + "y_embedder.y_proj.fc1.weight", (1152, 4096), "float16")]
        if arch == "pixart-alpha":
            rows += [(P + "ar_embedder.mlp.0.weight", (1152, 256), "float16"), (P + "csize_embedder.mlp.0.weight", (1152, 256), "float16")]
        rows += _blocks(P + "blocks.", 28, [("attn.qkv.weight", (3456, 1152)), ("cross_attn.q_linear.weight", (1152, 1152))], "float16")
    elif arch in ("stable-cascade-stage-c", "stable-cascade-stage-b"):  # Stable Cascade: clf head; C maps CLIP text
        rows = [(P + "clf.1.weight", (64 if arch.endswith("c") else 16, 2048 if arch.endswith("c") else 320, 1, 1), "bfloat16")]
        if arch.endswith("c"):
            rows += [(P + "clip_txt_mapper.weight", (8192, 1280), "bfloat16"), (P + "clip_txt_pooled_mapper.weight", (8192, 1280), "bfloat16")]
        rows += _blocks(P + "down_blocks.0.", 8, [("channelwise.0.weight", (8192, 2048)), ("depthwise.weight", (2048, 1, 3, 3))])
    else:
        raise KeyError(arch)
    return rows_layout(rows, arch)


# ---- adjacent files -----------------------------------------------------------------------------------


def kohya_lora(base: str, rank: int = 16, algo: str = "lora", modules: int = 6) -> List[Row]:
    """Rule (kohya-ss/sd-scripts networks/lora.py; LyCORIS loha.py/lokr.py): per module
    lora_down [r, in] / lora_up [out, r] / alpha []; LoHa hada_w1_a/b, hada_w2_a/b; LoKr lokr_w1, lokr_w2_a/b.
    SD1 UNet names use diffusers blocks (lora_unet_down_blocks_*), SDXL sgm names (lora_unet_input_blocks_*)
    and lora_te1_/lora_te2_; context widths 768 (SD1), 2048 (SDXL)."""
    if base == "sd1":
        unet = [f"lora_unet_down_blocks_{i}_attentions_0_transformer_blocks_0_attn2_to_k" for i in range(3)]
        widths = [(320, 768), (640, 768), (1280, 768)]
        te = [f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj" for i in range(modules - 3)]
        te_w = 768
    else:
        unet = [f"lora_unet_input_blocks_{i}_1_transformer_blocks_0_attn2_to_k" for i in (4, 5, 7)]
        widths = [(640, 2048), (640, 2048), (1280, 2048)]
        te = [f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj" for i in range(modules - 3)]
        te_w = 768
    rows: List[Row] = []
    for name, (out, inp) in list(zip(unet, widths)) + [(t, (te_w, te_w)) for t in te]:
        if algo in ("lora", "locon"):
            rows += [(f"{name}.lora_down.weight", (rank, inp), "float16"), (f"{name}.lora_up.weight", (out, rank), "float16"),
                     (f"{name}.alpha", (), "float16")]
        elif algo == "loha":
            rows += [(f"{name}.hada_w1_a", (out, rank), "float16"), (f"{name}.hada_w1_b", (rank, inp), "float16"),
                     (f"{name}.hada_w2_a", (out, rank), "float16"), (f"{name}.hada_w2_b", (rank, inp), "float16"),
                     (f"{name}.alpha", (), "float16")]
        elif algo == "lokr":
            rows += [(f"{name}.lokr_w1", (8, 8), "float16"), (f"{name}.lokr_w2_a", (out // 8, rank), "float16"),
                     (f"{name}.lokr_w2_b", (rank, inp // 8), "float16"), (f"{name}.alpha", (), "float16")]
    if algo == "locon":  # LoCon adapts the 3x3 convolutions of the resnets too
        conv = "lora_unet_down_blocks_0_resnets_0_conv1" if base == "sd1" else "lora_unet_input_blocks_1_0_in_layers_2"
        rows += [(f"{conv}.lora_down.weight", (rank, 320, 3, 3), "float16"), (f"{conv}.lora_up.weight", (320, rank, 1, 1), "float16"),
                 (f"{conv}.alpha", (), "float16")]
    return rows


def lora_alphas(rows: Sequence[Row], alpha: float) -> Dict[str, np.ndarray]:
    return {k: np.array(alpha, dtype=np.float16) for k, _, _ in rows if k.endswith(".alpha")}


def peft_flux_lora(rank: int = 32) -> List[Row]:
    """Rule (diffusers/PEFT FLUX LoRAs: transformer.<module>.lora_A.weight [r, in], lora_B [out, r])."""
    rows: List[Row] = []
    for i in range(3):
        for m, (out, inp) in (("attn.to_q", (3072, 3072)), ("attn.to_k", (3072, 3072))):
            rows += [(f"transformer.single_transformer_blocks.{i}.{m}.lora_A.weight", (rank, inp), "bfloat16"),
                     (f"transformer.single_transformer_blocks.{i}.{m}.lora_B.weight", (out, rank), "bfloat16")]
    return rows


def diffusers_old_lora(rank: int = 4) -> List[Row]:
    """Rule (diffusers pre-PEFT attn-processor LoRA: unet.<...>.processor.to_k_lora.down.weight)."""
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    return [(f"{base}.to_k_lora.down.weight", (rank, 768), "float32"), (f"{base}.to_k_lora.up.weight", (320, rank), "float32"),
            (f"{base}.to_q_lora.down.weight", (rank, 320), "float32"), (f"{base}.to_q_lora.up.weight", (320, rank), "float32")]


def controlnet_ldm(context: int = 768) -> Layout:
    """Rule (lllyasviel ControlNet cldm.py): control_model. + the UNet encoder half, zero_convs,
    input_hint_block; built from the SD1.5 layout's input/middle blocks."""
    sd = load_layout("sd15-emaonly")
    rows = [("control_model." + k[len("model.diffusion_model."):], s, "float16") for k, s, _ in sd.tensors
            if k.startswith(("model.diffusion_model.input_blocks.", "model.diffusion_model.middle_block.", "model.diffusion_model.time_embed."))]
    rows = [(k, (s[0], context) if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight") else s, d) for k, s, d in rows]
    rows += [(f"control_model.zero_convs.{i}.0.weight", (320, 320, 1, 1), "float16") for i in range(12)]
    rows += [("control_model.input_hint_block.0.weight", (16, 3, 3, 3), "float16"),
             ("control_model.middle_block_out.0.weight", (1280, 1280, 1, 1), "float16")]
    return rows_layout(rows, "controlnet")


def controlnet_diffusers_sdxl() -> List[Row]:
    """Rule (diffusers ControlNetModel): controlnet_cond_embedding + down_blocks with SDXL context 2048."""
    return [("controlnet_cond_embedding.conv_in.weight", (16, 3, 3, 3), "float16"),
            ("controlnet_cond_embedding.conv_out.weight", (320, 256, 3, 3), "float16"),
            ("conv_in.weight", (320, 4, 3, 3), "float16"),
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", (640, 2048), "float16"),
            ("controlnet_down_blocks.0.weight", (320, 320, 1, 1), "float16"),
            ("controlnet_mid_block.weight", (1280, 1280, 1, 1), "float16")]


def t2i_adapter() -> List[Row]:
    """Rule (TencentARC T2I-Adapter adapter.py): body.N.resnets.M.block1/block2, conv_in (64*3 pixel-unshuffled)."""
    rows: List[Row] = [("adapter.conv_in.weight", (320, 192, 3, 3), "float32")]
    for i, ch in enumerate((320, 640, 1280, 1280)):
        for r in range(2):
            rows += [(f"adapter.body.{i}.resnets.{r}.block1.weight", (ch, ch, 3, 3), "float32"),
                     (f"adapter.body.{i}.resnets.{r}.block2.weight", (ch, ch, 1, 1), "float32")]
    return rows


def hypernetwork_rows() -> List[Row]:
    """Rule (A1111 hypernetwork.py): per attention width, two HypernetworkModules (k, v), each
    `linear.N.weight/bias` with layer_structure [1, 2, 1]."""
    rows: List[Row] = []
    for width in (320, 640, 768, 1280):
        for mod in (0, 1):
            rows += [(f"{width}.{mod}.linear.0.weight", (width * 2, width), "float32"), (f"{width}.{mod}.linear.0.bias", (width * 2,), "float32"),
                     (f"{width}.{mod}.linear.1.weight", (width, width * 2), "float32"), (f"{width}.{mod}.linear.1.bias", (width,), "float32")]
    return rows


def diffusers_unet_sd1(context: int = 768, in_channels: int = 4, sdxl: bool = False) -> List[Row]:
    """Rule (diffusers UNet2DConditionModel configs): conv_in, time_embedding, down_blocks with
    cross_attention_dim 768 (SD1) / 1024 (SD2) / 2048 (SDXL, plus add_embedding 2816)."""
    proj = lambda ch: (ch, ch) if context != 768 else (ch, ch, 1, 1)  # SD2/SDXL use linear proj_in
    sd = [("conv_in.weight", (320, in_channels, 3, 3), "float16"), ("conv_in.bias", (320,), "float16"),
          ("time_embedding.linear_1.weight", (1280, 320), "float16")]
    if sdxl:
        sd += [("add_embedding.linear_1.weight", (1280, 2816), "float16"), ("add_embedding.linear_2.weight", (1280, 1280), "float16")]
    for i, ch in enumerate((320, 640, 1280)):
        sd += [(f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_k.weight", (ch, context), "float16"),
               (f"down_blocks.{i}.attentions.0.proj_in.weight", proj(ch), "float16"),
               (f"down_blocks.{i}.resnets.0.conv1.weight", (ch, ch, 3, 3), "float16")]
    return sd


def diffusers_flux(guidance: bool = True) -> List[Row]:
    """Rule (diffusers FluxTransformer2DModel): x_embedder [3072, 64], transformer_blocks with
    norm_added_k, single_transformer_blocks; guidance_embedder only in [dev]."""
    rows: List[Row] = [("x_embedder.weight", (3072, 64), "bfloat16"), ("context_embedder.weight", (3072, 4096), "bfloat16"),
                       ("time_text_embed.timestep_embedder.linear_1.weight", (3072, 256), "bfloat16")]
    if guidance:
        rows.append(("time_text_embed.guidance_embedder.linear_1.weight", (3072, 256), "bfloat16"))
    rows += _blocks("transformer_blocks.", 19, [("attn.norm_added_k.weight", (128,)), ("attn.to_q.weight", (3072, 3072))])
    rows += _blocks("single_transformer_blocks.", 38, [("attn.norm_k.weight", (128,)), ("proj_mlp.weight", (12288, 3072))])
    return rows


def write_diffusers_folder(root: Path, pipeline: str = "StableDiffusionPipeline") -> Path:
    """A diffusers pipeline folder (model_index.json + unet/ vae/ text_encoder/)."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"], "safety_checker": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    for sub in ("unet", "vae", "text_encoder"):
        (root / sub).mkdir(exist_ok=True)
    write_sparse(root / "unet" / "diffusion_pytorch_model.safetensors", diffusers_unet_sd1())
    write_sparse(root / "vae" / "diffusion_pytorch_model.safetensors", sub_prefix(load_layout("sd15-emaonly"), "first_stage_model."))
    write_sparse(root / "text_encoder" / "model.safetensors", load_layout("clip-l-hf"))
    return root


FLOAT_DAMAGED = (19, 38, 76)


def position_ids(kind: str, n: int = 77) -> np.ndarray:
    """CLIP position_ids as found in damaged merges: "float" (fp32, positions FLOAT_DAMAGED a
    little below their index, e.g. 75.9975, so int truncation reads the previous position),
    "float_exact" (fp32 but exact), "shifted" (int64, one position repeated), "ok"."""
    ids = np.arange(n)
    if kind in ("float", "float_exact"):
        arr = ids.astype(np.float32)
        if kind == "float":
            arr[list(FLOAT_DAMAGED)] -= np.float32(0.0025)
        return arr.reshape(1, n)
    if kind == "shifted":
        bad = ids.copy()
        bad[40:] -= 1  # position 40 onward read the previous position's embedding
        return bad.astype(np.int64).reshape(1, n)
    return ids.astype(np.int64).reshape(1, n)


def float_dtype(name: str):
    return dtype(name)


def write_sparse_with_values(path: Path, layout_or_rows, values: Dict[str, np.ndarray], metadata=None) -> Path:
    """A full-size sparse file (real shapes) where the named tensors carry real values: the
    header, those tensors' bytes at their offsets, and a zero-filled hole everywhere else."""
    from sdtk.fileio import AtomicOutput
    from sdtk.formats.safetensors import build_header
    from sdtk.tensors import dtype_of_numpy

    lay = layout_or_rows if isinstance(layout_or_rows, Layout) else rows_layout(layout_or_rows)
    plan = []
    for t in layout_plan(lay):
        if t.name in values:
            arr = np.ascontiguousarray(values[t.name])
            plan.append(LazyTensor(t.name, dtype_of_numpy(arr.dtype), tuple(arr.shape), loader=lambda a=arr: a))
        else:
            plan.append(t)
    header = build_header(plan, metadata)
    total = len(header) + sum(t.nbytes for t in plan)
    with AtomicOutput(path, overwrite=True) as out:
        out.write(header)
        offset = len(header)
        for t in plan:
            if t.name in values or (t.name.endswith("position_ids") and not t.dtype.is_float):
                out.seek(offset)
                out.write(np.ascontiguousarray(t.read()).tobytes())
            offset += t.nbytes
        out.truncate(total)
    return Path(path)
