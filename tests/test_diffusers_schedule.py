"""SD1/SD2 DDPM schedule buffers recreated without the sidecar: numpy float64 reproduces
torch.linspace bit for bit (generic and fused AVX kernels), the twelve buffers equal LDM's
register_schedule run with torch, and a folder converted back without sdtk's sidecar holds the
original file's buffers again (what cannot be recreated is listed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

from conftest import torch_or_skip
from sdtk.architectures.ddpm_schedule import BUFFER_NAMES, ldm_buffers, schedule_of, torch_linspace
from sdtk.formats.diffusers import SIDECAR
from sdtk.formats.safetensors import read_safetensors, write_safetensors
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import DTYPES, LazyTensor

# (start, end, steps): the SD schedule's sqrt-spaced ends, LDM's default one, and other shapes
# (odd and even counts, a decreasing range, the two-point edge)
CASES = [(0.00085 ** 0.5, 0.012 ** 0.5, 1000), (1e-4 ** 0.5, 2e-2 ** 0.5, 1000), (0.0, 1.0, 999),
         (-3.7, 11.1, 1001), (2.0, -1.0, 50), (0.25, 0.75, 7), (1.0, 3.0, 2)]

_PROBE = """
import json, sys, torch
cases = json.loads(sys.argv[1])
out = [torch.linspace(s, e, n, dtype=torch.float64).numpy().tobytes().hex() for s, e, n in cases]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "values": out}))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_linspace_is_torchs_bit_for_bit(capability):
    torch_or_skip()
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)  # torch falls back when the CPU lacks it
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(CASES)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    fused = got["capability"] != "DEFAULT"  # the AVX kernels fuse each multiply-add
    for (s, e, n), hexed in zip(CASES, got["values"]):
        ours = torch_linspace(s, e, n, fused=fused)
        assert ours.tobytes().hex() == hexed, (got["capability"], s, e, n)
        if n == 1000 and s == CASES[0][0]:  # the two kernels do differ in float64 on the SD range
            assert (torch_linspace(s, e, n, fused=not fused) != ours).any()


def _ldm_register_schedule(torch, linear_start, linear_end, n):
    """The oracle: ldm make_beta_schedule("linear") in torch, then register_schedule as written
    (CompVis ldm/models/diffusion/ddpm.py, v_posterior = 0)."""
    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2).numpy()
    alphas = 1. - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
    to_torch = partial(torch.tensor, dtype=torch.float32)
    v_posterior = 0.
    posterior_variance = (1 - v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod) + v_posterior * betas
    return {
        "betas": to_torch(betas), "alphas_cumprod": to_torch(alphas_cumprod),
        "alphas_cumprod_prev": to_torch(alphas_cumprod_prev),
        "sqrt_alphas_cumprod": to_torch(np.sqrt(alphas_cumprod)),
        "sqrt_one_minus_alphas_cumprod": to_torch(np.sqrt(1. - alphas_cumprod)),
        "log_one_minus_alphas_cumprod": to_torch(np.log(1. - alphas_cumprod)),
        "sqrt_recip_alphas_cumprod": to_torch(np.sqrt(1. / alphas_cumprod)),
        "sqrt_recipm1_alphas_cumprod": to_torch(np.sqrt(1. / alphas_cumprod - 1)),
        "posterior_variance": to_torch(posterior_variance),
        "posterior_log_variance_clipped": to_torch(np.log(np.maximum(posterior_variance, 1e-20))),
        "posterior_mean_coef1": to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod)),
        "posterior_mean_coef2": to_torch((1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod)),
    }


