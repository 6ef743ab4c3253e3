"""Small random-valued models with the real block structure, built with diffusers/transformers
themselves (seeded), saved as single files under single-file names: the fixtures of the
diffusers real-client tests. Only for tests: torch, diffusers and transformers are oracles."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network (read by huggingface_hub at import)

from typing import Dict, List

import numpy as np

from sdtk.architectures.diffusers_keys.assemble import join_component
from sdtk.architectures.diffusers_keys.pipelines import PIPELINES
from sdtk.formats.diffusers import _hf_text_names
from sdtk.formats.safetensors import write_safetensors
from sdtk.tensors import LazyTensor, from_array


def to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def seeded(model, seed: int):
    """Every parameter and buffer filled with small seeded random values (init schemes leave
    norms at 1/0 and some layers at zero, which would hide swapped or transposed tensors)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point and "pos_embed" not in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    return model.eval()


def _clip(hidden: int, layers: int, act: str, projection: int = 0):
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg)


def _t5(d_model: int = 32, layers: int = 2):
    import transformers

    cfg = transformers.T5Config(vocab_size=1000, d_model=d_model, d_ff=2 * d_model, d_kv=16, num_heads=2, num_layers=layers,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
    return transformers.T5EncoderModel(cfg)


def _unet(family: str):
    import diffusers

    if family in ("sd1", "sd2"):
        heads = 8 if family == "sd1" else [1, 1, 1]
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=heads, use_linear_projection=(family == "sd2"))
    if family == "sdxl":
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 1, 1], cross_attention_dim=192,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=32 + 6 * 256, addition_embed_type_num_heads=64)
    # refiner: four levels, attention at the two middle ones, context = the bigG width
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=[1, 1, 1, 1], cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=32 + 5 * 256, addition_embed_type_num_heads=64)


def _vae(latent: int = 4):
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(32, 64),
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   layers_per_block=1, norm_num_groups=32, use_quant_conv=latent == 4,
                                   use_post_quant_conv=latent == 4)


def _sd3():
    import diffusers

    return diffusers.SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                           attention_head_dim=64, num_attention_heads=1, joint_attention_dim=32,
                                           caption_projection_dim=64, pooled_projection_dim=128, pos_embed_max_size=16,
                                           qk_norm="rms_norm", dual_attention_layers=(0,))


def _flux():
    import diffusers
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # diffusers' FLUX converter needs the real width 3072: keep it small in bf16
    try:
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                                pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    finally:
        torch.set_default_dtype(old)


def _lumina2(real_width: bool = False):
    """Lumina-Image 2.0's block structure; head width 96 (the released rotary axes 32+32+32).
    `real_width`: the 2B model's attention widths (2304, 24 heads, 8 kv heads), which diffusers'
    converter hard-codes, with one block of each kind."""
    import diffusers

    if real_width:
        return diffusers.Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, hidden_size=2304, num_layers=1,
                                                   num_refiner_layers=1, num_attention_heads=24, num_kv_heads=8,
                                                   multiple_of=256, ffn_dim_multiplier=1 / 8, cap_feat_dim=32)
    return diffusers.Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, hidden_size=192, num_layers=2,
                                               num_refiner_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                               cap_feat_dim=32)


def _z_image():
    """Z-Image's block structure, small; head width 128 (the released rotary axes 32+48+48)."""
    import diffusers

    return diffusers.ZImageTransformer2DModel(in_channels=16, dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
                                              cap_feat_dim=32)


def build_models(family: str, seed: int = 0) -> Dict[str, object]:
    """{diffusers folder name: torch module} of a small model of `family`, seeded."""
    if family == "sd1":
        models = {"unet": _unet("sd1"), "vae": _vae(), "text_encoder": _clip(64, 2, "quick_gelu")}
    elif family == "sd2":
        models = {"unet": _unet("sd2"), "vae": _vae(), "text_encoder": _clip(64, 2, "gelu")}
    elif family == "sdxl":
        models = {"unet": _unet("sdxl"), "vae": _vae(), "text_encoder": _clip(64, 2, "quick_gelu"),
                  "text_encoder_2": _clip(128, 2, "gelu", projection=32)}  # widths differ, as 768/1280 do
    elif family == "sdxl-refiner":
        models = {"unet": _unet("sdxl-refiner"), "vae": _vae(), "text_encoder_2": _clip(64, 2, "gelu", projection=32)}
    elif family == "sd3":
        models = {"transformer": _sd3(), "vae": _vae(16), "text_encoder": _clip(64, 2, "quick_gelu", projection=64),
                  "text_encoder_2": _clip(128, 2, "gelu", projection=64), "text_encoder_3": _t5()}
    elif family == "lumina2":
        models = {"transformer": _lumina2(), "vae": _vae(16)}
    elif family == "lumina2-real-width":
        models = {"transformer": _lumina2(real_width=True)}
    elif family == "z-image":
        models = {"transformer": _z_image(), "vae": _vae(16)}
    elif family == "flux1":
        models = {"transformer": _flux(), "vae": _vae(16), "text_encoder": _clip(64, 2, "quick_gelu"),
                  "text_encoder_2": _t5()}
    else:
        raise KeyError(family)
    return {name: seeded(m, seed + i) for i, (name, m) in enumerate(models.items())}


