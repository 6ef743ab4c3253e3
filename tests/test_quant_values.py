"""`lora apply` onto quantized bases (GGUF, ComfyUI fp8-scaled, bitsandbytes NF4) and `merge` /
`diff` / `convert` on quantized inputs, `--to gguf` / `--to fp8-scaled` outputs. Oracles: the
dequantization of the real libraries (gguf-py 0.19.0 `gguf.quants.dequantize`, torch's fp8 cast
times the scale, bitsandbytes' `dequantize_4bit`), the LoRA delta in f32, one cast."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, tensors

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

P = "model.diffusion_model."
QKV = "double_blocks.0.img_attn.qkv.weight"
LINEAR1 = "single_blocks.1.linear1.weight"
MODS = {"lora_unet_double_blocks_0_img_attn_qkv": QKV, "lora_unet_single_blocks_1_linear1": LINEAR1}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora")
    return make_model(d, "flux", "flux1-dev", scale=32, dtype="bfloat16")


@pytest.fixture(scope="module")
def flux_q8(flux):
    from conftest import run_cli

    out = flux.parent / "b.gguf"
    assert run_cli("convert", flux, "--to", "gguf", "--quant", "Q8_0", "-o", out).returncode == 0
    return out


def _lora(tmp, shapes, seed=5):
    rng = np.random.default_rng(seed)
    lora = {}
    for name, key in MODS.items():
        lora.update(lora_family(name, "lora", shapes[key], rng))
    return lora, write_tensors(tmp / "lora.safetensors", lora)


def _delta(lora, name):  # alpha 2 / rank 4
    return (lora[name + ".lora_up.weight"] @ lora[name + ".lora_down.weight"]) * np.float32(0.5)


def _close(got, want32):
    """fp32 maths cast once: equal to the oracle within one rounding of the output dtype (numpy's
    matmul may sum in another order than the test's)."""
    want = want32.astype(got.dtype)
    ulp = np.abs(np.spacing(want.astype(np.float32))) * (8 if got.dtype == np.float32 else 1)
    assert np.all(np.abs(got.astype(np.float32) - want.astype(np.float32)) <= np.maximum(ulp, 1e-7))


def _gguf_values(path):
    return {t.name: (t, gguf_dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32))
            for t in gguf.GGUFReader(str(path)).tensors}


