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
