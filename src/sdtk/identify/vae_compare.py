"""Is the VAE baked into a checkpoint the same as a given VAE file? Tensor by tensor, across
dtypes (an fp32 reference equals an fp16 baked copy when rounding it to fp16 gives the same
bits) and key prefixes (bare, first_stage_model., vae.). Streams: one tensor pair at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

if TYPE_CHECKING:
    import numpy as np

from sdtk.architectures import vae_keys
from sdtk.formats import open_model
from sdtk.identify.model import Component
from sdtk.tensors import LazyTensor

VAE_PREFIXES = ("first_stage_model.", "vae.", "")


def _vae_view(tensors: Mapping[str, LazyTensor]) -> Dict[str, LazyTensor]:
    for prefix in VAE_PREFIXES:
        view = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        if "decoder.conv_in.weight" in view:
            return {k: t for k, t in view.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    return {}


def _diffusers_vae_as_ldm(tensors: Mapping[str, LazyTensor], path: str) -> Dict[str, LazyTensor]:
    """A diffusers-layout VAE file under LDM names (the mapping `sdtk convert --bake-vae` uses)."""
    from sdtk.errors import SdtkError

    try:
        return dict(vae_keys.vae_tensors(tensors, path).tensors)
    except SdtkError:
        return {}


def _to_f32(a: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.asarray(a).astype(np.float32)


def compare_vae(tensors: Mapping[str, LazyTensor], baked: Optional[Component], ref_path: str) -> Dict[str, Any]:
    import numpy as np

    result: Dict[str, Any] = {"reference": ref_path}
    if baked is None:
        result.update(verdict="no-baked-vae", message_key="vae.no_baked_vae")
        return result
    mine = {k[len(baked.prefix):]: tensors[k] for k in baked.keys}
    with open_model(ref_path) as ref_cat:
        ref = _vae_view(ref_cat.tensors)
        if not ref or any(k.startswith("decoder.up_blocks.") for k in ref):
            ref = _diffusers_vae_as_ldm(ref_cat.tensors, ref_path) or ref
        if not ref:
            result.update(verdict="not-a-vae", message_key="vae.ref_not_vae")
            return result
        common = sorted(set(mine) & set(ref))
        only_mine, only_ref = sorted(set(mine) - set(ref)), sorted(set(ref) - set(mine))
        result.update(compared=len(common), only_in_model=len(only_mine), only_in_reference=len(only_ref))
        if not common or len(common) < 0.9 * max(len(mine), len(ref)):
            result.update(verdict="not-comparable", message_key="vae.not_comparable")
            return result
        exact = rounded = differ = 0
        max_diff = 0.0
        shape_mismatch = []
        for key in common:
            a, b = mine[key], ref[key]
            if tuple(a.shape) != tuple(b.shape):
                shape_mismatch.append(key)
                continue
            av, bv = a.read(), b.read()
            if a.dtype == b.dtype and np.array_equal(np.asarray(av).view(np.uint8), np.asarray(bv).view(np.uint8)):
                exact += 1
                continue
            low = a.dtype if a.dtype.itemsize <= b.dtype.itemsize else b.dtype  # compare at the lower precision
            if np.array_equal(_to_f32(np.asarray(av).astype(low.numpy)), _to_f32(np.asarray(bv).astype(low.numpy))):
                rounded += 1
                continue
            differ += 1
            max_diff = max(max_diff, float(np.max(np.abs(_to_f32(av) - _to_f32(bv)))))
        result.update(identical=exact, equal_after_rounding=rounded, different=differ, shape_mismatch=len(shape_mismatch),
                      max_abs_difference=max_diff)
    if shape_mismatch:
        verdict = "different-architecture"
    elif differ == 0 and not only_mine and not only_ref:
        verdict = "identical" if rounded == 0 else "same-after-rounding"
    elif differ == 0:
        verdict = "same-weights-different-keys"
    else:
        verdict = "different"
    result.update(verdict=verdict, message_key=f"vae.{verdict.replace('-', '_')}")
    return result