def test_lora_apply_onto_gguf_base(flux_q8, tmp, cli):
    base = flux_q8
    ref = _gguf_values(base)
    lora, lora_path = _lora(tmp, {k: ref[k][1].shape for k in MODS.values()})
    out = tmp / "o.safetensors"
    r = cli("lora", "apply", base, lora_path, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    n_q8 = sum(t.tensor_type.name == "Q8_0" for t, _ in ref.values())
    assert s["computed"] == 2 and s["dequantized"] == {"Q8_0": n_q8} and s["dequantized_dtype"] == "bf16"
    got = tensors(out)
    for name, key in MODS.items():
        assert got[key].dtype.name == "bfloat16"
        _close(got[key], ref[key][1] + _delta(lora, name))  # gguf-py's dequantization + dW, one cast
    other = "double_blocks.3.img_mlp.0.weight"
    assert ref[other][0].tensor_type.name == "Q8_0"
    assert np.array_equal(got[other], ref[other][1].astype(got[other].dtype))  # untouched: dequantized, one cast
    # --dtype fp32: the dequantized values themselves
    r = cli("lora", "apply", base, lora_path, "-o", tmp / "o32.safetensors", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert f"dequantized ({n_q8} Q8_0), written fp32" in r.stdout
    got32 = tensors(tmp / "o32.safetensors")
    assert np.array_equal(got32[other], ref[other][1])
    _close(got32[QKV], ref[QKV][1] + _delta(lora, "lora_unet_double_blocks_0_img_attn_qkv"))
    # --to gguf --quant Q8_0: patched tensors quantized from their f32 values (gguf-py's bytes), untouched
    # Q8_0 tensors come back byte for byte
    r = cli("lora", "apply", base, lora_path, "-o", tmp / "o.gguf", "--to", "gguf", "--quant", "Q8_0", "--json")
    assert r.returncode == 0, r.stderr
    new = {t.name: t for t in gguf.GGUFReader(str(tmp / "o.gguf")).tensors}
    assert new[other].data.tobytes() == ref[other][0].data.tobytes()
    for key in MODS.values():
        assert new[key].tensor_type.name == "Q8_0"
        want = gguf_quantize(tensors(tmp / "o32.safetensors")[key], gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(new[key].data).reshape(-1), want.reshape(-1))


def test_lora_apply_onto_fp8_scaled_base(flux, tmp, cli):
    torch = pytest.importorskip("torch")
    base = tmp / "fp8.safetensors"
    assert cli("convert", flux, "--to", "fp8-scaled", "-o", base).returncode == 0
    from safetensors.torch import load_file

    sd = load_file(str(base))

    def oracle(key):  # ComfyUI: W = float(weight) * weight_scale
        return (sd[P + key].float() * sd[P + key[: -len(".weight")] + ".weight_scale"].float()).numpy()

    lora, lora_path = _lora(tmp, {k: sd[P + k].shape for k in MODS.values()})
    out = tmp / "o.safetensors"
    r = cli("lora", "apply", base, lora_path, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["dequantized_dtype"] == "bf16" and list(s["dequantized"]) == ["fp8-scaled"]
    got = tensors(out)
    assert not any(k.endswith((".weight_scale", ".comfy_quant")) for k in got)
    for name, key in MODS.items():
        _close(got[P + key], oracle(key) + _delta(lora, name))
    # --to fp8-scaled: the result in ComfyUI's form again; the patched layer requantized from its f32 values
    out8 = tmp / "o8.safetensors"
    r = cli("lora", "apply", base, lora_path, "-o", out8, "--to", "fp8-scaled")
    assert r.returncode == 0, r.stderr
    sd8 = load_file(str(out8))
    w32 = oracle(QKV) + _delta(lora, "lora_unet_double_blocks_0_img_attn_qkv")
    scale = np.float32(np.abs(w32).max() / 448)
    assert sd8[P + QKV[:-7] + ".weight_scale"].item() == pytest.approx(float(scale), rel=1e-6)
    want = torch.from_numpy(w32 / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(sd8[P + QKV].view(torch.uint8), want.view(torch.uint8))
    untouched = "double_blocks.3.img_mlp.0.weight"
    assert torch.equal(sd8[P + untouched].view(torch.uint8), sd[P + untouched].view(torch.uint8))


def test_lora_apply_onto_nf4_base(flux, tmp, cli):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file, save_file
    from test_nf4 import bnb_dequantize  # bitsandbytes' flat-block dequantization (rows of 96 here)

    sd = load_file(str(flux))
    want = {}
    for i, key in enumerate(list(MODS.values()) + ["double_blocks.3.img_mlp.0.weight"]):  # Forge's layout
        q, state = F.quantize_4bit(sd[P + key], blocksize=64, quant_type="nf4", compress_statistics=i % 2 == 0)
        sd[P + key] = q
        sd.update({f"{P}{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
        want[key] = bnb_dequantize(q, state).float().numpy()
    base = tmp / "nf4.safetensors"
    save_file(sd, str(base))
    lora, lora_path = _lora(tmp, {k: want[k].shape for k in MODS.values()})
    out = tmp / "o.safetensors"
    r = cli("lora", "apply", base, lora_path, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "3 weights dequantized (3 nf4), written bf16" in r.stdout
    got = tensors(out)
    assert not any(".absmax" in k or "quant_state" in k for k in got)
    for name, key in MODS.items():
        _close(got[P + key], want[key] + _delta(lora, name))  # bitsandbytes' values + dW
    k3 = P + "double_blocks.3.img_mlp.0.weight"
    assert np.array_equal(got[k3].astype(np.float32), want["double_blocks.3.img_mlp.0.weight"])


def test_merge_and_diff_take_gguf_inputs_beside_checkpoints(flux, flux_q8, tmp, cli):
    base = flux_q8
    ref = _gguf_values(base)
    a = tensors(flux)
    r = cli("diff", flux, base, "--json")
    assert r.returncode == 0, r.stderr
    total = json.loads(r.stdout)["total"]
    assert total["keys"] == 780 and 0 < total["relative_l2"] < 0.01  # by values, under the checkpoint's names
    out = tmp / "m.safetensors"
    r = cli("merge", flux, base, "-o", out, "--no-hash", "--json")
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    key = P + QKV
    assert got[key].dtype.name == "bfloat16"
    _close(got[key], np.float32(0.5) * a[key].astype(np.float32) + np.float32(0.5) * ref[QKV][1])
    # --to gguf: the same merge, each tensor quantized as gguf-py does the merged values
    outg = tmp / "m.gguf"
    r = cli("merge", flux, base, "-o", outg, "--to", "gguf", "--quant", "Q8_0", "--json")
    assert r.returncode == 0, r.stderr
    types = {}
    for t, _ in ref.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert json.loads(r.stdout)["ggml_types"] == types  # the choices convert makes
    merged = {t.name: t for t in gguf.GGUFReader(str(outg)).tensors}
    for name in (QKV, LINEAR1):
        want = gguf_quantize(got[P + name].astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(merged[name].data).reshape(-1), want.reshape(-1))
    # the GGUF file as the primary: its bare names; the checkpoint's diffusion model matched to them
    r = cli("merge", base, flux, "-o", tmp / "m2.safetensors", "--no-hash")
    assert r.returncode == 0, r.stderr
    got2 = tensors(tmp / "m2.safetensors")
    assert QKV in got2 and np.array_equal(got2[QKV], got[key])


def test_merge_to_fp8_scaled_and_convert_from_fp8_scaled_to_gguf(flux, tmp, cli):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    other = make_model(tmp, "flux2", "flux1-dev", scale=32, dtype="bfloat16", seed=9)
    plain = tmp / "m.safetensors"
    assert cli("merge", flux, other, "-o", plain, "--no-hash").returncode == 0
    out8 = tmp / "m8.safetensors"
    r = cli("merge", flux, other, "-o", out8, "--no-hash", "--to", "fp8-scaled")
    assert r.returncode == 0, r.stderr
    sd, sd8 = load_file(str(plain)), load_file(str(out8))
    w = sd[P + QKV].float()
    scale = sd8[P + QKV[:-7] + ".weight_scale"]
    assert scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-6)
    assert torch.equal(sd8[P + QKV].view(torch.uint8), (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    # fp8-scaled -> GGUF: quantized from the dequantized values (fp8 x scale)
    outg = tmp / "g.gguf"
    r = cli("convert", out8, "--to", "gguf", "--quant", "Q8_0", "-o", outg)
    assert r.returncode == 0, r.stderr
    values = (sd8[P + QKV].float() * scale).numpy()
    got = {t.name: t for t in gguf.GGUFReader(str(outg)).tensors}[QKV]
    assert np.array_equal(np.asarray(got.data).reshape(-1), gguf_quantize(values, gguf.GGMLQuantizationType.Q8_0).reshape(-1))
