"""`sdtk lora apply` against ComfyUI (the real client in ../shared/clients): ComfyUI resolves the
LoRA's names with its own key maps (comfy.lora.model_lora_keys_unet / _clip over the base's keys)
and computes each patched weight with comfy.lora.calculate_weight; sdtk's baked file must hold
the same values (fp32 base: within float32 rounding) and every other tensor bit-identical."""
from __future__ import annotations

import numpy as np
import pytest

from helpers_lora import comfy_or_skip, lora_family, write_tensors
from helpers_merge import make_model, tensors

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."

# (LoRA module name, checkpoint weight key, family, options): kohya SD1 names (diffusers layout).
MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "lora", {}),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "lora", {"dora": "in"}),
    ("lora_unet_down_blocks_1_attentions_1_proj_in", "input_blocks.5.1.proj_in", "lora", {}),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "middle_block.1.transformer_blocks.0.ff.net.0.proj", "loha", {}),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "output_blocks.3.1.transformer_blocks.0.ff.net.2", "lokr", {"w2_factorised": True, "factors": (4, 4)}),
    ("lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_attn1_to_out_0", "output_blocks.8.1.transformer_blocks.0.attn1.to_out.0", "lokr", {"factors": (2, 4)}),
    ("lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_v", "output_blocks.10.1.transformer_blocks.0.attn2.to_v", "lokr", {"w1_factorised": True, "factors": (4, 4)}),
    ("lora_unet_down_blocks_1_resnets_0_conv1", "input_blocks.4.0.in_layers.2", "lora", {}),
    ("lora_unet_down_blocks_2_resnets_1_conv2", "input_blocks.8.0.out_layers.3", "tucker", {}),
    ("lora_unet_up_blocks_0_resnets_2_conv1", "output_blocks.2.0.in_layers.2", "loha", {"tucker": True}),
    ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "input_blocks.4.0.emb_layers.1", "glora", {}),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "output_blocks.5.2.conv", "lora", {}),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "input_blocks.9.0.op", "loha", {}),
    ("lora_unet_mid_block_resnets_1_conv_shortcut", None, None, {}),  # SD1's mid resnets have no shortcut: skipped
    ("lora_unet_up_blocks_2_resnets_0_conv_shortcut", "output_blocks.6.0.skip_connection", "full", {"bias": True}),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj", "lora", {}),
    ("lora_te_text_model_encoder_layers_5_mlp_fc1", "text_model.encoder.layers.5.mlp.fc1", "loha", {}),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj", "lora", {"dora": "in"}),
]

# ComfyUI's unet_to_diffusers needs the UNet config: SD1's (comfy/supported_models.py SD15 +
# model_detection), the same for the scaled-down test UNet (only channel widths are scaled).
SD1_UNET_CONFIG = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                   "transformer_depth_middle": 1}


class _FakeModel:
    """What model_lora_keys_* read: state_dict() keys and model_config.unet_config."""

    def __init__(self, keys, unet_config=None):
        self._keys = {k: None for k in keys}
        self.model_config = type("Cfg", (), {"unet_config": unet_config or {}})()

    def state_dict(self):
        return self._keys


def _comfy_patched(comfy_lora, comfy_utils, base, lora_tensors, strength, te_strength):
    import torch

    unet_keys = ["diffusion_model." + k[len(UNET):] for k in base if k.startswith(UNET)]
    clip_keys = ["clip_l.transformer." + k[len(TE):] for k in base if k.startswith(TE)]
    key_map = {}
    comfy_lora.model_lora_keys_unet(_FakeModel(unet_keys, SD1_UNET_CONFIG), key_map)
    comfy_lora.model_lora_keys_clip(_FakeModel(clip_keys), key_map)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in lora_tensors.items()}
    patches = comfy_lora.load_lora(sd, key_map, log_missing=False)
    out = {}
    for comfy_key, adapter in patches.items():
        key, offset = (comfy_key if isinstance(comfy_key, tuple) else (comfy_key, None))
        ckpt = ("model." + key) if key.startswith("diffusion_model.") else TE + key[len("clip_l.transformer."):]
        s = te_strength if key.startswith("clip_l.") else strength
        if ckpt not in base:  # ComfyUI's static diffusers map names modules this UNet lacks; it never applies them
            continue
        w = torch.from_numpy(np.array(out.get(ckpt, base[ckpt]), dtype=np.float32))
        out[ckpt] = comfy_lora.calculate_weight([(s, adapter, 1.0, offset, None)], w, key).numpy()
    return out


@pytest.mark.parametrize("strength,te_strength", [(1.0, 1.0), (0.7, -0.4)])
def test_sd1_every_family_matches_comfyui(tmp, cli, strength, te_strength):
    comfy_lora, comfy_utils = comfy_or_skip()
    base_path = make_model(tmp, "base", "sd15-emaonly", scale=8)
    base = tensors(base_path)
    rng = np.random.default_rng(5)
    lora = {}
    for name, key, kind, opts in MODULES:
        if key is None:
            lora.update(lora_family(name, "lora", (8, 8), rng))
            continue
        full = (UNET if name.startswith("lora_unet_") else TE) + key + ".weight"
        lora.update(lora_family(name, kind, base[full].shape, rng, **opts))
    lora_path = write_tensors(tmp / "mix.safetensors", lora)
    out = tmp / "out.safetensors"
    refused = cli("lora", "apply", base_path, f"{lora_path}:{strength}:{te_strength}", "-o", out)
    assert refused.returncode == 2 and not out.exists()
    assert "conv_shortcut" in refused.stderr and "--allow-unmatched" in refused.stderr
    r = cli("lora", "apply", base_path, f"{lora_path}:{strength}:{te_strength}", "-o", out, "--allow-unmatched")
    assert r.returncode == 0, r.stderr
    assert "skipped 1" in r.stdout
    got = tensors(out)
    want = _comfy_patched(comfy_lora, comfy_utils, base, lora, strength, te_strength)
    assert len(want) == len(MODULES) - 1 + 1  # every module but the unmatched one; full diff's bias too
    worst = 0.0
    for key, value in want.items():
        diff = float(np.max(np.abs(got[key].astype(np.float64) - value)))
        scale = float(np.max(np.abs(value))) or 1.0
        worst = max(worst, diff / scale)
        assert diff <= 1e-5 * scale, (key, diff)
    print(f"max relative difference to ComfyUI: {worst:.2e}")
    for key in base:
        if key not in want:
            assert got[key].tobytes() == base[key].tobytes(), key
