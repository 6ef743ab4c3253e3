"""`sdtk lora apply` against diffusers' own loaders: `lora_state_dict` + `load_lora_into_unet` /
`load_lora_into_transformer` + `fuse_lora` on small random UNet and FLUX transformers
(reference/lora.md §7.2). The base checkpoint is the diffusers model's weights under their LDM /
BFL names; that renaming is checked first by diffusers' own single-file converters (LDM/BFL ->
diffusers gives back the model's state dict exactly), so the oracle does not lean on sdtk's maps."""
from __future__ import annotations

import numpy as np
import pytest

from helpers_lora import write_tensors
from helpers_merge import tensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def _ldm_name(k: str) -> str:
    """This tiny UNet's diffusers key -> LDM key (layers_per_block 1, two levels; the LDM block
    numbering of ldm/modules/diffusionmodules/openaimodel.py)."""
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_norm_out": "out.0", "conv_out": "out.2"}
    for d, l in top.items():
        if k.startswith(d + "."):
            return l + k[len(d):]
    parts = k.split(".")

    def resnet(rest):
        return RESNET[rest[0]] + "." + ".".join(rest[1:])

    if parts[0] == "down_blocks":
        level = int(parts[1])
        if parts[2] == "downsamplers":
            return f"input_blocks.{2 + 2 * level}.0.op." + ".".join(parts[5:])
        idx = 1 + 2 * level + int(parts[3])
        if parts[2] == "resnets":
            return f"input_blocks.{idx}.0." + resnet(parts[4:])
        return f"input_blocks.{idx}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}." + resnet(parts[3:])
        return "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        level = int(parts[1])
        if parts[2] == "upsamplers":
            return f"output_blocks.{2 * level + 1}.{2 if level else 1}.conv." + ".".join(parts[5:])
        idx = 2 * level + int(parts[3])  # layers_per_block + 1 = 2 blocks per up level
        if parts[2] == "resnets":
            return f"output_blocks.{idx}.0." + resnet(parts[4:])
        return f"output_blocks.{idx}.1." + ".".join(parts[4:])
    raise KeyError(k)


def _ldm_checkpoint(unet):
    sd = {k: v.detach().numpy().copy() for k, v in unet.state_dict().items()}
    ldm = {"model.diffusion_model." + _ldm_name(k): v for k, v in sd.items()}
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:5]
    for k in sd:
        assert np.array_equal(back[k].numpy(), sd[k]), k
    return ldm


# kohya module names (diffusers layout, as kohya writes SD1 LoRAs) of this tiny UNet.
UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.1.proj_out",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.0.resnets.1.conv2",
    "down_blocks.1.resnets.0.time_emb_proj",
)


@pytest.mark.parametrize("scale", [1.0, 0.55])
def test_unet_kohya_lora_matches_diffusers_fuse(tmp, cli, scale):
    unet = _tiny_unet()
    ldm = _ldm_checkpoint(unet)
    base_path = write_tensors(tmp / "base.safetensors", ldm)
    weights = dict(unet.state_dict())
    rng = np.random.default_rng(2)
    lora = {}
    for m in UNET_MODULES:
        w = weights[m + ".weight"].shape
        rank = 3
        name = "lora_unet_" + m.replace(".", "_")
        lora[name + ".lora_down.weight"] = (rng.standard_normal((rank,) + tuple(w[1:])) * 0.2).astype(np.float32)
        lora[name + ".lora_up.weight"] = (rng.standard_normal((w[0], rank) + (1,) * (len(w) - 2)) * 0.2).astype(np.float32)
        lora[name + ".alpha"] = np.array(2.0, dtype=np.float32)
    lora_path = write_tensors(tmp / "kohya.safetensors", lora)
    mixin = diffusers.loaders.StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in lora.items()})
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="t")
    unet.fuse_lora(lora_scale=scale)
    unet.unload_lora()
    fused = {"model.diffusion_model." + _ldm_name(k): v.detach().numpy() for k, v in unet.state_dict().items()}
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:{scale}", "-o", out)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    touched = {"model.diffusion_model." + _ldm_name(m + ".weight") for m in UNET_MODULES}
    worst = 0.0
    for k, v in fused.items():
        if k in touched:
            assert not np.array_equal(v, ldm[k])
            d = float(np.max(np.abs(got[k] - v)))
            worst = max(worst, d / float(np.max(np.abs(v))))
            assert d <= 2e-6 * float(np.max(np.abs(v))), k
        else:
            assert got[k].tobytes() == ldm[k].tobytes(), k
    print(f"UNet: max relative difference to diffusers fuse_lora {worst:.2e}")


