"""`lora apply` onto an fp16 base checks the baked float32 weight for NaN/inf inside the fp16 cast
(sdtk.ops.cast.cast_f16_counting_nonfinite, one pass) instead of scanning it first: the same
bytes as `cast_array`, the same counts as numpy, and the same refusal as before."""
from __future__ import annotations

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, tensors

from sdtk import fastcast
from sdtk.ops.cast import CHUNK_ELEMENTS, cast_array, cast_f16_counting_nonfinite
from sdtk.tensors import dtype_of_numpy

F16 = dtype_of_numpy(np.float16)


def _specials(n, rng):
    a = (rng.standard_normal(n) * 2e4).astype(np.float32)  # many values above fp16's 65504: overflow
    if n:
        idx = rng.choice(n, size=min(n, 9), replace=False)
        a[idx] = np.array([np.nan, np.inf, -np.inf, -np.nan, 1e-8, -0.0, 65520.0, 65519.0,
                           np.uint32(0x7F812345).view(np.float32)], np.float32)[:len(idx)]  # signalling-NaN payload
    return a


@pytest.mark.parametrize("n", [0, 1, 15, 4097, CHUNK_ELEMENTS + 333, 3 * CHUNK_ELEMENTS])
def test_counting_cast_equals_cast_array_and_numpy(n):
    if cast_f16_counting_nonfinite(np.zeros(4, np.float32)) is None:
        pytest.skip("no F16C kernel on this machine")
    a = _specials(n, np.random.default_rng(n))
    out, overflow, nonfinite = cast_f16_counting_nonfinite(a)
    want, want_overflow = cast_array(a, F16)
    assert out.dtype == np.float16 and out.shape == a.shape
    assert out.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()  # bit for bit, NaN payloads too
    assert overflow == want_overflow
    assert nonfinite == int(a.size - np.count_nonzero(np.isfinite(a)))


def test_counting_cast_declines_what_it_cannot_do():
    assert cast_f16_counting_nonfinite(np.zeros(4, np.float64)) is None
    assert cast_f16_counting_nonfinite(np.zeros((4, 4), np.float32).T[:, :2]) is None  # not C-contiguous


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_apply_refuses_a_product_that_overflows_float32(tmp, cli, dtype):
    """Finite adapter values whose product is inf in float32: refused with numpy's count of NaN/inf
    values, on the fused fp16 path and on the scan path (fp32 base) alike; nothing written."""
    base_path = make_model(tmp, f"sd-{dtype}", "sd15-emaonly", scale=8, dtype=dtype)
    base = tensors(base_path)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = lora_family(name, "lora", base[key].shape, np.random.default_rng(3))
    up, down = t[name + ".lora_up.weight"].copy(), t[name + ".lora_down.weight"].copy()
    up[0, :] = 3e19  # row 0 of up @ down: about 1e39 where down is large (inf in float32)
    down[:, :3] = 3e19
    t[name + ".lora_up.weight"], t[name + ".lora_down.weight"] = up, down
    with np.errstate(over="ignore", invalid="ignore"):
        u, d = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        baked = base[key].astype(np.float32).reshape(u.shape[0], -1) + (u @ d) * np.float32(0.5)
    want = int(baked.size - np.count_nonzero(np.isfinite(baked)))
    assert want > 0
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, write_tensors(tmp / "huge.safetensors", t), "-o", out)
    assert r.returncode == 2 and f"gives {want} NaN/inf values" in r.stderr and not out.exists(), r.stderr
    assert not list(tmp.glob(".out*"))  # no temporary left behind