@pytest.mark.parametrize("start,end", [(0.00085, 0.012), (1e-4, 2e-2)], ids=["sd", "ldm-default"])
def test_buffers_equal_ldm_register_schedule_in_torch(start, end):
    torch = torch_or_skip()
    oracle = _ldm_register_schedule(torch, start, end, 1000)
    assert set(oracle) == set(BUFFER_NAMES)
    for fused in (False, True):  # either kernel's linspace gives the same float32 buffers
        ours = ldm_buffers(start, end, 1000, fused=fused)
        for name in BUFFER_NAMES:
            assert ours[name].dtype == np.float32 and ours[name].shape == (1000,)
            assert ours[name].tobytes() == oracle[name].numpy().tobytes(), (name, fused)


def test_only_ldm_schedules_are_recomputed():
    assert schedule_of({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "num_train_timesteps": 1000}) == {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
    assert schedule_of({"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}) is None
    assert schedule_of({"beta_start": 0.00085, "beta_end": 0.012}) is None  # diffusers' default is "linear"
    assert schedule_of({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "trained_betas": [0.1, 0.2]}) is None


def _source_with_real_buffers(tmp, layout):
    """A scaled random file of `layout` whose schedule buffers and position_ids hold the values
    LDM writes (the random ones could not be recreated by anyone)."""
    real = ldm_buffers()
    plan = []
    for t in layout_plan(load_layout(layout), values="random", seed=5, scale=16):
        if t.name in real:
            t = LazyTensor(t.name, DTYPES["F32"], (1000,), lambda v=real[t.name]: v)
        elif t.name.endswith("position_ids"):
            n = t.shape[-1]
            t = LazyTensor(t.name, t.dtype, tuple(t.shape), lambda n=n: np.arange(n, dtype=np.int64).reshape(1, n))
        plan.append(t)
    src = tmp / f"{layout}.safetensors"
    write_safetensors(src, plan, {})
    return src


def _tensors(path):
    cat = read_safetensors(path)
    try:
        return {k: (t.dtype.name, tuple(t.shape), t.read().tobytes()) for k, t in cat.tensors.items()}
    finally:
        cat.close()


def _back_without_sidecar(tmp, cli, src):
    folder = tmp / "folder"
    r = cli("convert", src, "--to", "diffusers", "-o", folder, "--no-source-hash")
    assert r.returncode == 0, r.stderr
    (folder / SIDECAR).unlink()
    back = tmp / "back.safetensors"
    r = cli("convert", folder, "-o", back)
    assert r.returncode == 0, r.stderr
    return folder, back, r.stdout + r.stderr


def test_sd15_round_trip_without_sidecar_restores_every_tensor(tmp, cli):
    src = _source_with_real_buffers(tmp, "sd15-emaonly")
    _, back, out = _back_without_sidecar(tmp, cli, src)
    assert _tensors(back) == _tensors(src)  # names, dtypes, shapes and bytes: buffers included
    assert "alphas_cumprod" in out and "not recreated" not in out


def test_sd2_round_trip_without_sidecar_restores_the_buffers_and_lists_the_rest(tmp, cli):
    src = _source_with_real_buffers(tmp, "sd21-768-v")
    folder, back, out = _back_without_sidecar(tmp, cli, src)
    a, b = _tensors(src), _tensors(back)
    for name in BUFFER_NAMES:
        assert b[name] == a[name]
    lost = set(a) - set(b)
    assert lost and all(k.startswith(("cond_stage_model.model.transformer.resblocks.23.", "cond_stage_model.model.text_projection",
                                      "cond_stage_model.model.logit_scale")) for k in lost)
    assert "logit_scale" in out and "text_projection" in out and "not recreated" in out
    assert all(b[k] == a[k] for k in b)
    # a scheduler whose betas are not an LDM schedule: the buffers are left out, and said so
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["beta_schedule"] = "squaredcos_cap_v2"
    cfg_path.write_text(json.dumps(cfg))
    other = tmp / "other.safetensors"
    r = cli("convert", folder, "-o", other)
    assert r.returncode == 0, r.stderr
    assert not set(BUFFER_NAMES) & set(_tensors(other))
    assert "schedule buffers" in r.stdout + r.stderr and "not recreated" in r.stdout + r.stderr
