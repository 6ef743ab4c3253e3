"""Which keys are merged, copied or sliced: integers, markers, EMA, schedule buffers, inpainting,
keys in only some inputs, per-component choices, exclusion, baked VAE, block weights."""
import json

import numpy as np
import pytest

from helpers_merge import make_model, metadata, tensors
from sdtk.errors import SdtkError, UsageError
from sdtk.ops.merge.blocks import BLOCK_LISTS, PRESETS, block_of, resolve_blocks
from sdtk.ops.merge.recipe import single_step_recipe
from sdtk.ops.merge.run import run_recipe

F32 = np.float32
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def merge(paths, out, method="weighted-sum", alpha=None, beta=None, dtype=None, **kw):
    recipe = single_step_recipe([str(p) for p in paths], method, alpha, beta, kw.pop("seed", 0), kw.pop("blocks", None),
                                kw.pop("te", "merge"), kw.pop("vae", "merge"), kw.pop("exclude", None), dtype, kw.pop("bake_vae", None))
    return run_recipe(recipe, str(out), hash_inputs=False, **kw)


def ws(a, b, alpha):
    return (F32(1 - alpha) * a.astype(F32) + F32(alpha) * b.astype(F32))


def test_ema_schedule_and_integers_come_from_primary(tmp_path):
    a = make_model(tmp_path, "a", "sd15-full-ema", seed=1, scale=32)
    b = make_model(tmp_path, "b", "sd15-full-ema", seed=2, scale=32)
    res = merge([a, b], tmp_path / "o.safetensors", alpha=0.5)
    A, O = tensors(a), tensors(tmp_path / "o.safetensors")
    ema = [k for k in A if k.startswith("model_ema.")]
    assert len(ema) > 600
    for k in ema + ["betas", "alphas_cumprod", "posterior_mean_coef1"]:
        assert O[k].tobytes() == A[k].tobytes() and O[k].dtype == A[k].dtype, k
    assert O["model_ema.num_updates"].dtype == np.int32
    copied = res.steps[0]["copied"]
    assert copied["model_ema"] == len(ema) - 1 and copied["integer"] == 2  # num_updates + position_ids
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert O[k].tobytes() == ws(A[k], tensors(b)[k], 0.5).astype(O[k].dtype).tobytes()


def test_vpred_ztsnr_markers_copied(tmp_path):
    a = make_model(tmp_path, "a", "sdxl-vpred-ztsnr", seed=1, scale=32)
    b = make_model(tmp_path, "b", "sdxl-base", seed=2, scale=32)
    res = merge([a, b], tmp_path / "o.safetensors", alpha=0.5)
    O = tensors(tmp_path / "o.safetensors")
    assert O["v_pred"].shape == (0,) and O["ztsnr"].shape == (0,)
    assert res.steps[0]["only_in_primary"] == []  # the markers are copied before the presence check
    assert res.steps[0]["copied"]["empty marker"] == 2


def test_inpainting_primary_merges_first_four_channels_only(tmp_path):
    inp = make_model(tmp_path, "inp", "sd15-inpainting", seed=1, scale=16, channels=9)
    b = make_model(tmp_path, "b", "sd15-emaonly", seed=2, scale=16)
    c = make_model(tmp_path, "c", "sd15-emaonly", seed=3, scale=16)
    res = merge([inp, b, c], tmp_path / "o.safetensors", "add-difference", 1.0)
    I, B, C, O = (tensors(p) for p in (inp, b, c, tmp_path / "o.safetensors"))
    assert I[FIRST_CONV].shape[1] == 9 and B[FIRST_CONV].shape[1] == 4
    assert res.steps[0]["sliced"] == [FIRST_CONV]
    expect = I[FIRST_CONV].copy()
    expect[:, :4] = I[FIRST_CONV][:, :4] + F32(1.0) * (B[FIRST_CONV] - C[FIRST_CONV])
    assert O[FIRST_CONV].tobytes() == expect.tobytes()
    assert O[FIRST_CONV][:, 4:].tobytes() == I[FIRST_CONV][:, 4:].tobytes()
    assert json.loads(metadata(tmp_path / "o.safetensors")["sd_merge_recipe"])["is_inpainting"] is True


def test_normal_primary_with_inpainting_secondary_is_refused(tmp_path):
    a = make_model(tmp_path, "a", "sd15-emaonly", seed=1, scale=32)
    inp = make_model(tmp_path, "inp", "sd15-inpainting", seed=2, scale=32, channels=9)
    with pytest.raises(SdtkError, match="first model"):
        merge([a, inp], tmp_path / "o.safetensors", alpha=0.5)
    assert not (tmp_path / "o.safetensors").exists()


