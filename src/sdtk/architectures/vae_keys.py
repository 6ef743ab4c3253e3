"""VAE key layouts: a VAE file's tensors under bare LDM names, whichever layout it was saved in.

The LDM ("original") layout is what checkpoints hold under `first_stage_model.` (`vae.` in
ComfyUI's FLUX all-in-one files) and what A1111/ComfyUI load from `models/VAE`. diffusers'
AutoencoderKL names the same tensors differently; the renames below follow diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` (vae_conversion_map*), and
attention projections stored as Linear [c, c] become 1x1 convs [c, c, 1, 1].
Used by `identify --vae-ref` (compare) and `convert --bake-vae` (ops/vae.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from sdtk.errors import SdtkError
from sdtk.tensors import LazyTensor

# Prefixes a VAE may carry inside a file (stripped to bare LDM keys).
VAE_FILE_PREFIXES = ("first_stage_model.", "vae.")
IGNORED_VAE_PREFIXES = ("loss.", "model_ema.")  # training leftovers of ldm autoencoder checkpoints (A1111 ignores them)
LDM_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# diffusers -> LDM, applied in order to each key (regex, replacement). Source: diffusers
# scripts/convert_diffusers_to_original_stable_diffusion.py (vae_conversion_map, vae_conversion_map_attn).
_DIFFUSERS_TO_LDM_RULES: Tuple[Tuple[str, str], ...] = (
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", r"\1.mid.block_{\2+1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{N-1-\1}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up.{N-1-\1}.upsample.conv."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(query|to_q)\.", ".attn_1.q."),
    (r"\.attn_1\.(key|to_k)\.", ".attn_1.k."),
    (r"\.attn_1\.(value|to_v)\.", ".attn_1.v."),
    (r"\.attn_1\.(proj_attn|to_out\.0)\.", ".attn_1.proj_out."),
)
_ATTN_PROJECTION = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_diffusers_vae(keys) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys)


def diffusers_to_ldm_key(key: str, up_blocks: int) -> str:
    for pattern, replacement in _DIFFUSERS_TO_LDM_RULES:
        new = re.sub(pattern, replacement, key)
        if new != key:
            new = re.sub(r"\{(\d+)\+1\}", lambda m: str(int(m.group(1)) + 1), new)
            new = re.sub(r"\{N-1-(\d+)\}", lambda m: str(up_blocks - 1 - int(m.group(1))), new)
            key = new
    return key


def _as_conv1x1(t: LazyTensor, name: str) -> LazyTensor:
    shape = tuple(t.shape) + (1, 1)
    return LazyTensor(name, t.dtype, shape, lambda: t.read().reshape(shape), t.span)


@dataclass
class VaeTensors:
    tensors: Dict[str, LazyTensor]  # bare LDM keys
    layout: str  # "ldm" or "diffusers"
    ignored: List[str] = field(default_factory=list)

    @property
    def latent_channels(self) -> Optional[int]:
        t = self.tensors.get("decoder.conv_in.weight")
        return t.shape[1] if t is not None and len(t.shape) == 4 else None


def vae_tensors(tensors: Mapping[str, LazyTensor], path: str = None) -> VaeTensors:
    """The VAE in a file, as bare LDM keys (prefixes stripped, diffusers names mapped)."""
    bare: Dict[str, LazyTensor] = {}
    ignored: List[str] = []
    for name, t in tensors.items():
        if name.startswith(IGNORED_VAE_PREFIXES):
            ignored.append(name)
            continue
        key = name
        for prefix in VAE_FILE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        bare[key] = t
    layout = "ldm"
    if is_diffusers_vae(bare):
        layout = "diffusers"
        ups = {int(m.group(1)) for k in bare if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
        n = max(ups) + 1 if ups else 4
        mapped: Dict[str, LazyTensor] = {}
        for key, t in bare.items():
            new = diffusers_to_ldm_key(key, n)
            if _ATTN_PROJECTION.search(new) and len(t.shape) == 2:
                t = _as_conv1x1(t, new)
            mapped[new] = t
        bare = mapped
    strangers = [k for k in bare if not k.startswith(LDM_ROOTS)]
    if strangers or "decoder.conv_in.weight" not in bare:
        what = f"keys like {strangers[0]!r}" if strangers else "no decoder.conv_in.weight"
        raise SdtkError(path, f"is not a VAE file ({what}); give a stand-alone VAE (LDM or diffusers layout)")
    return VaeTensors(bare, layout, ignored)
