"""`sdtk lora convert`: kohya <-> diffusers <-> ComfyUI names on real layouts (SD1.5, SDXL with
OpenCLIP in_proj slices, FLUX fused qkv / linear1), judged by what matters: `lora apply` of each
converted file onto the same base gives the same tensors as applying the original. Oracles:
diffusers' own loader + fuse_lora on our diffusers output, ComfyUI's key map on our comfyui output.
Bad input: one line, exit 2, nothing written."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, metadata, tensors

from sdtk.ops.lora.convert import scale_split
from sdtk.ops.lora.naming import base_units


def _kohya_lora(base_path, pick, rng, rank=4, alpha=2.0, kinds=None):
    """A kohya LoRA over the base's own kohya units (naming.base_units) chosen by `pick(unit)`;
    `kinds(unit)` gives (family, options) per module (default plain LoRA)."""
    base = tensors(base_path)
    shapes = {k: v.shape for k, v in base.items()}
    out = {}
    for u in base_units(shapes, "kohya"):
        if not pick(u):
            continue
        shape = base[u.target.weight].shape
        if u.target.rows:
            shape = (u.target.rows[1],) + tuple(shape[1:])
        if u.target.transpose:
            shape = tuple(reversed(shape))
        kind, opts = kinds(u) if kinds else ("lora", {})
        out.update(lora_family(u.name, kind, shape, rng, rank=rank, alpha=alpha, **opts))
    return out


def _applied(cli, tmp, base_path, lora_path, tag):
    out = tmp / f"applied-{tag}.safetensors"
    r = cli("lora", "apply", base_path, lora_path, "-o", out)
    assert r.returncode == 0, r.stderr
    return tensors(out)


def _max_rel(a, b):
    worst = 0.0
    for k in a:
        d = float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0
        worst = max(worst, d / (float(np.max(np.abs(a[k]))) or 1.0))
    return worst


def _convert(cli, src, to, dest, base):
    r = cli("lora", "convert", src, "--to", to, "-o", dest, "--base", base, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _round_trips(cli, tmp, base_path, lora, label, expect_split=0):
    src = write_tensors(tmp / f"{label}-kohya.safetensors", lora, {"ss_network_dim": "4", "ss_base_model_version": "x"})
    want = _applied(cli, tmp, base_path, src, "orig")
    base = tensors(base_path)
    changed = [k for k in want if want[k].tobytes() != base[k].tobytes()]
    assert changed
    report = {}
    for to in ("diffusers", "comfyui"):
        mid = tmp / f"{label}-{to}.safetensors"
        back = tmp / f"{label}-{to}-kohya.safetensors"
        info = _convert(cli, src, to, mid, base_path)
        _convert(cli, mid, "kohya", back, base_path)
        keys = tensors(mid)
        if to == "diffusers":
            assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys), sorted(keys)[:3]
            assert all(k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys)
            assert info["split"] == expect_split
        else:
            assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys), sorted(keys)[:3]
        assert tensors(back).keys() == lora.keys() if not expect_split else True
        for f, tag in ((mid, to), (back, to + "-back")):
            got = _applied(cli, tmp, base_path, f, tag)
            assert got.keys() == want.keys()
            rel = _max_rel(want, got)
            report[tag] = rel
            assert rel <= 2e-6, (tag, rel)
            for k in want:
                if k not in changed:
                    assert got[k].tobytes() == want[k].tobytes(), k
    print(f"{label}: max relative difference of the applied results: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
    return src


def test_scale_split_is_kohyas():
    # start (s, 1); while 2 * down < up: double down, halve up (sd-scripts convert_flux_lora.py)
    assert scale_split(1.0) == (1.0, 1.0)
    assert scale_split(4.0) == (4.0, 1.0)
    d, u = scale_split(1 / 16)
    assert d * u == 1 / 16 and d == 0.25 and u == 0.25
    d, u = scale_split(0.3)
    assert abs(d * u - 0.3) < 1e-15 and not d * 2 < u


def test_sd15_round_trips(tmp, cli):
    base_path = make_model(tmp, "sd15", "sd15-emaonly", scale=8, dtype="float32")
    rng = np.random.default_rng(3)
    # attention Linears, 1x1 proj_in convs, 3x3 resnet convs (LoCon), text encoder; alpha != rank
    pick = lambda u: u.group in ("attn", "te") and zlib.crc32(u.name.encode()) % 3 == 0 or u.name.endswith(("resnets_0_conv1", "proj_in"))  # noqa: E731
    lora = _kohya_lora(base_path, pick, rng, alpha=1.0)
    assert any(k.startswith("lora_te_") for k in lora) and any("conv1" in k for k in lora)
    _round_trips(cli, tmp, base_path, lora, "sd15")


def test_sdxl_round_trips_with_openclip_slices(tmp, cli):
    base_path = make_model(tmp, "sdxl", "sdxl-base", scale=16, dtype="float32")
    rng = np.random.default_rng(4)
    pick = lambda u: (u.group == "attn" and ("input_blocks_4_" in u.name or "middle_block" in u.name)) or (  # noqa: E731
        u.group == "te" and ("layers_1_" in u.name or "layers_3_" in u.name))
    lora = _kohya_lora(base_path, pick, rng, alpha=8.0)
    assert "lora_te2_text_model_encoder_layers_3_self_attn_k_proj.lora_down.weight" in lora
    _round_trips(cli, tmp, base_path, lora, "sdxl")
    names = tensors(tmp / "sdxl-diffusers.safetensors")
    assert "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj.lora_A.weight" in names


def _flux_pick(u):
    return (u.name.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_1_"))
            and "norm" not in u.name) or u.name in ("lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in",
                                                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")


def test_flux_round_trips_split_and_fuse(tmp, cli):
    base_path = make_model(tmp, "flux", "flux1-dev-aio", scale=32, dtype="float32")
    base = tensors(base_path)
    hidden = base["model.diffusion_model.single_blocks.1.linear2.weight"].shape[0]
    assert hidden != 3072  # the split sizes come from the base, not FLUX.1's width
    rng = np.random.default_rng(5)
    lora = _kohya_lora(base_path, _flux_pick, rng, alpha=3.0)
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in lora
    _round_trips(cli, tmp, base_path, lora, "flux", expect_split=3)  # img qkv, txt qkv, linear1
    mid = tensors(tmp / "flux-diffusers.safetensors")
    # linear1 = [q; k; v; mlp]: to_q rows = hidden, proj_mlp = the rest
    assert mid["transformer.single_transformer_blocks.1.attn.to_q.lora_B.weight"].shape == (hidden, 4)
    mlp = base["model.diffusion_model.single_blocks.1.linear1.weight"].shape[0] - 3 * hidden
    assert mid["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"].shape == (mlp, 4)
    back = tensors(tmp / "flux-diffusers-kohya.safetensors")
    # fused again: the parts share kohya's down, so it is kept (rank 4, not 4 x 4) with alpha = rank
    # (the scale 3/4 stays folded in the factors)
    assert back["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 4
    assert float(back["lora_unet_single_blocks_1_linear1.alpha"]) == 4.0
    # diffusers -> kohya -> diffusers: the block-diagonal fuse is chunked, not copied (ranks kept)
    again = tmp / "flux-again.safetensors"
    _convert(cli, tmp / "flux-diffusers-kohya.safetensors", "diffusers", again, base_path)
    a = tensors(again)
    for k, v in mid.items():
        assert a[k].shape == v.shape, k
        assert np.allclose(a[k], v, rtol=1e-6, atol=1e-7), k


def _sd3_pick(u):  # the scaled layout keeps SD3 medium's 24 blocks; block 23's context branch is pre-only
    return (u.name.startswith(("lora_unet_joint_blocks_0_", "lora_unet_joint_blocks_23_")) and "_ln_" not in u.name) \
        or u.name in ("lora_unet_final_layer_adaLN_modulation_1", "lora_unet_context_embedder")


def test_sd3_round_trips_split_fuse_and_swap(tmp, cli):
    """kohya SD3 (SAI names: fused x/context qkv) -> diffusers (to_q/k/v and add_*_proj row thirds,
    final and pre-only context adaLN halves swapped) -> kohya and comfyui: the same applied
    weights each way; diffusers' own loader: tests/test_lora_diffusers.py."""
    base_path = make_model(tmp, "sd3", "sd3-medium-incl-clips", scale=16, dtype="float32")
    lora = _kohya_lora(base_path, _sd3_pick, np.random.default_rng(7), alpha=3.0)
    assert "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.lora_up.weight" in lora
    _round_trips(cli, tmp, base_path, lora, "sd3", expect_split=4)  # blocks 0 and 23: x qkv, context qkv
    mid = tensors(tmp / "sd3-diffusers.safetensors")
    third = tensors(base_path)["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape[0] // 3
    assert mid["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"].shape == (third, 4)
    assert "transformer.transformer_blocks.23.norm1_context.lora_A.weight" not in mid
    assert "transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight" in mid
    assert "transformer.norm_out.linear.lora_B.weight" in mid


def test_flux_independent_parts_fuse_block_diagonal(tmp, cli):
    """ai-toolkit-style parts with their own downs and ranks (to_q rank 2, to_k rank 3, proj_mlp
    rank 2, no to_v): fused into kohya's linear1 with downs stacked and a block-diagonal up (rank 7,
    alpha 7); to_v's rows stay zero. Applied results equal; back to diffusers equals too."""
    base_path = make_model(tmp, "flux", "flux1-dev", scale=32, dtype="float32")
    base = tensors(base_path)
    hidden = base["model.diffusion_model.single_blocks.0.linear2.weight"].shape[0]
    width = base["model.diffusion_model.single_blocks.0.linear1.weight"].shape[1]
    mlp = base["model.diffusion_model.single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    rng = np.random.default_rng(16)
    lora = {}
    for part, rows, rank in (("attn.to_q", hidden, 2), ("attn.to_k", hidden, 3), ("proj_mlp", mlp, 2)):
        name = f"transformer.single_transformer_blocks.0.{part}"
        lora[name + ".lora_A.weight"] = (rng.standard_normal((rank, width)) * 0.1).astype(np.float32)
        lora[name + ".lora_B.weight"] = (rng.standard_normal((rows, rank)) * 0.1).astype(np.float32)
    src = write_tensors(tmp / "aitk.safetensors", lora)
    want = _applied(cli, tmp, base_path, src, "src")
    k = tmp / "k.safetensors"
    assert _convert(cli, src, "kohya", k, base_path)["fused"] == 1
    got = tensors(k)
    up = got["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * hidden + mlp, 7) and float(got["lora_unet_single_blocks_0_linear1.alpha"]) == 7.0
    assert not np.any(up[2 * hidden:3 * hidden]) and not np.any(up[:hidden, 2:])
    assert _max_rel(want, _applied(cli, tmp, base_path, k, "k")) <= 2e-6
    d = tmp / "d.safetensors"
    _convert(cli, k, "diffusers", d, base_path)
    assert _max_rel(want, _applied(cli, tmp, base_path, d, "d")) <= 2e-6


def test_diffusers_input_with_header_alpha(tmp, cli):
    """A diffusers file whose scale is in its header (lora_adapter_metadata): the kohya output's
    alpha carries it (the header is not copied), and the applied result is unchanged."""
    base_path = make_model(tmp, "sd15", "sd15-emaonly", scale=8, dtype="float32")
    base = tensors(base_path)
    shapes = {k: v.shape for k, v in base.items()}
    rng = np.random.default_rng(6)
    lora = {}
    for u in base_units(shapes, "diffusers")[:40:7]:
        w = base[u.target.weight].shape
        lora[u.name + ".lora_A.weight"] = (rng.standard_normal((2,) + tuple(w[1:])) * 0.1).astype(np.float32)
        lora[u.name + ".lora_B.weight"] = (rng.standard_normal((w[0], 2) + (1,) * (len(w) - 2)) * 0.1).astype(np.float32)
    src = write_tensors(tmp / "peft.safetensors", lora, {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 5})})
    want = _applied(cli, tmp, base_path, src, "src")
    out = tmp / "k.safetensors"
    _convert(cli, src, "kohya", out, base_path)
    got = tensors(out)
    assert "lora_adapter_metadata" not in metadata(out)
    assert {float(v) for k, v in got.items() if k.endswith(".alpha")} == {5.0}
    assert _max_rel(want, _applied(cli, tmp, base_path, out, "k")) == 0.0


def test_lycoris_types_rename_to_kohya_and_comfyui_but_not_diffusers(tmp, cli):
    base_path = make_model(tmp, "sd15", "sd15-emaonly", scale=8, dtype="float32")
    rng = np.random.default_rng(7)
    kinds = {"attn1_to_q": ("loha", {}), "attn2_to_v": ("lokr", {"factors": (4, 4), "w2_factorised": True}),
             "resnets_0_conv1": ("tucker", {})}

    def kind(u):
        return next((v for k, v in kinds.items() if u.name.endswith(k)), ("lora", {"dora": "out"}))

    pick = lambda u: "down_blocks_1_" in u.name and (u.group == "attn" or u.name.endswith("resnets_0_conv1"))  # noqa: E731
    lora = _kohya_lora(base_path, pick, rng, kinds=kind)
    src = write_tensors(tmp / "lyco.safetensors", lora)
    want = _applied(cli, tmp, base_path, src, "src")
    comfy = tmp / "comfy.safetensors"
    _convert(cli, src, "comfy", comfy, base_path)
    assert any(k.endswith(".hada_w1_a") for k in tensors(comfy)) and any(k.endswith(".dora_scale") for k in tensors(comfy))
    back = tmp / "back.safetensors"
    _convert(cli, comfy, "kohya", back, base_path)
    assert {k: v.tobytes() for k, v in tensors(back).items()} == {k: v.tobytes() for k, v in lora.items()}
    assert _max_rel(want, _applied(cli, tmp, base_path, comfy, "comfy")) == 0.0
    bad = tmp / "bad.safetensors"
    r = cli("lora", "convert", src, "--to", "diffusers", "-o", bad, "--base", base_path)
    assert r.returncode == 2 and not bad.exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "plain LoRA" in r.stderr


def test_without_base_uses_the_shipped_layout(tmp, cli):
    """A real-size SD1.5 kohya LoRA (rank 1): names resolved on the shipped sd15 layout."""
    from sdtk.identify.lora_facts import _layout_table

    shapes, _ = _layout_table("sd15-emaonly")
    rng = np.random.default_rng(8)
    lora = {}
    for u in [u for u in base_units(shapes, "kohya") if u.group == "attn"][:30:5]:
        lora.update(lora_family(u.name, "lora", shapes[u.target.weight], rng, rank=1, alpha=1.0))
    src = write_tensors(tmp / "real.safetensors", lora, {"ss_base_model_version": "sd_v1"})
    out = tmp / "d.safetensors"
    r = cli("lora", "convert", src, "--to", "diffusers", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "sd15-emaonly" in r.stdout
    got = tensors(out)
    want = {u.name for u in base_units(shapes, "diffusers")}
    assert {k.rsplit(".lora_", 1)[0] for k in got} <= want and len(got) == len(lora) - len(lora) // 3
    meta = json.loads(metadata(out)["sdtk.lineage"])
    assert "lora convert to diffusers" in meta[-1]["operations"][0]
    assert metadata(out)["ss_base_model_version"] == "sd_v1"


def test_bad_input(tmp, cli):
    base_path = make_model(tmp, "sd15", "sd15-emaonly", scale=8, dtype="float32")
    rng = np.random.default_rng(9)
    lora = _kohya_lora(base_path, lambda u: u.name.endswith("attn1_to_q"), rng)
    src = write_tensors(tmp / "ok.safetensors", lora)
    out = tmp / "out.safetensors"

    def refused(*args, where=None):
        r = cli("lora", "convert", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        if where:
            assert where in r.stderr, r.stderr
        return r

    refused(src, "--to", "a1111", "-o", out, where="--to")
    assert not out.exists()
    refused(base_path, "--to", "kohya", "-o", out, "--base", base_path, where="sd15")  # a checkpoint, not a LoRA
    assert not out.exists()
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp / "evil.pt"
    evil.write_bytes(pickle.dumps({"x.lora_down.weight": Evil()}))
    refused(evil, "--to", "kohya", "-o", out, "--base", base_path, where="evil.pt")
    assert not out.exists()
    out.write_bytes(b"keep")
    refused(src, "--to", "diffusers", "-o", out, "--base", base_path, where="out.safetensors")
    assert out.read_bytes() == b"keep"
    refused(src, "--to", "diffusers", "-o", tmp / "nobase.safetensors", where="--base")  # scaled: the shipped layout does not fit
    assert not (tmp / "nobase.safetensors").exists()
    other = make_model(tmp, "flux", "flux1-dev", scale=64, dtype="float32")
    out2 = tmp / "o2.safetensors"
    refused(src, "--to", "diffusers", "-o", out2, "--base", other, where="ok.safetensors")
    assert not out2.exists()


# ---------------------------------------------------------------------------------------------
# Oracles: diffusers loads our diffusers output; ComfyUI's key maps take every key of our comfyui output.

def _diffusers_or_skip():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import test_lora_diffusers as tld

    return tld


def test_diffusers_output_fused_by_diffusers_equals_sdtk_apply_unet(tmp, cli):
    tld = _diffusers_or_skip()
    import torch

    unet = tld._tiny_unet()
    ldm = tld._ldm_checkpoint(unet)
    base_path = write_tensors(tmp / "base.safetensors", ldm)
    weights = dict(unet.state_dict())
    rng = np.random.default_rng(11)
    lora = {}
    for m in tld.UNET_MODULES:  # attn, ff, 1x1 proj_in, 3x3 resnet LoCon, time_emb_proj; alpha/rank = 2/3
        w = weights[m + ".weight"].shape
        name = "lora_unet_" + m.replace(".", "_")
        lora[name + ".lora_down.weight"] = (rng.standard_normal((3,) + tuple(w[1:])) * 0.2).astype(np.float32)
        lora[name + ".lora_up.weight"] = (rng.standard_normal((w[0], 3) + (1,) * (len(w) - 2)) * 0.2).astype(np.float32)
        lora[name + ".alpha"] = np.array(2.0, dtype=np.float32)
    src = write_tensors(tmp / "kohya.safetensors", lora)
    out = tmp / "diffusers.safetensors"
    _convert(cli, src, "diffusers", out, base_path)
    ours = tensors(out)
    assert all(k.startswith("unet.") and ".lora_" in k for k in ours)
    mixin = tld.diffusers.loaders.StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="c")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = {"model.diffusion_model." + tld._ldm_name(k): v.detach().numpy() for k, v in unet.state_dict().items()}
    got = _applied(cli, tmp, base_path, src, "src")
    touched = {"model.diffusion_model." + tld._ldm_name(m + ".weight") for m in tld.UNET_MODULES}
    worst = 0.0
    for k, v in fused.items():
        if k in touched:
            assert not np.array_equal(v, ldm[k]), k
            d = float(np.max(np.abs(got[k] - v)))
            worst = max(worst, d / float(np.max(np.abs(v))))
            assert d <= 2e-6 * float(np.max(np.abs(v))), (k, d)
        else:
            assert got[k].tobytes() == v.tobytes(), k
    print(f"UNet: diffusers fuse_lora of the converted file vs sdtk apply of the kohya source: max relative difference {worst:.2e}")


def test_diffusers_output_fused_by_diffusers_equals_sdtk_apply_flux(tmp, cli):
    """kohya FLUX (fused qkv / linear1, alpha 3 of rank 2) on a 32-wide FLUX: diffusers' own kohya
    converter hard-codes 3072 for linear1 (reference §1.3); our split output loads directly."""
    tld = _diffusers_or_skip()
    import torch

    tr = tld._tiny_flux()
    try:
        bfl = tld._bfl_checkpoint(tr)
    except TypeError as e:
        pytest.skip(f"diffusers' FLUX single-file converter differs: {e}")
    base_path = write_tensors(tmp / "flux.safetensors", bfl)
    rng = np.random.default_rng(12)
    modules = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
               "double_blocks.0.img_mlp.0", "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1",
               "single_blocks.0.linear2", "final_layer.adaLN_modulation.1", "img_in")
    lora = {}
    for m in modules:
        w = bfl["model.diffusion_model." + m + ".weight"].shape
        lora.update(lora_family("lora_unet_" + m.replace(".", "_"), "lora", w, rng, rank=2, alpha=3.0))
    src = write_tensors(tmp / "kohya-flux.safetensors", lora)
    out = tmp / "diffusers-flux.safetensors"
    info = _convert(cli, src, "diffusers", out, base_path)
    assert info["split"] == 3 and info["alpha_folded"] == len(modules)
    ours = tensors(out)
    mixin = tld.diffusers.loaders.FluxLoraLoaderMixin
    sd = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
    sd = sd[0] if isinstance(sd, tuple) else sd
    mixin.load_lora_into_transformer(sd, None, tr, adapter_name="c")
    tr.fuse_lora(lora_scale=1.0)
    tr.unload_lora()
    fused = tld._bfl_checkpoint(tr)
    got = _applied(cli, tmp, base_path, src, "src")
    changed = [k for k in fused if not np.array_equal(fused[k], bfl[k])]
    assert len(changed) == len(modules), changed
    worst = 0.0
    for k, v in fused.items():
        d = float(np.max(np.abs(got[k] - v)))
        worst = max(worst, d / (float(np.max(np.abs(v))) or 1.0))
        assert d <= 2e-6 * (float(np.max(np.abs(v))) or 1.0), (k, d)
    print(f"FLUX: diffusers fuse_lora of the converted file vs sdtk apply of the kohya source: max relative difference {worst:.2e}")


def _comfy_key_map(comfy_lora, comfy_utils, base):
    """ComfyUI's own key map over this base as ComfyUI loads it: UNet/DiT `diffusion_model.*`, text
    encoders in HF layout (OpenCLIP converted by comfy.utils.clip_text_transformers_convert)."""
    from test_lora_comfyui import SD1_UNET_CONFIG, _FakeModel

    unet = ["diffusion_model." + k[len("model.diffusion_model."):] for k in base if k.startswith("model.diffusion_model.")]
    clip = {}
    for ckpt, comfy in (("cond_stage_model.transformer.", "clip_l.transformer."), ("conditioner.embedders.0.transformer.", "clip_l.transformer."),
                        ("text_encoders.clip_l.transformer.", "clip_l.transformer."), ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.")):
        clip.update({comfy + k[len(ckpt):]: None for k in base if k.startswith(ckpt)})
    g = {k: base[k] for k in base if k.startswith("conditioner.embedders.1.model.")}
    if g:
        clip.update({k: None for k in comfy_utils.clip_text_transformers_convert(g, "conditioner.embedders.1.model.", "clip_g.transformer.")})
    config = SD1_UNET_CONFIG if any(k.startswith("model.diffusion_model.input_blocks.") for k in base) and "model.diffusion_model.label_emb.0.0.weight" not in base else {}
    key_map = {}
    comfy_lora.model_lora_keys_unet(_FakeModel(unet, config), key_map)
    comfy_lora.model_lora_keys_clip(_FakeModel(list(clip)), key_map)
    return key_map


@pytest.mark.parametrize("layout,scale,pick", [
    ("sdxl-base", 16, lambda u: ("input_blocks_4_" in u.name and u.group == "attn") or (u.group == "te" and "layers_2_" in u.name)),
    ("flux1-dev-aio", 32, _flux_pick),
])
def test_comfyui_loads_every_key_of_the_comfyui_output(tmp, cli, caplog, layout, scale, pick):
    import logging

    from helpers_lora import comfy_or_skip

    comfy_lora, comfy_utils = comfy_or_skip()
    import torch

    base_path = make_model(tmp, "base", layout, scale=scale, dtype="float32")
    base = tensors(base_path)
    lora = _kohya_lora(base_path, pick, np.random.default_rng(13))
    src = write_tensors(tmp / "kohya.safetensors", lora)
    out = tmp / "comfy.safetensors"
    info = _convert(cli, src, "comfyui", out, base_path)
    ours = tensors(out)
    key_map = _comfy_key_map(comfy_lora, comfy_utils, {k: torch.from_numpy(v) for k, v in base.items()})
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora({k: torch.from_numpy(v) for k, v in ours.items()}, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()], caplog.text[:500]
    assert len(patches) == info["modules_out"]
    if layout.startswith("sdxl"):
        assert any(k[0].startswith("clip_g.") if isinstance(k, tuple) else k.startswith("clip_g.") for k in patches)


def test_comfyui_output_values_match_comfyui_sd1(tmp, cli):
    """SD1.5 kohya LoRA / LoCon / LoHa -> comfyui names: ComfyUI's load_lora + calculate_weight of
    our output equal sdtk apply of the source."""
    from helpers_lora import comfy_or_skip

    comfy_lora, comfy_utils = comfy_or_skip()
    from test_lora_comfyui import _comfy_patched

    base_path = make_model(tmp, "sd15", "sd15-emaonly", scale=8, dtype="float32")
    base = tensors(base_path)
    kinds = lambda u: ("loha", {}) if u.name.endswith("ff_net_2") else ("lora", {})  # noqa: E731
    pick = lambda u: "down_blocks_1_" in u.name and (u.group in ("attn", "conv")) or "layers_4_" in u.name  # noqa: E731
    lora = _kohya_lora(base_path, pick, np.random.default_rng(14), kinds=kinds)
    src = write_tensors(tmp / "kohya.safetensors", lora)
    out = tmp / "comfy.safetensors"
    _convert(cli, src, "comfyui", out, base_path)
    want = _comfy_patched(comfy_lora, comfy_utils, base, tensors(out), 1.0, 1.0)
    got = _applied(cli, tmp, base_path, src, "src")
    assert want
    worst = 0.0
    for k, v in want.items():
        d = float(np.max(np.abs(got[k].astype(np.float64) - v)))
        worst = max(worst, d / (float(np.max(np.abs(v))) or 1.0))
        assert d <= 1e-5 * (float(np.max(np.abs(v))) or 1.0), (k, d)
    print(f"ComfyUI on the converted file vs sdtk apply of the source: max relative difference {worst:.2e}")


def test_dora_to_diffusers_fused_by_diffusers_equals_sdtk_apply(tmp, cli):
    """Output-axis DoRA (LyCORIS wd_on_out `dora_scale` (out, 1[, 1, 1])) -> diffusers
    `lora_magnitude_vector`: diffusers' DoRA fuse equals sdtk apply of the source; back to kohya
    gives the same applied result; an input-axis dora_scale is refused for diffusers."""
    tld = _diffusers_or_skip()
    import torch

    unet = tld._tiny_unet()
    ldm = tld._ldm_checkpoint(unet)
    base_path = write_tensors(tmp / "base.safetensors", ldm)
    weights = dict(unet.state_dict())
    rng = np.random.default_rng(15)
    modules = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
               "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", "down_blocks.1.resnets.0.conv1")
    lora = {}
    for m in modules:
        lora.update(lora_family("lora_unet_" + m.replace(".", "_"), "lora", weights[m + ".weight"].shape, rng, rank=3, alpha=2.0, dora="out"))
    src = write_tensors(tmp / "dora.safetensors", lora)
    out = tmp / "dora-diffusers.safetensors"
    _convert(cli, src, "diffusers", out, base_path)
    ours = tensors(out)
    assert sum(k.endswith(".lora_magnitude_vector.weight") for k in ours) == len(modules)
    mixin = tld.diffusers.loaders.StableDiffusionLoraLoaderMixin
    sd, alphas = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="d")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = {"model.diffusion_model." + tld._ldm_name(k): v.detach().numpy() for k, v in unet.state_dict().items()}
    got = _applied(cli, tmp, base_path, src, "src")
    touched = {"model.diffusion_model." + tld._ldm_name(m + ".weight") for m in modules}
    worst = 0.0
    for k in touched:
        assert not np.array_equal(fused[k], ldm[k]), k
        d = float(np.max(np.abs(got[k] - fused[k])))
        worst = max(worst, d / float(np.max(np.abs(fused[k]))))
        assert d <= 2e-6 * float(np.max(np.abs(fused[k]))), (k, d)
    print(f"DoRA: diffusers fuse_lora of the converted file vs sdtk apply of the source: max relative difference {worst:.2e}")
    back = tmp / "dora-back.safetensors"
    _convert(cli, out, "kohya", back, base_path)
    assert _max_rel(got, _applied(cli, tmp, base_path, back, "back")) <= 2e-6
    lora_in = dict(lora)
    name = "lora_unet_" + modules[0].replace(".", "_")
    lora_in[name + ".dora_scale"] = np.ones((1, weights[modules[0] + ".weight"].shape[1]), np.float32) * 1.5
    lora_in = {k: v for k, v in lora_in.items() if not k.startswith("lora_unet_" + modules[3].replace(".", "_"))}
    bad_src = write_tensors(tmp / "dora-in.safetensors", lora_in)
    bad = tmp / "bad.safetensors"
    r = cli("lora", "convert", bad_src, "--to", "diffusers", "-o", bad, "--base", base_path)
    assert r.returncode == 2 and not bad.exists() and "per input column" in r.stderr, r.stderr


