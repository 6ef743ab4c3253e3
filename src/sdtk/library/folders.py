"""Where users keep models: A1111/Forge and ComfyUI folder names, `extra_model_paths.yaml`, model files.

Folder name -> kind of model kept there (matched case-insensitively against every folder of a
file's path below the scanned root, nearest first). Sources: AUTOMATIC1111 `modules/paths`
and extension defaults (A1111), ComfyUI `folder_paths.py` (ComfyUI), Forge (same as A1111).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

FOLDER_KINDS: Dict[str, str] = {
    "stable-diffusion": "checkpoint",  # A1111/Forge models/Stable-diffusion
    "checkpoints": "checkpoint",  # ComfyUI models/checkpoints
    "diffusion_models": "diffusion-model",  # ComfyUI models/diffusion_models
    "unet": "diffusion-model",  # ComfyUI (old name of diffusion_models)
    "vae": "vae",  # A1111 models/VAE, ComfyUI models/vae
    "vae_approx": "vae-approx",  # ComfyUI models/vae_approx
    "lora": "lora",  # A1111 models/Lora
    "loras": "lora",  # ComfyUI models/loras
    "lycoris": "lora",  # A1111 models/LyCORIS (a1111-sd-webui-lycoris)
    "embeddings": "embedding",  # A1111 embeddings/, ComfyUI models/embeddings
    "hypernetworks": "hypernetwork",  # A1111 models/hypernetworks, ComfyUI models/hypernetworks
    "controlnet": "controlnet",  # A1111 models/ControlNet, ComfyUI models/controlnet
    "t2i_adapter": "controlnet",  # ComfyUI models/t2i_adapter
    "text_encoders": "text-encoder",  # ComfyUI models/text_encoders
    "clip": "text-encoder",  # ComfyUI (old name of text_encoders)
    "clip_vision": "clip-vision",  # ComfyUI models/clip_vision
    "esrgan": "upscaler",  # A1111 models/ESRGAN
    "realesrgan": "upscaler",  # A1111 models/RealESRGAN
    "upscale_models": "upscaler",  # ComfyUI models/upscale_models
    "style_models": "style-model",  # ComfyUI models/style_models
    "gligen": "gligen",  # ComfyUI models/gligen
}

# Model file extensions (A1111 and ComfyUI folder_paths.supported_pt_extensions, plus .sft, and .gguf,
# which city96/ComfyUI-GGUF adds to the unet and clip folders).
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pt2", ".gguf")
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".cache", ".venv", "venv"}

# extra_model_paths.yaml keys -> kind (ComfyUI extra_model_paths.yaml.example, a1111 and comfyui blocks)
YAML_KEYS: Dict[str, str] = {
    "checkpoints": "checkpoint", "diffusion_models": "diffusion-model", "unet": "diffusion-model",
    "vae": "vae", "loras": "lora", "embeddings": "embedding", "hypernetworks": "hypernetwork",
    "controlnet": "controlnet", "t2i_adapter": "controlnet", "text_encoders": "text-encoder", "clip": "text-encoder",
    "clip_vision": "clip-vision", "upscale_models": "upscaler", "style_models": "style-model", "gligen": "gligen",
}


def folder_kind(path: str, root: str) -> Optional[str]:
    """The kind the folder layout says (nearest matching folder between the file and the root,
    then the root's own name)."""
    rel = os.path.relpath(os.path.dirname(path), root)
    parts = [] if rel == "." else rel.split(os.sep)
    for part in reversed(parts + [os.path.basename(root.rstrip(os.sep))]):
        kind = FOLDER_KINDS.get(part.lower())
        if kind:
            return kind
    return None


def is_model_file(name: str) -> bool:
    low = name.lower()
    return low.endswith(MODEL_EXTENSIONS) and not low.startswith(".") and ".sdtk-partial" not in low


def read_extra_model_paths(yaml_file: "os.PathLike[str] | str") -> List[Tuple[str, Optional[str]]]:
    """(folder, kind) pairs named by a ComfyUI `extra_model_paths.yaml` (every block: `a1111:`,
    `comfyui:`, custom ones), each relative to its block's `base_path` (itself relative to the
    yaml's folder). Values may list several folders, one per line (ComfyUI allows `|` blocks)."""
    import yaml

    from sdtk.errors import SdtkError

    yaml_file = Path(yaml_file)
    try:
        data = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SdtkError(yaml_file, f"cannot read extra_model_paths.yaml: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SdtkError(yaml_file, "extra_model_paths.yaml is not a mapping of blocks")
    out: List[Tuple[str, Optional[str]]] = []
    for block in data.values():
        if not isinstance(block, dict):
            continue
        base = os.path.expanduser(str(block.get("base_path", "") or ""))
        base = base if os.path.isabs(base) else os.path.join(yaml_file.parent, base)
        for key, value in block.items():
            if key in ("base_path", "is_default") or not isinstance(value, str):
                continue
            for line in value.splitlines():
                line = line.strip()
                if line:
                    folder = os.path.expanduser(line)
                    out.append((os.path.normpath(folder if os.path.isabs(folder) else os.path.join(base, folder)),
                                YAML_KEYS.get(key)))
    return out


def expand_roots(paths: Iterable["os.PathLike[str] | str"]) -> List[Tuple[str, Optional[str]]]:
    """Folders to walk, (absolute path, kind hint), from what the user named: folders (an
    `extra_model_paths.yaml` at their top is followed too) and yaml files themselves."""
    out: List[Tuple[str, Optional[str]]] = []
    seen = set()

    def add(p: str, kind: Optional[str]) -> None:
        p = os.path.abspath(p)
        if p not in seen:
            seen.add(p)
            out.append((p, kind))

    for raw in paths:
        p = os.path.expanduser(os.fspath(raw))
        if p.endswith((".yaml", ".yml")) and os.path.isfile(p):
            for folder, kind in read_extra_model_paths(p):
                add(folder, kind)
            continue
        add(p, None)
        yml = os.path.join(p, "extra_model_paths.yaml")
        if os.path.isfile(yml):
            for folder, kind in read_extra_model_paths(yml):
                add(folder, kind)
    return out
