"""diffusers pipeline folders: model_index.json + one folder per component, each identified."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from sdtk.errors import FormatError
from sdtk.identify.model import Component, Identity, Problem

# diffusers pipeline class -> architecture id. Source: diffusers pipelines/*/pipeline_*.py class names.
PIPELINE_ARCHITECTURE = {
    "StableDiffusionPipeline": "stable-diffusion-v1",
    "StableDiffusionInpaintPipeline": "stable-diffusion-v1-inpainting",
    "StableDiffusionInstructPix2PixPipeline": "stable-diffusion-v1-instruct-pix2pix",
    "StableDiffusionXLPipeline": "stable-diffusion-xl-v1-base",
    "StableDiffusionXLImg2ImgPipeline": "stable-diffusion-xl-v1-refiner",
    "StableDiffusionXLInpaintPipeline": "stable-diffusion-xl-v1-inpainting",
    "StableDiffusion3Pipeline": "stable-diffusion-v3-medium",
    "FluxPipeline": "flux-1-dev",
    "FluxFillPipeline": "flux-1-fill-dev",
    "Flux2Pipeline": "flux-2",
    "AuraFlowPipeline": "auraflow",
    "HunyuanDiTPipeline": "hunyuan-dit",
    "Lumina2Pipeline": "lumina-2",
    "ZImagePipeline": "z-image",
    "QwenImagePipeline": "qwen-image",
    "PixArtAlphaPipeline": "pixart-alpha",
    "PixArtSigmaPipeline": "pixart-sigma",
    "StableCascadeCombinedPipeline": "stable-cascade-stage-c",
    "StableDiffusionUpscalePipeline": "stable-diffusion-x4-upscaler",
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _first_weight_file(folder: str) -> Optional[str]:
    for name in WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return os.path.join(folder, shards[0]) if shards else None


def identify_diffusers_folder(path: str, identify_file: Callable[..., Identity], *, deep: bool = False) -> Identity:
    """A diffusers pipeline folder as one Identity: `model_index.json` names the pipeline, and
    `identify_file(weights, deep=deep)` (core.identify_path) identifies each component's weights."""
    try:
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, ValueError) as e:
        raise FormatError(path, f"model_index.json is unreadable ({e})") from None
    cls = index.get("_class_name", "")
    arch = PIPELINE_ARCHITECTURE.get(cls, "unknown")
    ident = Identity(path=path, format="diffusers-folder", file_size=0, kind="diffusers-pipeline", architecture=arch,
                     implementation="diffusers", title=cls or None)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            continue
        weights = _first_weight_file(folder)
        if weights is None:
            continue
        sub = identify_file(weights, deep=deep)
        comp = Component(name=name, prefix="", keys=[], parameters=sub.parameters, dtypes=dict(sub.dtypes), bytes=sub.tensor_bytes,
                         model=f"{sub.kind}:{sub.architecture}" if sub.kind != "unknown" else f"{spec[0]}.{spec[1]}")
        ident.components[name] = comp
        ident.file_size += sub.file_size
        ident.parameters += sub.parameters
        ident.tensor_bytes += sub.tensor_bytes
        ident.tensor_count += sub.tensor_count
        for d, n in sub.dtypes.items():
            ident.dtypes[d] = ident.dtypes.get(d, 0) + n
        for p in sub.problems:
            if p.counts:
                ident.problems.append(Problem(p.code, p.severity, p.message_key, {**p.details, "component": name}))
    if arch == "unknown":
        ident.problems.append(Problem("unidentified", "warning", "problem.unidentified", {"pipeline": cls}))
    floats = [d for d in ("fp32", "fp16", "bf16") if d in ident.dtypes]
    ident.precision = floats[0] if len(floats) == 1 else ("mixed " + "/".join(floats) if floats else "none")
    return ident
