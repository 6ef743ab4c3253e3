"""`sdtk lora apply`: naming conventions on real layouts (SDXL SGM + OpenCLIP in_proj slices,
kohya FLUX fused names, XLabs), the refusals (another architecture, nothing matches, unmatched
modules, NaN, bad strengths, hostile pickles), lineage, and several LoRAs in order."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, metadata, tensors

SDXL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."


def _lora_for(base, modules, rng, kind="lora", **opts):
    """{module name: checkpoint weight key} -> adapter tensors sized for that weight."""
    out = {}
    for name, key in modules.items():
        shape = base[key].shape
        out.update(lora_family(name, kind, shape, rng, **opts))
    return out


def _delta(lora, name, scale=0.5):  # up @ down * alpha / rank (alpha 2, rank 4)
    up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale


def _same(got, want32):
    """fp32 maths cast once to the base's dtype: equal to the float32 formula within one rounding of
    the summation order (numpy's matmul may sum differently than the test's)."""
    want = want32.astype(got.dtype)
    ulp = np.abs(np.spacing(want)).astype(np.float32)  # one unit in the last place of the base's dtype
    assert np.all(np.abs(got.astype(np.float32) - want.astype(np.float32)) <= np.maximum(ulp, 1e-7))


def test_sdxl_sgm_names_and_openclip_slices(tmp, cli):
    base_path = make_model(tmp, "xl", "sdxl-base", scale=16)
    base = tensors(base_path)
    rng = np.random.default_rng(1)
    # OpenCLIP in_proj rows are [q; k; v] (A1111 network_apply_weights vstacks q, k, v updates)
    q = "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
    v = "lora_te2_text_model_encoder_layers_3_self_attn_v_proj"
    inproj = SDXL_TE2 + "3.attn.in_proj_weight"
    third = base[inproj].shape[0] // 3
    lora = {}
    for name in (q, v):
        lora.update(lora_family(name, "lora", (third, base[inproj].shape[1]), rng))
    fc1 = "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    lora.update(lora_family(fc1, "lora", base[SDXL_TE2 + "3.mlp.c_fc.weight"].shape, rng))
    proj = "lora_te2_text_projection"  # OpenCLIP x @ P: the HF-named update applies transposed
    lora.update(lora_family(proj, "lora", base["conditioner.embedders.1.model.text_projection"].shape, rng))
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
    lora.update(lora_family(te1, "lora", base["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"].shape, rng))
    unet = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    ukey = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    lora.update(lora_family(unet, "lora", base[ukey].shape, rng))
    diffusers_name = "unet.down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2"
    dkey = "model.diffusion_model.input_blocks.8.1.transformer_blocks.3.ff.net.2.weight"
    lora.update(lora_family(diffusers_name, "lora", base[dkey].shape, rng))
    lora_path = write_tensors(tmp / "xl_lora.safetensors", lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:1.5:0.5", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["loras"][0]["matched"] == 7 and summary["computed"] == 6
    got = tensors(out)
    want = base[inproj].astype(np.float32).copy()
    want[:third] += 0.5 * _delta(lora, q)
    want[2 * third:] += 0.5 * _delta(lora, v)
    _same(got[inproj], want)
    P = "conditioner.embedders.1.model.text_projection"
    _same(got[P], base[P].astype(np.float32) + 0.5 * _delta(lora, proj).T)
    _same(got[ukey], base[ukey].astype(np.float32) + 1.5 * _delta(lora, unet))
    _same(got[dkey], base[dkey].astype(np.float32) + 1.5 * _delta(lora, diffusers_name))
    lineage = json.loads(metadata(out)["sdtk.lineage"])[-1]
    assert lineage["loras"][0]["file"] == "xl_lora.safetensors"
    assert lineage["loras"][0]["strength"] == 1.5 and lineage["loras"][0]["te_strength"] == 0.5
    assert len(lineage["loras"][0]["sha256"]) == 64 and lineage["loras"][0]["matched"] == 7


def test_kohya_flux_fused_names_and_xlabs(tmp, cli):
    base_path = make_model(tmp, "flux", "flux1-dev", scale=32)
    base = tensors(base_path)
    rng = np.random.default_rng(2)
    mods = {"lora_unet_double_blocks_0_img_attn_qkv": "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "lora_unet_single_blocks_3_linear1": "model.diffusion_model.single_blocks.3.linear1.weight",
            "double_blocks.1.processor.proj_lora2": "model.diffusion_model.double_blocks.1.txt_attn.proj.weight"}
    lora = {}
    for name, key in mods.items():
        t = lora_family(name, "lora", base[key].shape, rng)
        if name.startswith("double_blocks."):  # XLabs: `.down.weight` / `.up.weight`, no alpha
            t = {k.replace(".lora_down.", ".down.").replace(".lora_up.", ".up."): v for k, v in t.items() if not k.endswith(".alpha")}
        lora.update(t)
    lora_path = write_tensors(tmp / "f.safetensors", lora)
    out = tmp / "out.safetensors"
    assert cli("lora", "apply", base_path, lora_path, "-o", out).returncode == 0
    got = tensors(out)
    for name, key in mods.items():
        s = 1.0 if name.startswith("double_blocks.") else 0.5
        down = lora.get(name + ".lora_down.weight", lora.get(name + ".down.weight"))
        up = lora.get(name + ".lora_up.weight", lora.get(name + ".up.weight"))
        _same(got[key], base[key].astype(np.float32) + s * up @ down)


def test_several_loras_in_order_and_untouched_bytes(tmp, cli):
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=8, dtype="float16")
    base = tensors(base_path)
    rng = np.random.default_rng(3)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    a = write_tensors(tmp / "a.safetensors", lora_family(name, "lora", base[key].shape, rng))
    b_t = lora_family(name, "lora", base[key].shape, rng)
    b = write_tensors(tmp / "b.safetensors", b_t)
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{a}:0.5", f"{b}:-1", "-o", out)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    a_t = tensors(a)
    want = base[key].astype(np.float32) + 0.5 * _delta(a_t, name) - _delta(b_t, name)
    assert got[key].dtype == np.float16
    assert np.array_equal(got[key], want.astype(np.float16))  # fp32 maths, one cast
    for k in base:
        if k != key:
            assert got[k].tobytes() == base[k].tobytes()


def test_boft_rotates_rows_and_refuses_a_block_layout_that_does_not_fit(tmp, cli):
    """A LyCORIS BOFT module (4-D oft_blocks) on a real SD1 layout: the butterfly stages and the
    Cayley blocks are orthogonal, so at strength 1 without rescale every column keeps its norm
    while the weight changes; zero blocks change nothing; a block size the rows do not fit is a
    shape mismatch (exit 2, nothing written). Values against LyCORIS: tests/test_lora_oracles.py."""
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=8)
    base = tensors(base_path)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w = base[key].astype(np.float64)
    boft = lora_family(name, "boft", w.shape, np.random.default_rng(8), stages=2, block_size=4, alpha=0.0)
    assert boft[name + ".oft_blocks"].shape == (2, w.shape[0] // 4, 4, 4)
    out = tmp / "boft.safetensors"
    r = cli("lora", "apply", base_path, write_tensors(tmp / "b.safetensors", boft), "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loras"][0]["kinds"] == {"boft": 1}
    baked = tensors(out)
    got = baked[key].astype(np.float64)
    assert np.max(np.abs(got - w)) > 1e-3  # it rotates
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)
    for k in base:
        if k != key:
            assert baked[k].tobytes() == base[k].tobytes(), k
    zero = dict(boft)
    zero[name + ".oft_blocks"] = np.zeros_like(boft[name + ".oft_blocks"])
    out0 = tmp / "zero.safetensors"
    assert cli("lora", "apply", base_path, write_tensors(tmp / "z.safetensors", zero), "-o", out0).returncode == 0
    assert tensors(out0)[key].tobytes() == base[key].tobytes()  # R = I: the same bits
    misfit = lora_family(name, "boft", w.shape, np.random.default_rng(9), stages=4, block_size=4)  # 2^3 * 4 = 32 does not divide 40 rows
    out2 = tmp / "misfit.safetensors"
    r = cli("lora", "apply", base_path, write_tensors(tmp / "m.safetensors", misfit), "-o", out2)
    assert r.returncode == 2 and "shape mismatch: BOFT" in r.stderr and not out2.exists(), r.stderr


def test_sd3_diffusers_names_land_on_qkv_thirds_and_swapped_adaln(tmp, cli):
    """diffusers / SimpleTuner / OneTrainer names on an SD3 single-file layout: attn.to_k is the
    middle third of x_block.attn.qkv, attn.add_v_proj the last third of context_block.attn.qkv,
    the last block's norm1_context and norm_out swap their (scale, shift) halves into (shift,
    scale); the other rows keep their bytes. Values against diffusers: tests/test_lora_diffusers.py."""
    base_path = make_model(tmp, "sd3", "sd3-medium-incl-clips", scale=16)
    base = tensors(base_path)
    dm = "model.diffusion_model."
    last = max(int(k.split(".")[3]) for k in base if k.startswith(dm + "joint_blocks."))
    rng = np.random.default_rng(6)
    cases = {  # LoRA module -> (checkpoint key, rows touched as (start, stop) or "swap")
        "transformer.transformer_blocks.0.attn.to_k": (dm + "joint_blocks.0.x_block.attn.qkv.weight", 1),
        "lora_transformer_transformer_blocks_1_attn_add_v_proj": (dm + "joint_blocks.1.context_block.attn.qkv.weight", 2),
        f"transformer.transformer_blocks.{last}.norm1_context.linear": (dm + f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight", "swap"),
        "transformer.norm_out.linear": (dm + "final_layer.adaLN_modulation.1.weight", "swap"),
    }
    lora = {}
    for name, (key, _) in cases.items():
        shape = base[key].shape
        rows = shape[0] // 3 if isinstance(cases[name][1], int) else shape[0]
        lora.update(lora_family(name, "lora", (rows, shape[1]), rng, alpha=None))
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, write_tensors(tmp / "sd3-lora.safetensors", lora), "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loras"][0]["matched"] == len(cases)
    got = tensors(out)
    for name, (key, where) in cases.items():
        w = base[key].astype(np.float32)
        up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
        delta = up @ down  # no alpha: scale 1
        want = w.copy()
        if where == "swap":
            half = w.shape[0] // 2
            want[:half] += delta[half:]
            want[half:] += delta[:half]
        else:
            n = w.shape[0] // 3
            want[where * n:(where + 1) * n] += delta
        _same(got[key], want)
        untouched = np.all(want == w, axis=1)
        assert got[key][untouched].tobytes() == base[key][untouched].tobytes(), name
    for k in base:
        if k not in {key for key, _ in cases.values()}:
            assert got[k].tobytes() == base[k].tobytes(), k


def test_refuses_another_architecture(tmp, cli):
    sd1 = make_model(tmp, "sd1", "sd15-emaonly", scale=8)
    xl = tensors(make_model(tmp, "xl", "sdxl-base", scale=8))
    rng = np.random.default_rng(4)
    mods = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "lora_unet_input_blocks_7_1_transformer_blocks_4_attn1_to_q": "model.diffusion_model.input_blocks.7.1.transformer_blocks.4.attn1.to_q.weight",
            "lora_unet_middle_block_1_transformer_blocks_2_attn2_to_k": "model.diffusion_model.middle_block.1.transformer_blocks.2.attn2.to_k.weight"}
    lora_path = write_tensors(tmp / "xl_lora.safetensors", _lora_for(xl, mods, rng), {"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", sd1, lora_path, "-o", out)
    assert r.returncode == 2 and not out.exists()
    assert "SDXL LoRA" in r.stderr and "only its text-encoder part would apply" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    flux = make_model(tmp, "flux", "flux1-dev", scale=32)
    r = cli("lora", "apply", flux, lora_path, "-o", out)
    assert r.returncode == 2 and "matches none" in r.stderr and not out.exists()
    r = cli("lora", "apply", sd1, lora_path, "-o", out, "--allow-unmatched")  # the user insists: TE only
    assert r.returncode == 0 and "skipped 2" in r.stdout


def test_bad_inputs(tmp, cli):
    torch = pytest.importorskip("torch")
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=8)
    base = tensors(base_path)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = lora_family(name, "lora", base[key].shape, np.random.default_rng(5))
    good = write_tensors(tmp / "good.safetensors", t)
    out = tmp / "out.safetensors"
    for arg, words in ((f"{good}:strong", "not a number"), (f"{good}:1:x", "must be numbers"), (f"{good}:nan", "finite"),
                       (str(tmp / "missing.safetensors"), "no such file")):
        r = cli("lora", "apply", base_path, arg, "-o", out)
        assert r.returncode == 2 and words in r.stderr and not out.exists(), (arg, r.stderr)
    bad = dict(t)
    bad[name + ".lora_up.weight"] = bad[name + ".lora_up.weight"].copy()
    bad[name + ".lora_up.weight"][0, 0] = np.nan
    nan = write_tensors(tmp / "nan.safetensors", bad)
    r = cli("lora", "apply", base_path, nan, "-o", out)
    assert r.returncode == 2 and "NaN" in r.stderr and not out.exists()
    wrong = dict(t)
    wrong[name + ".lora_down.weight"] = np.zeros((4, 7, 1, 1), np.float32)
    r = cli("lora", "apply", base_path, write_tensors(tmp / "shape.safetensors", wrong), "-o", out)
    assert r.returncode == 2 and "shape mismatch" in r.stderr and not out.exists()
    # a pickled .pt LoRA is read by sdtk's restricted unpickler, never executed
    pt = tmp / "good.pt"
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, pt)
    r = cli("lora", "apply", base_path, pt, "-o", out)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(tensors(out)[key].reshape(-1), (base[key] + _delta(t, name).reshape(base[key].shape)).reshape(-1), rtol=1e-6, atol=1e-7)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    hostile = tmp / "evil.pt"
    with open(hostile, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    out2 = tmp / "out2.safetensors"
    r = cli("lora", "apply", base_path, hostile, "-o", out2)
    assert r.returncode == 2 and "pwned" not in r.stdout and not out2.exists()
    before = base_path.read_bytes()
    r = cli("lora", "apply", base_path, good, "-o", out)  # exists
    assert r.returncode == 2 and base_path.read_bytes() == before


@pytest.mark.parametrize("lang", ["en", "ja", "zh", "ru"])
def test_inspect_base_fit(tmp, cli, lang):
    sd1 = make_model(tmp, "sd1", "sd15-emaonly", scale=8)
    xl = tensors(make_model(tmp, "xl", "sdxl-base", scale=8))
    rng = np.random.default_rng(6)
    mods = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "lora_unet_input_blocks_7_1_transformer_blocks_4_attn1_to_q": "model.diffusion_model.input_blocks.7.1.transformer_blocks.4.attn1.to_q.weight"}
    lora_path = write_tensors(tmp / "xl_lora.safetensors", _lora_for(xl, mods, rng), {"ss_base_model_version": "sdxl_base_v1-0"})
    r = cli("inspect", lora_path, "--base", sd1, "--lang", lang)
    assert "1" in r.stdout and "SDXL" in r.stdout, r.stdout
    r = cli("inspect", lora_path, "--base", sd1, "--json", "--lang", lang)
    fit = json.loads(r.stdout)["files"][0]["base_fit"]
    assert fit["matched"] == 1 and fit["modules"] == 2 and fit["components"] == {"te1": 1}
    assert fit["unmatched"][0]["module"].startswith("lora_unet_input_blocks_7")


def test_lora_merge_concat_is_exact(tmp, cli):
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=8)
    base = tensors(base_path)
    rng = np.random.default_rng(7)
    k1 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    k2 = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
    n1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    n2 = "lora_unet_down_blocks_1_resnets_0_conv1"
    a = {**lora_family(n1, "lora", base[k1].shape, rng, rank=4, alpha=2.0), **lora_family(n2, "lora", base[k2].shape, rng, rank=2, alpha=1.0)}
    b = lora_family(n1, "lora", base[k1].shape, rng, rank=8, alpha=8.0)
    pa, pb = write_tensors(tmp / "a.safetensors", a), write_tensors(tmp / "b.safetensors", b)
    merged = tmp / "m.safetensors"
    r = cli("lora", "merge", f"{pa}:0.7", f"{pb}:-0.3", "-o", merged)
    assert r.returncode == 0, r.stderr
    m = tensors(merged)
    assert m[n1 + ".lora_down.weight"].shape[0] == 12 and float(m[n1 + ".alpha"]) == 12
    one, two = tmp / "one.safetensors", tmp / "two.safetensors"
    assert cli("lora", "apply", base_path, merged, "-o", one).returncode == 0
    assert cli("lora", "apply", base_path, f"{pa}:0.7", f"{pb}:-0.3", "-o", two).returncode == 0
    x, y = tensors(one), tensors(two)
    for k in (k1, k2):
        assert not np.array_equal(x[k], base[k])
        np.testing.assert_allclose(x[k], y[k], rtol=0, atol=2e-7)
    r = cli("lora", "merge", f"{pa}:0.7", "-o", tmp / "x.safetensors")
    assert r.returncode == 2


def test_lora_resize_same_singular_values_as_full_svd(tmp, cli):
    from sdtk.ops.lora.resize import dynamic_rank, factor_svd

    rng = np.random.default_rng(8)
    up, down = rng.standard_normal((48, 16)).astype(np.float32), rng.standard_normal((16, 40)).astype(np.float32)
    _, s, _ = factor_svd(up, down)
    full = np.linalg.svd((up.astype(np.float64) @ down), compute_uv=False)[:16]
    np.testing.assert_allclose(s, full, rtol=1e-10)
    # kohya's rank_resize index conventions (reference/lora.md §3.3): one more than the minimum
    S = np.array([4, 3, 2, 1, .5, .25])
    assert dynamic_rank(S, "sv_cumulative", 0.65, 99) == 3
    assert dynamic_rank(S, "sv_fro", 0.9, 99) == 3
    assert dynamic_rank(S, "sv_ratio", 2, 99) == 3
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {name + ".lora_up.weight": up, name + ".lora_down.weight": down, name + ".alpha": np.array(4.0, np.float32)}
    src = write_tensors(tmp / "r16.safetensors", t)
    out = tmp / "r4.safetensors"
    r = cli("lora", "resize", src, "--rank", "4", "-o", out)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    assert got[name + ".lora_down.weight"].shape == (4, 40) and float(got[name + ".alpha"]) == 1.0  # s0 = 4/16 kept
    approx = got[name + ".lora_up.weight"] @ got[name + ".lora_down.weight"] * float(got[name + ".alpha"]) / 4
    u, sv, vt = np.linalg.svd(up.astype(np.float64) @ down)
    best = (u[:, :4] * sv[:4]) @ vt[:4] * 0.25
    np.testing.assert_allclose(approx, best, atol=1e-4)
