"""Model folders for the library tests, built from real layouts (scaled down, small random values)."""
import json
import os
import struct
from pathlib import Path

import numpy as np

from sdtk.formats.safetensors import build_header, write_safetensors
from sdtk.samples import layout_plan, load_layout


def write_model(path, layout="vae-sd-kl-f8", scale=16, seed=0, metadata=None, float_dtype=None):
    """A small safetensors file of a real layout (every dim > 8 divided by `scale`)."""
    lay = load_layout(layout)
    if float_dtype:
        lay = lay.with_dtype(float_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, layout_plan(lay, values="random", seed=seed, scale=scale), metadata, overwrite=True)
    return path


def tiny_lora_bytes(rng, metadata=None) -> bytes:
    """A tiny but real kohya SDXL LoRA (one module of the SDXL UNet, SGM naming: down, up, alpha;
    fp16), distinct per call."""
    module = "lora_unet_input_blocks_4_1_proj_in"  # SDXL input_blocks.4.1.proj_in: Linear 640 -> 640
    down = rng.standard_normal((4, 640)).astype("<f2").tobytes()
    up = rng.standard_normal((640, 4)).astype("<f2").tobytes()
    alpha = struct.pack("<f", 4.0)
    header = {"__metadata__": metadata or {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"},
              f"{module}.lora_down.weight": {"dtype": "F16", "shape": [4, 640], "data_offsets": [0, 5120]},
              f"{module}.lora_up.weight": {"dtype": "F16", "shape": [640, 4], "data_offsets": [5120, 10240]},
              f"{module}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [10240, 10244]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + down + up + alpha


def write_tiny_models(folder, count, seed=0):
    """`count` distinct tiny LoRA safetensors files, written directly (fast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        p = folder / f"lora_{i:04d}.safetensors"
        p.write_bytes(tiny_lora_bytes(rng))
        paths.append(p)
    return paths


def comfy_and_a1111_tree(base):
    """A ComfyUI install whose extra_model_paths.yaml points at an A1111 install, with sidecars."""
    base = Path(base)
    comfy, a1111 = base / "ComfyUI", base / "stable-diffusion-webui"
    ckpt = write_model(comfy / "models" / "checkpoints" / "sd15.safetensors", "sd15-emaonly", scale=32, seed=1,
                       metadata={"modelspec.title": "My SD", "ss_base_model_version": "sd_v1"})
    lora_dir = comfy / "models" / "loras"
    lora_dir.mkdir(parents=True)
    lora = lora_dir / "style.safetensors"
    lora.write_bytes(tiny_lora_bytes(np.random.default_rng(2), {"modelspec.trigger_phrase": "inkwash style"}))
    mystery = lora_dir / "mystery.safetensors"  # nothing identify knows: only its folder says LoRA
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    mystery.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    (lora_dir / "style.civitai.info").write_text(json.dumps({
        "id": 222, "modelId": 111, "name": "v1", "baseModel": "SDXL 1.0", "trainedWords": ["ink wash", "sumi-e"],
        "model": {"name": "Ink Wash", "type": "LORA", "nsfw": False},
        "files": [{"primary": True, "hashes": {"AutoV2": "0123456789"}}]}))
    (lora_dir / "style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    vae = write_model(a1111 / "models" / "VAE" / "kl-f8.safetensors", "vae-sd-kl-f8", scale=16, seed=3)
    sd = a1111 / "models" / "Stable-diffusion"
    v = write_model(sd / "v2.safetensors", "sd21-768-v", scale=32, seed=4, float_dtype="float16")
    (sd / "v2.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    (sd / "v2.cm-info.json").write_text(json.dumps({"ModelId": 5, "VersionId": 6, "BaseModel": "SD 2.1 768",
                                                    "TrainedWords": ["vword"]}))
    (sd / "v2.json").write_text(json.dumps({"description": "my v model", "activation text": "act1, act2"}))
    (sd / "v2.vae.safetensors").write_bytes(vae.read_bytes())
    (comfy / "extra_model_paths.yaml").write_text(
        "a1111:\n"
        "    base_path: ../stable-diffusion-webui/\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    vae: models/VAE\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n")
    return {"comfy": comfy, "a1111": a1111, "ckpt": ckpt, "lora": lora, "mystery": mystery, "vae": vae, "v2": v, "v2vae": sd / "v2.vae.safetensors"}