def test_keys_in_some_inputs_only_are_kept_from_primary_and_listed(tmp_path):
    extra = ("model.extra.weight", (4, 4), "float32")
    a = make_model(tmp_path, "a", seed=1, scale=32, transform=lambda l: l.plus([extra]))
    b = make_model(tmp_path, "b", seed=2, scale=32,
                   transform=lambda l: l.without(lambda k: k == "model.diffusion_model.out.2.bias").plus([("model.only_b", (2,), "float32")]))
    res = merge([a, b], tmp_path / "o.safetensors", alpha=0.5)
    A, O = tensors(a), tensors(tmp_path / "o.safetensors")
    st = res.steps[0]
    assert sorted(st["only_in_primary"]) == ["model.diffusion_model.out.2.bias", "model.extra.weight"]
    assert st["not_in_primary"] == ["model.only_b"]
    assert "model.only_b" not in O
    for k in st["only_in_primary"]:
        assert O[k].tobytes() == A[k].tobytes()


def test_component_choices_exclude_and_dtype(tmp_path):
    a = make_model(tmp_path, "a", seed=1, scale=32)
    b = make_model(tmp_path, "b", seed=2, scale=32)
    merge([a, b], tmp_path / "o.safetensors", alpha=0.5, te="B", vae="A", exclude=r"\.middle_block\.", dtype="bf16")
    A, B, O = tensors(a), tensors(b), tensors(tmp_path / "o.safetensors")
    import ml_dtypes
    for k in A:
        if not k.startswith(("cond_stage_model.", "first_stage_model.", "model.diffusion_model.")) or A[k].dtype.kind != "f":
            continue
        if k.startswith("cond_stage_model."):
            want = B[k]
        elif k.startswith("first_stage_model.") or ".middle_block." in k:
            want = A[k]
        else:
            want = ws(A[k], B[k], 0.5)
        assert O[k].dtype == ml_dtypes.bfloat16, k
        assert O[k].tobytes() == want.astype(ml_dtypes.bfloat16).tobytes(), k
    assert O["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == np.int64


def test_bake_vae_replaces_the_vae(tmp_path):
    a = make_model(tmp_path, "a", seed=1, scale=16)
    b = make_model(tmp_path, "b", seed=2, scale=16)
    vae = make_model(tmp_path, "vae", "vae-sd-kl-f8", seed=9, scale=16)
    merge([a, b], tmp_path / "o.safetensors", alpha=0.5, bake_vae=str(vae), dtype="fp16")
    V, O = tensors(vae), tensors(tmp_path / "o.safetensors")
    baked = 0
    for k, v in V.items():
        target = "first_stage_model." + k if not k.startswith("first_stage_model.") else k
        if v.dtype.kind == "f":
            assert O[target].tobytes() == v.astype(np.float16).tobytes(), k
            baked += 1
    assert baked > 200
    md = json.loads(metadata(tmp_path / "o.safetensors")["sd_merge_recipe"])
    assert md["bake_in_vae"] == "vae.safetensors"


def test_bake_vae_of_another_architecture_is_refused(tmp_path):
    a = make_model(tmp_path, "a", seed=1, scale=32)
    b = make_model(tmp_path, "b", seed=2, scale=32)
    with pytest.raises(SdtkError):
        merge([a, b], tmp_path / "o.safetensors", bake_vae=str(make_model(tmp_path, "clip", "clip-l-hf", scale=32)))
    assert not (tmp_path / "o.safetensors").exists()


# -- block weights ------------------------------------------------------------------------------

def test_block_table_sd1():
    k = "model.diffusion_model."
    assert block_of(k + "time_embed.0.weight", "sd1") == "IN00"
    assert block_of(k + "input_blocks.0.0.weight", "sd1") == "IN00"
    assert block_of(k + "input_blocks.11.0.in_layers.0.bias", "sd1") == "IN11"
    assert block_of(k + "middle_block.1.proj_in.weight", "sd1") == "M00"
    assert block_of(k + "output_blocks.3.1.norm.weight", "sd1") == "OUT03"
    assert block_of(k + "out.2.weight", "sd1") == "OUT11"
    assert block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1") == "BASE"
    assert block_of("first_stage_model.decoder.conv_in.weight", "sd1") == "BASE"


def test_block_table_sdxl_and_flux():
    k = "model.diffusion_model."
    assert block_of(k + "label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_of(k + "out.2.weight", "sdxl") == "OUT08"
    assert block_of(k + "output_blocks.8.0.skip_connection.weight", "sdxl") == "OUT08"
    assert block_of(k + "double_blocks.18.img_attn.qkv.weight", "flux") == "D18"
    assert block_of(k + "single_blocks.37.linear1.weight", "flux") == "S37"
    assert block_of(k + "img_in.weight", "flux") == "BASE"
    assert len(BLOCK_LISTS["sd1"]) == 26 and len(BLOCK_LISTS["sdxl"]) == 20 and len(BLOCK_LISTS["flux"]) == 58


def test_block_lists_presets_and_sdxl_conversion():
    grad_v = PRESETS["GRAD_V"]
    assert grad_v[:3] == [0, 1.0, 0.9166666667] and grad_v[13] == 0 and grad_v[-1] == 1.0
    w25 = [i / 100 for i in range(25)]
    assert resolve_blocks(w25, "sd1", 0.7)["BASE"] == 0.7  # 25 values: BASE = alpha
    assert resolve_blocks(w25, "sd1", 0.7)["OUT11"] == 0.24
    sdxl = resolve_blocks(w25, "sdxl", 0.7)  # supermerger: w[:9] + w[12:22]
    assert [sdxl[n] for n in BLOCK_LISTS["sdxl"][1:]] == w25[:9] + w25[12:22]
    assert sdxl["BASE"] == 0.7
    assert resolve_blocks("FLAT_25", "sdxl", 0.5)["M00"] == 0.25
    with pytest.raises(UsageError, match="takes 20 or 19"):
        resolve_blocks([0.5] * 7, "sdxl", 0.5)
    with pytest.raises(UsageError, match="takes 26 or 25"):
        resolve_blocks([0.5] * 20, "sd1", 0.5)


def test_block_weighted_merge_uses_each_blocks_alpha(tmp_path):
    a = make_model(tmp_path, "a", seed=1, scale=32)
    b = make_model(tmp_path, "b", seed=2, scale=32)
    weights = [round(i / 25, 4) for i in range(26)]
    merge([a, b], tmp_path / "o.safetensors", blocks=weights, dtype="fp32")
    A, B, O = tensors(a), tensors(b), tensors(tmp_path / "o.safetensors")
    by_name = dict(zip(BLOCK_LISTS["sd1"], weights))
    checked = set()
    for k in A:
        if A[k].dtype.kind != "f" or "." not in k:
            continue
        w = by_name[block_of(k, "sd1")]
        assert O[k].tobytes() == ws(A[k], B[k], w).tobytes(), k
        checked.add(block_of(k, "sd1"))
    assert checked == set(BLOCK_LISTS["sd1"])


def test_flux_double_and_single_block_weights(tmp_path):
    a = make_model(tmp_path, "a", "flux1-dev", seed=1, scale=64)
    b = make_model(tmp_path, "b", "flux1-dev", seed=2, scale=64)
    weights = [round(i / 57, 4) for i in range(58)]
    res = merge([a, b], tmp_path / "o.safetensors", blocks=weights, dtype="fp32")
    assert res.family == "flux"
    A, B, O = tensors(a), tensors(b), tensors(tmp_path / "o.safetensors")
    by_name = dict(zip(BLOCK_LISTS["flux"], weights))
    for k in ("model.diffusion_model.double_blocks.5.img_attn.qkv.weight",
              "model.diffusion_model.single_blocks.30.linear1.weight", "model.diffusion_model.img_in.weight"):
        w = by_name[block_of(k, "flux")]
        assert O[k].tobytes() == ws(A[k].astype(F32), B[k].astype(F32), w).tobytes(), k
    with pytest.raises(UsageError, match="58 or 57"):
        merge([a, b], tmp_path / "x.safetensors", blocks=[0.5] * 26)


def test_sd2_family_and_block_list(tmp_path):
    a = make_model(tmp_path, "a", "sd21-768-v", seed=1, scale=32)
    b = make_model(tmp_path, "b", "sd21-768-v", seed=2, scale=32)
    res = merge([a, b], tmp_path / "o.safetensors", blocks="GRAD_A")
    assert res.family == "sd2"
    A, B, O = tensors(a), tensors(b), tensors(tmp_path / "o.safetensors")
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert O[k].tobytes() == ws(A[k], B[k], 1.0).astype(O[k].dtype).tobytes()  # GRAD_A: M00 = 1
    k = "cond_stage_model.model.ln_final.weight"
    assert O[k].tobytes() == A[k].tobytes()  # BASE = 0 in the preset


def test_ckpt_input_merges_like_its_safetensors_twin(tmp_path):
    from conftest import torch_or_skip

    torch = torch_or_skip()
    a = make_model(tmp_path, "a", seed=1, scale=64)
    b = make_model(tmp_path, "b", seed=2, scale=64)
    A = tensors(a)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in A.items()}, "global_step": 1}, tmp_path / "a.ckpt")
    merge([a, b], tmp_path / "st.safetensors", alpha=0.4)
    merge([tmp_path / "a.ckpt", b], tmp_path / "ck.safetensors", alpha=0.4)
    ST, CK = tensors(tmp_path / "st.safetensors"), tensors(tmp_path / "ck.safetensors")
    assert list(ST) == list(CK)
    for k in ST:
        assert ST[k].tobytes() == CK[k].tobytes(), k


def test_instruct_pix2pix_primary_keeps_its_extra_channels(tmp_path):
    ip2p = make_model(tmp_path, "ip2p", "sd15-emaonly", seed=1, scale=32, channels=8)
    b = make_model(tmp_path, "b", "sd15-emaonly", seed=2, scale=32)
    res = merge([ip2p, b], tmp_path / "o.safetensors", alpha=0.5, dtype="fp32")
    I, B, O = tensors(ip2p), tensors(b), tensors(tmp_path / "o.safetensors")
    assert res.steps[0]["sliced"] == [FIRST_CONV]
    assert O[FIRST_CONV][:, :4].tobytes() == ws(I[FIRST_CONV][:, :4], B[FIRST_CONV], 0.5).tobytes()
    assert O[FIRST_CONV][:, 4:].tobytes() == I[FIRST_CONV][:, 4:].tobytes()
    assert json.loads(metadata(tmp_path / "o.safetensors")["sd_merge_recipe"])["is_instruct_pix2pix"] is True
