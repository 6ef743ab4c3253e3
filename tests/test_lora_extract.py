"""`sdtk lora extract`: kohya names on real layouts (SD1 diffusers names, SDXL SGM names + OpenCLIP
in_proj thirds, FLUX BFL names), the factorisation against a full SVD and against kohya's formula
(torch.linalg.svd + torch.quantile clamp), the extracted LoRA reloaded by diffusers and ComfyUI and
by `sdtk lora apply` (tuned weights back within the truncation bound), metadata, refusals."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from helpers_lora import write_tensors
from helpers_merge import make_model, metadata, tensors
from sdtk.ops.lora import lowrank

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."

try:  # diffusers' lazy modules resolved at collection, before ComfyUI's torchvision stubs exist
    import test_lora_diffusers as diffusers_oracle

    diffusers_oracle.diffusers.UNet2DConditionModel, diffusers_oracle.diffusers.loaders.StableDiffusionLoraLoaderMixin
except pytest.skip.Exception:
    diffusers_oracle = None


def _planted(base, keys, rank, rng, size=0.05):
    """tuned = base + a rank-`rank` update on each of `keys` (float32 maths, cast to the dtype)."""
    tuned = dict(base)
    for k in keys:
        w = base[k]
        out, flat = w.shape[0], int(np.prod(w.shape[1:]))
        d = (rng.standard_normal((out, rank)) @ rng.standard_normal((rank, flat))).astype(np.float32) * size / np.sqrt(rank)
        tuned[k] = (w.astype(np.float32) + d.reshape(w.shape)).astype(w.dtype)
    return tuned


def _spectrum_matrix(m, n, rng, decay=0.5):
    """A dense difference with a decaying spectrum (what fine-tune differences look like)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.arange(1, min(m, n) + 1) ** -decay
    return ((u * s) @ v.T).astype(np.float32)


def test_exact_svd_equals_a_full_svd():
    rng = np.random.default_rng(0)
    worst_s = worst_p = 0.0
    for m, n in ((96, 160), (200, 64)):
        a = _spectrum_matrix(m, n, rng)
        U, S, Vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        u, s, vt, full = lowrank.svd_exact(a, 16, spectrum=True)
        worst_s = max(worst_s, float(np.max(np.abs(s - S[:16])) / S[0]), float(np.max(np.abs(full - S)) / S[0]))
        worst_p = max(worst_p, float(np.max(np.abs((u * s) @ vt - (U[:, :16] * S[:16]) @ Vt[:16])) / np.max(np.abs(a))))
    assert worst_s < 1e-12 and worst_p < 1e-10
    print(f"exact (Gram) SVD vs numpy.linalg.svd: singular values {worst_s:.1e}, rank-16 product {worst_p:.1e} (relative)")


def test_randomized_svd_is_near_the_optimum():
    rng = np.random.default_rng(1)
    a = _spectrum_matrix(320, 480, rng, decay=0.5)
    S = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    opt = np.sqrt(np.sum(S[32:] ** 2) / np.sum(S ** 2))
    u, s, vt = lowrank.svd_randomized(a, 32, niter=2)
    got = np.linalg.norm(a - (u * s) @ vt) / np.linalg.norm(a)
    assert got <= opt * 1.01
    u2, s2, vt2 = lowrank.svd_randomized(a, 32, niter=2)
    assert np.array_equal(s, s2)  # seeded: the same bytes every run
    print(f"randomized (niter 2, l = 2k) error {got:.5f} vs the optimum {opt:.5f} (x{got / opt:.4f})")


def _kohya_formula(torch, a, rank, quantile):
    """extract_lora_from_models.py: full SVD, U diag(S) -> up, Vh -> down, torch.quantile clamp."""
    U, S, Vh = torch.linalg.svd(torch.from_numpy(a))
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
    U = U @ torch.diag(S)
    up, down = U.numpy().copy(), Vh.numpy().copy()
    lowrank.fix_signs(up, down)  # sign convention only (the clamp below is symmetric in each pair's sign... up to the set)
    up_t, down_t = torch.from_numpy(up), torch.from_numpy(down)
    hi = torch.quantile(torch.cat([up_t.flatten(), down_t.flatten()]), quantile)
    return up_t.clamp(-hi, hi).numpy(), down_t.clamp(-hi, hi).numpy()


def test_matches_kohyas_extract_formula():
    torch = pytest.importorskip("torch")
    from sdtk.ops.lora.extract import ExtractOptions, factorise

    rng = np.random.default_rng(2)
    a = _spectrum_matrix(120, 200, rng)
    for q in (1.0, 0.99):
        up, down, k, bound = factorise(a, 12, ExtractOptions(svd="exact", clamp_quantile=q))
        kup, kdown = _kohya_formula(torch, a, 12, q) if q < 1 else _kohya_formula(torch, a, 12, 1.0)
        assert k == 12
        assert np.max(np.abs(up - kup)) <= 1e-5 * np.max(np.abs(kup))
        assert np.max(np.abs(down - kdown)) <= 1e-5
        err = np.linalg.norm(a - up @ down) / np.linalg.norm(a)
        if q == 1.0:
            assert abs(err - bound) < 1e-6  # no clamp: the Eckart-Young optimum
        else:
            assert err > bound  # the clamp costs accuracy