def _tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def _bfl_checkpoint(tr):
    """The diffusers FLUX weights under BFL names (fused qkv, linear1 = [q; k; v; mlp], final
    modulation (shift, scale)); checked by diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    sd = {k: v.detach().numpy().copy() for k, v in tr.state_dict().items()}
    bfl = {}
    simple = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for d, b in simple.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in sd:
                bfl[f"{b}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        s, h = np.split(sd[f"norm_out.linear.{p}"], 2)
        bfl[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([h, s])
    d, b = "transformer_blocks.0.", "double_blocks.0."
    for p in ("weight", "bias"):
        bfl[b + f"img_attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.to_{x}.{p}"] for x in "qkv"])
        bfl[b + f"txt_attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.add_{x}_proj.{p}"] for x in "qkv"])
        for dd, bb in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"), ("ff.net.0.proj", "img_mlp.0"),
                       ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                       ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            bfl[b + f"{bb}.{p}"] = sd[d + f"{dd}.{p}"]
    for dd, bb in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                   ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm")):
        bfl[b + bb + ".scale"] = sd[d + dd + ".weight"]
    d, b = "single_transformer_blocks.0.", "single_blocks.0."
    for p in ("weight", "bias"):
        bfl[b + f"linear1.{p}"] = np.concatenate([sd[d + f"attn.to_{x}.{p}"] for x in "qkv"] + [sd[d + f"proj_mlp.{p}"]])
        bfl[b + f"linear2.{p}"] = sd[d + f"proj_out.{p}"]
        bfl[b + f"modulation.lin.{p}"] = sd[d + f"norm.linear.{p}"]
    bfl[b + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
    bfl[b + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    # diffusers' converter hard-codes FLUX.1's 3072-wide linear1 split, so it checks all but the
    # single block here (whose linear1 is the plain [q; k; v; mlp] concatenation).
    probe = {"model.diffusion_model." + k: torch.from_numpy(v) for k, v in bfl.items()}
    for p in ("weight", "bias"):  # a stand-in of the width the converter expects
        probe[f"model.diffusion_model.single_blocks.0.linear1.{p}"] = torch.zeros((21504, 32)[: 2 if p == "weight" else 1])
    back = convert_flux_transformer_checkpoint_to_diffusers(probe, num_layers=1, num_single_layers=1, inner_dim=32, mlp_ratio=4.0)
    split = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")
    doubles = {k for k in sd if not (k.startswith("single_transformer_blocks.") and any(x in k for x in split))}
    back = {k: v for k, v in back.items() if k in doubles or not any(x in k for x in split)}
    assert set(back) == doubles, sorted(set(back) ^ doubles)[:6]
    for k in doubles:
        assert np.array_equal(back[k].numpy(), sd[k]), k
    return {"model.diffusion_model." + k: v for k, v in bfl.items()}


FLUX_MODULES = (  # ai-toolkit / diffusers names
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
    "norm_out.linear", "x_embedder",
)


def test_flux_diffusers_lora_matches_diffusers_fuse(tmp, cli):
    tr = _tiny_flux()
    try:
        bfl = _bfl_checkpoint(tr)
    except TypeError as e:  # converter signature of another diffusers version
        pytest.skip(f"diffusers' FLUX single-file converter differs: {e}")
    base_path = write_tensors(tmp / "flux.safetensors", bfl)
    weights = dict(tr.state_dict())
    rng = np.random.default_rng(4)
    lora = {}
    for m in FLUX_MODULES:
        w = weights[m + ".weight"].shape
        lora[f"transformer.{m}.lora_A.weight"] = (rng.standard_normal((2, w[1])) * 0.3).astype(np.float32)
        lora[f"transformer.{m}.lora_B.weight"] = (rng.standard_normal((w[0], 2)) * 0.3).astype(np.float32)
    lora_path = write_tensors(tmp / "aitk.safetensors", lora)
    mixin = diffusers.loaders.FluxLoraLoaderMixin
    sd = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in lora.items()})
    sd = sd[0] if isinstance(sd, tuple) else sd
    mixin.load_lora_into_transformer(sd, None, tr, adapter_name="t")
    tr.fuse_lora(lora_scale=0.8)
    tr.unload_lora()
    fused = _bfl_checkpoint(tr)
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:0.8", "-o", out)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    changed = [k for k in fused if not np.array_equal(fused[k], bfl[k])]
    # img_attn.qkv, txt_attn.qkv, img_attn.proj, img_mlp.0, img_mod.lin, linear1, linear2, final modulation, img_in
    assert len(changed) == 9, changed
    for k, v in fused.items():
        d = float(np.max(np.abs(got[k] - v)))
        assert d <= 2e-6 * float(np.max(np.abs(v)) or 1), (k, d)
        if k not in changed:
            assert got[k].tobytes() == bfl[k].tobytes(), k


def _tiny_sd3():
    torch.manual_seed(0)  # two blocks: the last one's context branch is pre-only (adaLN shift, scale)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                           num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                           pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)


def _sai_checkpoint(tr):
    """The diffusers SD3 weights under the single-file (SAI MMDiT) names: fused qkv, the final and
    the last block's context adaLN as (shift, scale); checked by diffusers' own
    convert_sd3_transformer_checkpoint_to_diffusers, which must give back the state dict exactly."""
    sd = {k: v.detach().numpy().copy() for k, v in tr.state_dict().items()}
    sai = {"pos_embed": sd["pos_embed.pos_embed"]}
    simple = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    swap = lambda a: np.concatenate(np.split(a, 2)[::-1])  # noqa: E731  (scale, shift) <-> (shift, scale)
    for p in ("weight", "bias"):
        for d, s in simple.items():
            sai[f"{s}.{p}"] = sd[f"{d}.{p}"]
        sai[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
        for n in (0, 1):
            d, b = f"transformer_blocks.{n}.", f"joint_blocks.{n}."
            last = n == 1
            sai[b + f"x_block.attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.to_{x}.{p}"] for x in "qkv"])
            sai[b + f"context_block.attn.qkv.{p}"] = np.concatenate([sd[d + f"attn.add_{x}_proj.{p}"] for x in "qkv"])
            ctx = sd[d + f"norm1_context.linear.{p}"]
            sai[b + f"context_block.adaLN_modulation.1.{p}"] = swap(ctx) if last else ctx
            pairs = [("attn.to_out.0", "x_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2"),
                     ("norm1.linear", "x_block.adaLN_modulation.1")]
            if not last:
                pairs += [("attn.to_add_out", "context_block.attn.proj"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                          ("ff_context.net.2", "context_block.mlp.fc2")]
            for dd, ss in pairs:
                sai[b + f"{ss}.{p}"] = sd[d + f"{dd}.{p}"]
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: torch.from_numpy(v) for k, v in sai.items()})
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:6]
    for k in sd:
        assert np.array_equal(back[k].numpy(), sd[k]), k
    return {"model.diffusion_model." + k: v for k, v in sai.items()}


SD3_MODULES = (  # diffusers' SD3 LoRA trainer / SimpleTuner names
    "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear", "transformer_blocks.1.attn.to_v",
    "transformer_blocks.1.norm1_context.linear", "norm_out.linear", "context_embedder",
)


def test_sd3_diffusers_lora_matches_diffusers_fuse(tmp, cli):
    """A diffusers-named SD3 LoRA on the single-file checkpoint: q/k/v as row thirds of the fused
    qkv, the pre-only context adaLN and the final adaLN with their halves swapped, as diffusers'
    SD3LoraLoaderMixin + fuse_lora computes on the diffusers model."""
    tr = _tiny_sd3()
    sai = _sai_checkpoint(tr)
    base_path = write_tensors(tmp / "sd3.safetensors", sai)
    weights = dict(tr.state_dict())
    rng = np.random.default_rng(5)
    lora = {}
    for m in SD3_MODULES:
        w = weights[m + ".weight"].shape
        lora[f"transformer.{m}.lora_A.weight"] = (rng.standard_normal((2, w[1])) * 0.3).astype(np.float32)
        lora[f"transformer.{m}.lora_B.weight"] = (rng.standard_normal((w[0], 2)) * 0.3).astype(np.float32)
    lora_path = write_tensors(tmp / "sd3-lora.safetensors", lora)
    mixin = diffusers.loaders.SD3LoraLoaderMixin
    sd = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in lora.items()})
    sd = sd[0] if isinstance(sd, tuple) else sd
    mixin.load_lora_into_transformer(sd, tr, adapter_name="t")
    tr.fuse_lora(lora_scale=0.7)
    tr.unload_lora()
    fused = _sai_checkpoint(tr)
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:0.7", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["loras"][0]["matched"] == len(SD3_MODULES)
    got = tensors(out)
    changed = [k for k in fused if not np.array_equal(fused[k], sai[k])]
    assert len(changed) == 9, changed  # block 0: x qkv, context qkv, context proj, context fc2, x adaLN; block 1: x qkv, context adaLN; final adaLN; context_embedder
    for k, v in fused.items():
        d = float(np.max(np.abs(got[k] - v)))
        assert d <= 2e-6 * float(np.max(np.abs(v)) or 1), (k, d)
        if k not in changed:
            assert got[k].tobytes() == sai[k].tobytes(), k
