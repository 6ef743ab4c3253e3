"""VAE files: check that one fits a model, bake it in. Reading a VAE file in LDM or diffusers
key layout is `sdtk.architectures.vae_keys` (a fact about the formats, shared with identify)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from sdtk.architectures.vae_keys import VAE_FILE_PREFIXES, VaeTensors
from sdtk.errors import SdtkError
from sdtk.real_layouts import load_layout
from sdtk.tensors import LazyTensor


def reference_vae_shapes(latent_channels: int) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the kl-f8 VAE with 4 (SD1/SD2/SDXL) or 16 (SD3/FLUX) latent channels,
    from the packaged real layouts."""
    if latent_channels == 4:
        return {k: tuple(s) for k, s, _ in load_layout("vae-sd-kl-f8").tensors}
    if latent_channels == 16:
        return {k[len("vae."):]: tuple(s) for k, s, _ in load_layout("flux1-dev-aio").tensors if k.startswith("vae.")}
    raise KeyError(latent_channels)


# Latent channels each family's VAE must have (architectures.md "VAE and text encoder tells").
LATENT_CHANNELS = {"sd1": 4, "sd2": 4, "sdxl": 4, "sd3": 16, "flux": 16}
# Where a VAE goes when the model has none yet: LDM/sgm `first_stage_model.`, ComfyUI FLUX all-in-one `vae.`
DEFAULT_VAE_PREFIX = {"flux": "vae."}


def check_vae_fits(vae: VaeTensors, expected: Dict[str, Tuple[int, ...]], vae_path: str, what: str) -> None:
    """Refuse a VAE whose names or shapes differ from `expected` (the model's VAE or the reference)."""
    got = {k: tuple(t.shape) for k, t in vae.tensors.items()}
    if vae.latent_channels is not None:
        want_ch = expected.get("decoder.conv_in.weight", (None, None))[1]
        if want_ch is not None and want_ch != vae.latent_channels:
            raise SdtkError(vae_path, f"is a {vae.latent_channels}-channel VAE but {what} needs {want_ch} latent channels "
                                      "(wrong architecture: SD1/SD2/SDXL use 4, SD3/FLUX 16)")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        sample = (missing or extra)[0]
        raise SdtkError(vae_path, f"does not match {what}: {len(missing)} VAE keys missing, {len(extra)} unexpected "
                                  f"(e.g. {sample!r})")
    for k, shape in expected.items():
        if got[k] != shape:
            raise SdtkError(vae_path, f"tensor {k} has shape {list(got[k])} but {what} needs {list(shape)}")


def vae_prefix_in(names: Sequence[str]) -> Optional[str]:
    for prefix in VAE_FILE_PREFIXES:
        if any(n.startswith(prefix + "decoder.") for n in names):
            return prefix
    return None


@dataclass
class BakeResult:
    plan: List[LazyTensor]
    prefix: str
    replaced: int
    added: int
    layout: str


def bake_vae(plan: Sequence[LazyTensor], vae: VaeTensors, family: str, vae_path: str) -> BakeResult:
    """The model with its VAE replaced (or added) by `vae`, under the prefix its loaders use.
    Checked first: the model's own VAE (names and shapes), else the reference VAE of its family."""
    names = [t.name for t in plan]
    prefix = vae_prefix_in(names)
    if prefix is not None:
        expected = {t.name[len(prefix):]: tuple(t.shape) for t in plan if t.name.startswith(prefix)}
        check_vae_fits(vae, expected, vae_path, "the model's VAE")
    else:
        channels = LATENT_CHANNELS.get(family)
        if channels is None:
            raise SdtkError(vae_path, "cannot bake a VAE: the model's architecture is not known, so the VAE cannot be checked")
        check_vae_fits(vae, reference_vae_shapes(channels), vae_path, f"a {family} model")
        prefix = DEFAULT_VAE_PREFIX.get(family, "first_stage_model.")
    out: List[LazyTensor] = []
    replaced = 0
    for t in plan:
        if t.name.startswith(prefix):
            replaced += 1
            continue
        out.append(t)
    # The VAE goes where the old one was (or after the UNet), in the VAE file's order.
    first_vae = next((i for i, t in enumerate(plan) if t.name.startswith(prefix)), None)
    at = sum(1 for t in plan[:first_vae] if not t.name.startswith(prefix)) if first_vae is not None else len(out)
    baked = [LazyTensor(prefix + k, t.dtype, tuple(t.shape), t.loader, t.span) for k, t in vae.tensors.items()]
    out[at:at] = baked
    return BakeResult(out, prefix, replaced, len(baked), vae.layout)
