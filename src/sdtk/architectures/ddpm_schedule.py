"""The DDPM schedule buffers of SD1.x / SD2.x single files, recomputed exactly (numpy float64).

LDM checkpoints carry twelve float32 buffers of length 1000 (betas, alphas_cumprod, ...) that
a diffusers folder does not keep (shared reference diffusers-interop.md section 4). They are a
pure function of the schedule, so a folder converted back without sdtk's sidecar gets them back
bit for bit.

Source: CompVis ldm/models/diffusion/ddpm.py, DDPM.register_schedule and
ldm/modules/diffusionmodules/util.py make_beta_schedule ("linear": torch.linspace(start ** 0.5,
end ** 0.5, n, dtype=torch.float64) ** 2, then numpy float64 arithmetic, each buffer stored with
torch.tensor(..., dtype=torch.float32)); v_posterior = 0 (DDPM default, kept by every SD yaml);
linear_start 0.00085, linear_end 0.0120, timesteps 1000 (v1-inference.yaml, v2-inference*.yaml).
torch.linspace's CPU kernel (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp) fills
start + step*i below steps // 2 and end - step*(steps-1-i) from there, step = (end-start)/(steps-1);
its AVX2/AVX-512 builds fuse each multiply-add (one rounding), the generic build does not. The
float32 buffers of the SD schedule come out identical either way (tests/test_diffusers_schedule.py
checks both against torch), so the machine a checkpoint was made on does not matter.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Mapping, Optional

import numpy as np

# Buffer names in the order of the released SD1.5 / SD2.1 safetensors files (shared layouts
# sd15-emaonly.json, sd21-768-v.json: sorted by name).
BUFFER_NAMES = (
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)
LDM_SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}  # v1/v2-inference.yaml


def _fma(a: float, b: float, c: float) -> float:
    """a*b + c with one rounding (what an FMA instruction gives)."""
    fma = getattr(math, "fma", None)  # Python >= 3.13
    if fma is not None:
        return fma(a, b, c)
    return float(Fraction(a) * Fraction(b) + Fraction(c))  # exact, then correctly rounded


def torch_linspace(start: float, end: float, steps: int, fused: bool = False) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float64) bit for bit, in numpy.
    `fused`: the AVX2/AVX-512 kernel (multiply-add in one rounding); otherwise the generic one."""
    if steps <= 0:
        return np.zeros((0,), np.float64)
    if steps == 1:
        return np.array([start], np.float64)
    step = (end - start) / (steps - 1)
    half = steps // 2
    if fused:
        return np.array([_fma(step, float(i), start) if i < half else _fma(-step, float(steps - 1 - i), end)
                         for i in range(steps)], np.float64)
    i = np.arange(steps, dtype=np.float64)
    low = start + step * i[:half]
    high = end - step * (steps - 1 - i[half:])
    return np.concatenate([low, high])


def ldm_buffers(linear_start: float = LDM_SCHEDULE["linear_start"], linear_end: float = LDM_SCHEDULE["linear_end"],
                timesteps: int = LDM_SCHEDULE["timesteps"], fused: bool = False,
                dtype=np.float32) -> Dict[str, np.ndarray]:
    """register_schedule's buffers for make_beta_schedule("linear", ...), cast to `dtype`."""
    betas = torch_linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, fused) ** 2
    alphas = 1. - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
    v_posterior = 0.
    posterior_variance = ((1 - v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
                          + v_posterior * betas)
    out = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1. - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1. - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1. / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1. / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod),
        "posterior_mean_coef2": (1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod),
    }
    return {k: out[k].astype(dtype) for k in BUFFER_NAMES}


def schedule_of(scheduler: Mapping) -> Optional[Dict]:
    """The LDM schedule a diffusers scheduler config stands for, or None when it is not one
    register_schedule makes: diffusers' "scaled_linear" is LDM's "linear" (sqrt-spaced betas;
    diffusers schedulers/scheduling_ddim.py betas_for "scaled_linear"); explicit trained_betas
    and other schedules are not recomputed."""
    if scheduler.get("trained_betas") or scheduler.get("beta_schedule") != "scaled_linear":
        return None  # (a missing beta_schedule is diffusers' default "linear": not LDM's)
    try:
        start = float(scheduler["beta_start"])
        end = float(scheduler["beta_end"])
        steps = int(scheduler.get("num_train_timesteps", 1000))  # diffusers' default
    except (KeyError, TypeError, ValueError):
        return None
    if not (0 < start < end < 1) or not 2 <= steps <= 100_000:
        return None
    return {"linear_start": start, "linear_end": end, "timesteps": steps}