def _sd1_pair(tmp, rank=3, dtype=None):
    base_path = make_model(tmp, "base", "sd15-emaonly", scale=8, dtype=dtype)
    base = tensors(base_path)
    keys = [UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            UNET + "input_blocks.1.1.proj_in.weight",  # 1x1 conv
            UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
            UNET + "input_blocks.4.0.in_layers.2.weight",  # 3x3 conv (LoCon)
            UNET + "output_blocks.5.2.conv.weight",  # upsampler
            TE + "text_model.encoder.layers.3.self_attn.q_proj.weight"]
    tuned = _planted(base, keys, rank, np.random.default_rng(3))
    return base_path, write_tensors(tmp / "tuned.safetensors", tuned), base, tuned, keys


def test_sd1_extract_names_metadata_and_apply_back(tmp, cli):
    base_path, tuned_path, base, tuned, keys = _sd1_pair(tmp)
    out = tmp / "lora.safetensors"
    r = cli("lora", "extract", tuned_path, base_path, "-o", out, "--rank", "4", "--conv-rank", "4", "--dtype", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    lora = tensors(out)
    names = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in lora}
    # kohya's SD1 set: 192 attention modules + 86 ResNet/sampler modules + 72 CLIP modules (sd-scripts #1485)
    assert len(names) == 350 and len(rep["modules"]) == 350
    for n in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_down_blocks_0_attentions_0_proj_in",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "lora_unet_down_blocks_1_resnets_0_conv1",
              "lora_unet_up_blocks_1_upsamplers_0_conv", "lora_te_text_model_encoder_layers_3_self_attn_q_proj"):
        assert n in names, n
    assert lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4  # SD1 proj_in is a 1x1 conv
    assert lora["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    assert lora["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape[2:] == (1, 1)
    assert float(lora["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 4.0
    by = {m["key"]: m for m in rep["modules"]}
    for k in keys:
        assert by[k]["error"] < 1e-5, (k, by[k])  # rank 3 planted, rank 4 extracted: exact up to rounding
    assert rep["text_encoders"]["te1"]["included"] is True
    meta = metadata(out)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # addnet / AutoV3 of the bytes written
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    # applying the extracted LoRA to the base gives the tuned model back
    baked = tmp / "baked.safetensors"
    r = cli("lora", "apply", base_path, out, "-o", baked)
    assert r.returncode == 0, r.stderr
    got = tensors(baked)
    for k in keys:
        assert np.max(np.abs(got[k] - tuned[k])) <= 1e-5 * np.max(np.abs(tuned[k] - base[k])), k
    r = cli("inspect", out)  # exit 1: the scaled-down fixture's shapes are not the real SD1's (a warning)
    assert r.returncode in (0, 1) and ("SD 1" in r.stdout or "SD1" in r.stdout or "Stable Diffusion 1" in r.stdout), r.stdout


def test_sd1_extract_loads_in_comfyui(tmp):
    from test_lora_comfyui import _comfy_patched

    comfy_lora, comfy_utils = pytest.importorskip("helpers_lora").comfy_or_skip()
    from sdtk.ops.lora.extract import ExtractOptions, extract

    base_path, tuned_path, base, tuned, keys = _sd1_pair(tmp)
    out = tmp / "lora.safetensors"
    extract(str(tuned_path), str(base_path), str(out), ExtractOptions(rank=4, conv_rank=4, dtype="fp32"))
    want = _comfy_patched(comfy_lora, comfy_utils, base, tensors(out), 1.0, 1.0)
    assert len(want) == 350  # every module resolved by ComfyUI's own key maps
    for k in keys:
        assert np.max(np.abs(want[k] - tuned[k])) <= 1e-5 * np.max(np.abs(tuned[k] - base[k])), k


def test_extract_loads_in_diffusers(tmp, cli):
    if diffusers_oracle is None:
        pytest.skip("diffusers / peft / torch not installed")
    torch, diffusers = diffusers_oracle.torch, diffusers_oracle.diffusers
    _ldm_checkpoint, _ldm_name, _tiny_unet = diffusers_oracle._ldm_checkpoint, diffusers_oracle._ldm_name, diffusers_oracle._tiny_unet

    unet = _tiny_unet()
    ldm = _ldm_checkpoint(unet)
    base_path = write_tensors(tmp / "base.safetensors", ldm)
    mods = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_in",
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2", "down_blocks.1.resnets.0.conv1"]
    keys = [UNET + _ldm_name(m + ".weight") for m in mods]
    tuned = _planted(ldm, keys, 2, np.random.default_rng(4))
    tuned_path = write_tensors(tmp / "tuned.safetensors", tuned)
    out = tmp / "lora.safetensors"
    r = cli("lora", "extract", tuned_path, base_path, "-o", out, "--rank", "4", "--conv-rank", "4", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    lora = {k: torch.from_numpy(v) for k, v in tensors(out).items()}
    mixin = diffusers.loaders.StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict(lora)
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="x")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = {UNET + _ldm_name(k): v.detach().numpy() for k, v in unet.state_dict().items()}
    for k in keys:
        assert np.max(np.abs(fused[k] - tuned[k])) <= 1e-5 * np.max(np.abs(tuned[k] - ldm[k])), k


def test_sdxl_sgm_names_openclip_thirds_and_unchanged_text_encoder(tmp, cli):
    base_path = make_model(tmp, "xl", "sdxl-base", scale=16)
    base = tensors(base_path)
    inproj = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
    keys = [UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", inproj]
    tuned = _planted(base, keys, 2, np.random.default_rng(5))
    tuned_path = write_tensors(tmp / "tuned.safetensors", tuned)
    out = tmp / "lora.safetensors"
    r = cli("lora", "extract", tuned_path, base_path, "-o", out, "--rank", "8", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["text_encoders"] == {"te1": {"max_diff": 0.0, "included": False},
                                    "te2": {"max_diff": pytest.approx(rep["text_encoders"]["te2"]["max_diff"]), "included": True}}
    lora = tensors(out)
    names = {k.split(".")[0] for k in lora}
    assert len([n for n in names if n.startswith("lora_unet_")]) == 722  # kohya's SDXL U-Net count
    assert not any(n.startswith("lora_te1_") for n in names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    third = base[inproj].shape[0] // 3
    for i, p in enumerate(("q", "k", "v")):
        name = f"lora_te2_text_model_encoder_layers_2_self_attn_{p}_proj"
        up, down = lora[name + ".lora_up.weight"].astype(np.float32), lora[name + ".lora_down.weight"].astype(np.float32)
        want = tuned[inproj][i * third:(i + 1) * third].astype(np.float32) - base[inproj][i * third:(i + 1) * third]
        assert np.max(np.abs(up @ down - want)) <= 2e-3 * np.max(np.abs(want))  # fp16 factors
    meta = metadata(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # --components unet: no text encoder at all
    out2 = tmp / "unet.safetensors"
    r = cli("lora", "extract", tuned_path, base_path, "-o", out2, "--rank", "2", "--components", "unet")
    assert r.returncode == 0, r.stderr
    assert not any(k.startswith("lora_te") for k in tensors(out2))


def test_flux_names_and_dynamic_rank(tmp, cli):
    import re

    few = re.compile(r"\.(double_blocks\.([1-9]|1\d)|single_blocks\.([2-9]|[1-3]\d))\.")  # blocks 0 and 0-1 kept (test speed)
    base_path = make_model(tmp, "flux", "flux1-dev", scale=16, dtype="float32", transform=lambda lay: lay.without(lambda k: bool(few.search(k))))
    base = tensors(base_path)
    qkv = UNET + "double_blocks.0.img_attn.qkv.weight"
    lin1 = UNET + "single_blocks.1.linear1.weight"
    tuned = _planted(base, [qkv, lin1], 3, np.random.default_rng(6))
    tuned_path = write_tensors(tmp / "tuned.safetensors", tuned)
    out = tmp / "lora.safetensors"
    r = cli("lora", "extract", tuned_path, base_path, "-o", out, "--rank", "16", "--dynamic", "sv_fro:0.999",
            "--json", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    by = {m["key"]: m for m in rep["modules"]}
    assert by[qkv]["rank"] <= 4 and by[lin1]["rank"] <= 4  # kohya's sv_fro: one more than the 3 that suffice, at most
    assert by[qkv]["error"] < 1e-4
    lora = tensors(out)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in lora
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in lora
    assert not any("norm" in k for k in lora)
    meta = metadata(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_refusals(tmp, cli):
    sd1 = make_model(tmp, "sd1", "sd15-emaonly", scale=8)
    xl = make_model(tmp, "xl", "sdxl-base", scale=16)
    out = tmp / "o.safetensors"
    r = cli("lora", "extract", xl, sd1, "-o", out)
    assert r.returncode == 2 and not out.exists()
    assert "xl.safetensors" in r.stderr and "architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = make_model(tmp, "sd1b", "sd15-emaonly", scale=4)  # same names, other shapes
    r = cli("lora", "extract", other, sd1, "-o", out)
    assert r.returncode == 2 and not out.exists() and "not a fine-tune of this base" in r.stderr
    r = cli("lora", "extract", sd1, sd1, "-o", out, "--dynamic", "sv_fro:x")
    assert r.returncode == 2 and "METHOD:NUMBER" in r.stderr
    r = cli("lora", "extract", sd1, sd1, "-o", tmp / "o.ckpt")
    assert r.returncode == 2 and ".safetensors" in r.stderr
    bad = tensors(sd1)
    k = UNET + "input_blocks.1.1.proj_in.weight"
    bad[k] = bad[k].copy()
    bad[k].reshape(-1)[0] = np.nan
    bad_path = write_tensors(tmp / "nan.safetensors", bad)
    r = cli("lora", "extract", bad_path, sd1, "-o", out)
    assert r.returncode == 2 and not out.exists() and "NaN" in r.stderr
    assert not list(tmp.glob("*.tmp*")) and not list(tmp.glob(".*sdtk*"))
