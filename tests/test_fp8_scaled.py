"""ComfyUI fp8-scaled: `convert --to fp8-scaled` (current comfy_quant form) against torch's fp8
cast, reading both the current and the legacy scaled_fp8 form, and merge/diff on the values."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from helpers_convert import write_layout, write_tensors
from sdtk.errors import UnsupportedFormatError
from sdtk.formats import open_model
from sdtk.quant.fp8_scaled import detect
from sdtk.quant.views import dequantize_catalogue


def _weights(seed=0, std=0.005, shape=(256, 512)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)


def test_convert_writes_the_comfy_quant_form_exactly(tmp, cli):
    torch = pytest.importorskip("torch")
    src = write_tensors(tmp / "m.safetensors", {
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": _weights(1),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.bias": _weights(2, shape=(256,)),
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": _weights(3, shape=(128,)),
        "model.diffusion_model.img_in.weight": _weights(4, shape=(256, 64)),
        "model.diffusion_model.final_layer.linear.weight": _weights(5, shape=(64, 256)),
        "first_stage_model.decoder.conv_in.weight": _weights(6, shape=(8, 4, 3, 3)),
    })
    out = tmp / "m-fp8.safetensors"
    r = cli("convert", src, "--to", "fp8-scaled", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    layer = "model.diffusion_model.double_blocks.0.img_attn.qkv"
    with safe_open(str(out), "pt") as f, open_model(src) as orig:
        keys = set(f.keys())
        assert {layer + ".weight", layer + ".weight_scale", layer + ".comfy_quant"} <= keys
        assert json.loads(bytes(f.get_tensor(layer + ".comfy_quant").numpy()).decode()) == {"format": "float8_e4m3fn"}
        w = torch.from_numpy(np.asarray(orig.tensors[layer + ".weight"].read(), np.float32))
        scale = f.get_tensor(layer + ".weight_scale")
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-6)
        q = f.get_tensor(layer + ".weight")
        assert q.dtype == torch.float8_e4m3fn
        assert torch.equal(q.view(torch.uint8), (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))  # torch's cast, bit for bit
        for kept in ("model.diffusion_model.img_in.weight", "model.diffusion_model.final_layer.linear.weight",
                     layer + ".bias", "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
                     "first_stage_model.decoder.conv_in.weight"):
            if kept.endswith(".weight"):
                assert kept + "_scale" not in keys and kept.rsplit(".", 1)[0] + ".comfy_quant" not in keys
            assert np.array_equal(np.asarray(orig.tensors[kept].read()).view(np.uint16), f.get_tensor(kept).view(torch.uint16).numpy())
    with open_model(out) as cat:
        assert detect(cat.tensors) == "comfy_quant"
        dequantize_catalogue(cat)
        assert set(cat.tensors) == set(orig_keys(src))
        got = cat.tensors[layer + ".weight"].read()
        assert np.array_equal(got, (q.to(torch.float32) * scale).numpy())  # ComfyUI: W = f32(q) * weight_scale


def orig_keys(path):
    with open_model(path) as c:
        return list(c.tensors)


def test_reads_the_legacy_scaled_fp8_form(tmp):
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(np.asarray(_weights(7), np.float32))
    scale = (w.abs().max() / 448).reshape(1)
    q = (w / scale).to(torch.float8_e4m3fn)
    from safetensors.torch import save_file

    path = tmp / "legacy.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "blk.weight": q, "blk.scale_weight": scale,
               "blk.bias": torch.zeros(256)}, str(path))
    with open_model(path) as cat:
        assert detect(cat.tensors) == "scaled_fp8"
        dequantize_catalogue(cat)
        assert sorted(cat.tensors) == ["blk.bias", "blk.weight"]
        assert np.array_equal(cat.tensors["blk.weight"].read(), (q.float() * scale).numpy())


def test_unsupported_comfy_formats_are_named(tmp):
    fmt = np.frombuffer(json.dumps({"format": "nvfp4"}).encode(), np.uint8).copy()
    path = write_tensors(tmp / "n.safetensors", {"l.weight": np.zeros((4, 8), np.uint8), "l.weight_scale": np.ones((), np.float32),
                                                 "l.comfy_quant": fmt})
    with open_model(path) as cat, pytest.raises(UnsupportedFormatError, match="nvfp4"):
        dequantize_catalogue(cat)


def test_scaled_error_is_several_times_smaller_than_a_plain_cast(tmp, cli):
    w = np.asarray(_weights(9, std=0.005, shape=(1024, 1024)), np.float32)
    src = write_tensors(tmp / "w.safetensors", {"model.diffusion_model.blocks.0.attn.qkv.weight": w.astype(ml_dtypes.bfloat16),
                                                "model.diffusion_model.blocks.0.norm.weight": np.ones(16, np.float32)})
    assert cli("convert", src, "--to", "fp8-scaled", "-o", tmp / "s.safetensors").returncode == 0
    assert cli("convert", src, "--dtype", "fp8-e4m3fn", "-o", tmp / "p.safetensors", "--no-source-hash").returncode == 0
    key = "model.diffusion_model.blocks.0.attn.qkv.weight"

    def rel(path):
        with open_model(path) as cat:
            dequantize_catalogue(cat)
            got = np.asarray(cat.tensors[key].read(), np.float32)
        return np.sqrt(np.mean((got - w) ** 2) / np.mean(w ** 2)), np.mean((got == 0) & (w != 0))

    scaled, scaled_zeros = rel(tmp / "s.safetensors")
    plain, plain_zeros = rel(tmp / "p.safetensors")
    assert plain / scaled > 3.5 and plain_zeros > 0.12 and scaled_zeros < 0.001  # reference §5.2: 11.3 % vs 2.6 %, 15.5 % zeros


def test_diff_and_merge_dequantize_fp8_scaled_inputs(tmp, cli):
    src = write_layout(tmp / "flux.safetensors", "flux1-dev", scale=16)
    fp8 = tmp / "flux-fp8.safetensors"
    assert cli("convert", src, "--to", "fp8-scaled", "-o", fp8).returncode == 0
    r = cli("diff", src, fp8, "--json")
    assert r.returncode == 0, r.stderr
    total = json.loads(r.stdout)["total"]
    assert 0 < total["relative_l2"] < 0.04 and total["keys"] == 780  # compared by values, scales applied
    out = tmp / "merged.safetensors"
    r = cli("merge", src, fp8, "-o", out, "--no-hash")
    assert r.returncode == 0, r.stderr
    with open_model(out) as cat:
        assert not any(k.endswith((".weight_scale", ".comfy_quant")) for k in cat.tensors)