def _config_of(model) -> dict:
    cfg = getattr(model, "config", None)
    return dict(cfg) if cfg is not None and not hasattr(cfg, "to_dict") else cfg.to_dict()


# Tensors real single files carry that diffusers does not keep (so the sidecar is exercised).
def _extras(family: str, models, rng) -> List[LazyTensor]:
    out = []
    f32 = lambda shape: rng.standard_normal(shape).astype(np.float32)
    if family in ("sd1", "sd2"):
        out += [from_array(n, f32((1000,))) for n in ("betas", "alphas_cumprod")]
    if family == "sd1":
        out.append(from_array("cond_stage_model.transformer.text_model.embeddings.position_ids", np.arange(77, dtype=np.int64)[None]))
    if family == "sd2":  # the 24th layer, text_projection and logit_scale diffusers drops (here: layer 2 of 3)
        w = 64
        p = "cond_stage_model.model.transformer.resblocks.2."
        for k, s in (("ln_1.weight", (w,)), ("ln_1.bias", (w,)), ("ln_2.weight", (w,)), ("ln_2.bias", (w,)),
                     ("attn.in_proj_weight", (3 * w, w)), ("attn.in_proj_bias", (3 * w,)), ("attn.out_proj.weight", (w, w)),
                     ("attn.out_proj.bias", (w,)), ("mlp.c_fc.weight", (2 * w, w)), ("mlp.c_fc.bias", (2 * w,)),
                     ("mlp.c_proj.weight", (w, 2 * w)), ("mlp.c_proj.bias", (w,))):
            out.append(from_array(p + k, f32(s)))
        out += [from_array("cond_stage_model.model.text_projection", f32((w, w))),
                from_array("cond_stage_model.model.logit_scale", np.array(4.6, dtype=np.float32))]
    if family in ("sdxl", "sdxl-refiner"):
        emb = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        w = 128 if family == "sdxl" else 64
        out.append(from_array(emb + "logit_scale", np.array(4.6, dtype=np.float32)))
        out += [from_array("v_pred", np.zeros((0,), np.float16)), from_array("ztsnr", np.zeros((0,), np.float16))]
    if family == "sd3":
        out.append(from_array("text_encoders.clip_l.logit_scale", np.array(4.6, dtype=np.float32)))
    if family in ("lumina2", "lumina2-real-width", "z-image"):  # unused by the original too; diffusers drops it (reference 1.8)
        width = models["transformer"].config.get("hidden_size") or models["transformer"].config["dim"]
        out.append(from_array("norm_final.weight" if family.endswith("-real-width") else "model.diffusion_model.norm_final.weight",
                              f32((width,))))
    return out


def single_file_tensors(family: str, models) -> List[LazyTensor]:
    """The models under single-file names (sdtk's own reverse maps), plus the extras real files hold."""
    spec = PIPELINES[family.replace("-real-width", "")]
    tensors: List[LazyTensor] = []
    for comp in spec.components:
        if comp.folder not in models:
            continue
        model = models[comp.folder]
        named = {k: from_array(k, to_numpy(v)) for k, v in model.state_dict().items()}
        if comp.kind in ("clip-hf", "open-clip"):
            named = _hf_text_names(named)
        if comp.kind == "t5":
            named.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
        prefix = comp.prefixes[0] or "model.diffusion_model."
        if family.endswith("-real-width") and comp.folder == "transformer":
            prefix = ""  # a stand-alone DiT file (ComfyUI diffusion_models/): no prefix
        tensors += join_component(comp, prefix, named, _config_of(model))
    return tensors + _extras(family, models, np.random.default_rng(1))


def write_single_file(path, family: str, models) -> None:
    write_safetensors(path, single_file_tensors(family, models))


def write_t5_tokenizer(folder) -> None:
    """A tiny T5-style (Unigram) tokenizer folder, built with the `tokenizers` library (no
    download): stands in for a user's T5 tokenizer in the --tokenizers tests."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(folder, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in ("a", "photo", "of", "cat")]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "model_max_length": 512, "extra_ids": 0}, fh)