def test_apply_fp16_bytes_unchanged_by_the_fused_check(tmp, cli, monkeypatch):
    """The fused path writes the bytes the cast + scan path writes (SDTK_FASTCAST=off is numpy's
    cast, which fastcast matches bit for bit)."""
    if not fastcast.status().startswith("F16C"):
        pytest.skip("no F16C kernel on this machine")
    base_path = make_model(tmp, "sd16", "sd15-emaonly", scale=8, dtype="float16")
    base = tensors(base_path)
    rng = np.random.default_rng(7)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    t = lora_family("lora_unet_down_blocks_0_resnets_0_conv1", "loha", base[key].shape, rng)
    t.update(lora_family("lora_unet_down_blocks_0_attentions_0_proj_in", "lora",
                         base["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape, rng))
    lora = write_tensors(tmp / "l.safetensors", t)
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    assert cli("lora", "apply", base_path, f"{lora}:0.8", "-o", a).returncode == 0
    monkeypatch.setenv("SDTK_FASTCAST", "off")
    r = cli("lora", "apply", base_path, f"{lora}:0.8", "-o", b)
    assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()


def _sdxl_lora(base, rng):
    """LoRA, LoHa and stacked modules on an SDXL base: 3x3 convs, attention, OpenCLIP in_proj
    q/k/v row thirds (patches on row slices) and the UNet's first conv."""
    t = {}
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    t.update(lora_family("lora_unet_input_blocks_1_0_in_layers_2", "loha", base[conv].shape, rng))
    q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    t.update(lora_family("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora", base[q].shape, rng, rank=8))
    in_proj = base["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    third = (in_proj.shape[0] // 3, in_proj.shape[1])
    for part in ("q_proj", "k_proj", "v_proj"):
        t.update(lora_family(f"lora_te2_text_model_encoder_layers_0_self_attn_{part}", "lora", third, rng))
    return t


@pytest.mark.parametrize("block_values", [None, 700])
def test_row_block_bake_writes_the_general_paths_bytes(tmp, monkeypatch, block_values):
    """The fp16 bake a block of rows at a time (apply.bake_f16_by_rows) writes the same bytes as
    the general path (a float32 copy of the whole weight, patched, then cast): SD1.5 with LoHa and
    LoRA, two LoRAs stacked on the same weights, SDXL with OpenCLIP row slices; with 700-value
    blocks too, so blocks end inside every slice and weight."""
    from sdtk.adapters.matching import LoraInput
    from sdtk.ops.lora import apply as apply_mod
    from sdtk.ops.lora.bake import bake

    if not fastcast.status().startswith("F16C"):
        pytest.skip("no F16C kernel on this machine")
    rng = np.random.default_rng(11)
    sd = make_model(tmp, "sd16", "sd15-emaonly", scale=8, dtype="float16")
    base = tensors(sd)
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    proj = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    first = lora_family("lora_unet_down_blocks_0_resnets_0_conv1", "loha", base[conv].shape, rng)
    first.update(lora_family("lora_unet_down_blocks_0_attentions_0_proj_in", "lora", base[proj].shape, rng, rank=16))
    second = lora_family("lora_unet_down_blocks_0_resnets_0_conv1", "lora", base[conv].shape, rng, rank=8)
    second.update(lora_family("lora_unet_down_blocks_0_attentions_0_proj_in", "loha", base[proj].shape, rng))
    l1, l2 = write_tensors(tmp / "l1.safetensors", first), write_tensors(tmp / "l2.safetensors", second)
    xl = make_model(tmp, "xl16", "sdxl-base", scale=8, dtype="float16")
    l3 = write_tensors(tmp / "l3.safetensors", _sdxl_lora(tensors(xl), rng))
    cases = [(sd, [LoraInput(str(l1), 0.8, 0.5)]), (sd, [LoraInput(str(l1), 0.7, 1.0), LoraInput(str(l2), -0.6, 1.0)]),
             (xl, [LoraInput(str(l3), 1.3, 0.9)])]
    if block_values:
        monkeypatch.setattr(apply_mod, "ROW_BLOCK_VALUES", block_values)
    used = {"n": 0}
    real = apply_mod.bake_f16_by_rows

    def counted(*args):
        got = real(*args)
        used["n"] += got is not None
        return got

    for i, (base_path, loras) in enumerate(cases):
        a, b = tmp / f"a{i}.safetensors", tmp / f"b{i}.safetensors"
        monkeypatch.setattr(apply_mod, "bake_f16_by_rows", counted)
        bake(str(base_path), loras, str(a))
        monkeypatch.setattr(apply_mod, "bake_f16_by_rows", lambda *args: None)  # the general path
        bake(str(base_path), loras, str(b))
        assert a.read_bytes() == b.read_bytes(), (i, loras)
    assert used["n"] == 7  # every patched weight went through the row-block bake (2 + 2 + conv, to_q, in_proj)


@pytest.mark.parametrize("kind", ["loha", "lora"])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4097, 3 * 4096 + 5])
def test_fused_kernel_equals_numpys_steps(n, kind):
    """fastcast.f16_add_product gives the bits of numpy's steps (widen, p1 *= p2 for LoHa,
    p1 *= factor, w += p1, the cast) and counts overflow and NaN/inf as the cast + scan path does,
    whether a special value falls in a 16-value vector chunk or in the tail: base NaN payloads
    (signalling, negative), inf, subnormals, results that overflow fp16 or float32."""
    rng = np.random.default_rng(n)
    base = (rng.standard_normal(n) * 3e4).astype(np.float16)
    p1 = (rng.standard_normal(n) * 300).astype(np.float32)
    p2 = (rng.standard_normal(n) * 300).astype(np.float32) if kind == "loha" else None
    if n > 9:
        p1[:4] = [np.inf, np.nan, 1e30, -1e30]
        base[5] = np.float16(np.inf)
        tail = n - 1 - (n % 16 != 0)  # a position in the tail when there is one
        for at, bits in ((7, 0x7C01), (n // 2, 0xFE3F), (tail, 0x7D55), (n - 1, 0x0001), (n // 3, 0x83FF)):
            base.view(np.uint16)[at] = bits  # sNaN, negative qNaN with payload, sNaN, subnormals
        # two NaNs meet (the base's and the product's, or p1's and p2's): which payload survives is the
        # compiler's choice in numpy's loops as in the kernel (+ and * commute); only NaN is required
        p1.view(np.uint32)[[7, tail]] = [0x7FC0_0ABC, 0xFF80_0123]  # the base is NaN there too
        if p2 is not None:
            p2.view(np.uint32)[[1, 8]] = [0x7F80_0F0F, 0x7FC0_0777]  # p1[1] is NaN; p1[8] gets one below
            p1.view(np.uint32)[8] = 0xFFC0_0055
    factor = np.float32(0.37)
    out = np.empty(n, np.float16)
    got = fastcast.f16_add_product(base, p1, p2, factor, out)
    if got is None:
        pytest.skip("no F16C kernel on this machine")
    with np.errstate(all="ignore"):
        w = base.astype(np.float32)
        t = p1.copy()
        if p2 is not None:
            t *= p2
        t *= factor
        w += t
        want, want_overflow = cast_array(w, F16)
    nan_pairs = np.isnan(base.astype(np.float32)) & np.isnan(p1)
    if p2 is not None:
        nan_pairs |= np.isnan(p1) & np.isnan(p2)
    exact = ~nan_pairs
    assert out.view(np.uint16)[exact].tobytes() == want.view(np.uint16)[exact].tobytes()  # NaN payloads included
    assert np.isnan(out[nan_pairs]).all() and (n < 10 or nan_pairs.any())  # the case is there
    assert got == (want_overflow, int(n - np.count_nonzero(np.isfinite(w))))