def test_diffusers_output_fused_by_diffusers_equals_sdtk_apply_sd3(tmp, cli):
    """kohya SD3 (SAI names, alpha 3 of rank 2) on a small SD3 -> `--to diffusers`: diffusers'
    SD3LoraLoaderMixin + fuse_lora of our file equals sdtk apply of the kohya source (fused qkv
    split into thirds, the final and pre-only context adaLN swapped)."""
    tld = _diffusers_or_skip()
    import torch

    tr = tld._tiny_sd3()
    sai = tld._sai_checkpoint(tr)
    base_path = write_tensors(tmp / "sd3.safetensors", sai)
    rng = np.random.default_rng(13)
    modules = ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.x_block.mlp.fc1",
               "joint_blocks.0.context_block.attn.proj", "joint_blocks.1.context_block.adaLN_modulation.1",
               "joint_blocks.1.x_block.attn.qkv", "final_layer.adaLN_modulation.1", "context_embedder")
    lora = {}
    for m in modules:
        w = sai["model.diffusion_model." + m + ".weight"].shape
        lora.update(lora_family("lora_unet_" + m.replace(".", "_"), "lora", w, rng, rank=2, alpha=3.0))
    src = write_tensors(tmp / "kohya-sd3.safetensors", lora)
    out = tmp / "diffusers-sd3.safetensors"
    info = _convert(cli, src, "diffusers", out, base_path)
    assert info["split"] == 3 and info["alpha_folded"] == len(modules)
    mixin = tld.diffusers.loaders.SD3LoraLoaderMixin
    sd = mixin.lora_state_dict({k: torch.from_numpy(v) for k, v in tensors(out).items()})
    sd = sd[0] if isinstance(sd, tuple) else sd
    mixin.load_lora_into_transformer(sd, tr, adapter_name="c")
    tr.fuse_lora(lora_scale=1.0)
    tr.unload_lora()
    fused = tld._sai_checkpoint(tr)
    got = _applied(cli, tmp, base_path, src, "src")
    changed = [k for k in fused if not np.array_equal(fused[k], sai[k])]
    assert len(changed) == len(modules), changed
    for k, v in fused.items():
        d = float(np.max(np.abs(got[k] - v)))
        assert d <= 2e-6 * (float(np.max(np.abs(v))) or 1.0), (k, d)
