"""A model folder for the web app tests, built from real layouts: demo-style sparse checkpoints
(sdtk.samples), small random-valued SD1 models for convert and merge, a LoRA with Civitai
sidecars and a real PNG preview, a VAE, an embedding, a hostile .ckpt (a pickle that would run
`touch MARKER` if anything unpickled it), and a fake preview (HTML named .preview.png)."""
import json
import os
import struct
import zlib
import zipfile
from pathlib import Path

import numpy as np

from helpers_library import tiny_lora_bytes, write_model
from helpers_merge import make_model
from sdtk.formats.torchzip_write import write_torch_zip
from sdtk.samples import Layout, layout_plan, load_layout, write_sparse_safetensors
from sdtk.tensors import from_array


def scaled(layout: Layout, scale: int) -> Layout:
    """The layout with every dimension above 8 divided by `scale` (names and dtypes kept)."""
    rows = tuple((k, tuple(max(1, d // scale) if d > 8 else d for d in shape), dt) for k, shape, dt in layout.tensors)
    return Layout(layout.name, layout.description, rows)


def png_bytes(width=4, height=4, rgb=(200, 60, 40)) -> bytes:
    """A real (tiny) PNG image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def hostile_ckpt(path: Path, marker: Path) -> Path:
    """A torch-zip .ckpt whose data.pkl calls os.system (protocol 2 GLOBAL + REDUCE)."""
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return path


def sample_library(base: Path) -> dict:
    """models/{checkpoints,loras,vae,embeddings} with every kind of file the tests need."""
    base = Path(base)
    ck, lo, va, em = (base / "models" / d for d in ("checkpoints", "loras", "vae", "embeddings"))
    for d in (ck, lo, va, em):
        d.mkdir(parents=True, exist_ok=True)
    out = {"root": base / "models", "marker": base / "PWNED"}
    # demo-style (sdtk demo's files: zero-filled, sparse), scaled down 16x so hashing them takes no time
    sd15 = layout_plan(load_layout("sd15-full-ema"), scale=16)
    write_torch_zip(ck / "v1-5-pruned.ckpt", sd15, wrap="state_dict", extras={"global_step": 840000, "epoch": 6},
                    sparse_zeros=True, overwrite=True)
    write_sparse_safetensors(ck / "noob-vpred-demo.safetensors", scaled(load_layout("sdxl-vpred-ztsnr").with_dtype("float16"), 16))
    out["demo_ckpt"], out["demo_sdxl"] = ck / "v1-5-pruned.ckpt", ck / "noob-vpred-demo.safetensors"
    # small real-valued SD1 models (convert, merge)
    out["sd_a"] = make_model(ck, "alpha-mix", seed=1, scale=16, dtype="float16", metadata={"modelspec.title": "Alpha Mix"})
    out["sd_b"] = make_model(ck, "beta-mix", seed=2, scale=16, dtype="float16")
    out["sd_fp32"] = make_model(ck, "gamma-fp32", seed=3, scale=16)
    # a LoRA with sidecars
    lora = lo / "inkwash.safetensors"
    lora.write_bytes(tiny_lora_bytes(np.random.default_rng(7), {"ss_base_model_version": "sdxl_base_v1-0",
                                                                "ss_network_module": "networks.lora",
                                                                "modelspec.trigger_phrase": "inkwash style"}))
    (lo / "inkwash.civitai.info").write_text(json.dumps({
        "id": 222, "modelId": 111, "name": "v1", "baseModel": "SDXL 1.0", "trainedWords": ["ink wash", "sumi-e"],
        "model": {"name": "Ink Wash", "type": "LORA", "nsfw": False}, "files": [{"primary": True, "hashes": {"AutoV2": "0123456789"}}]}))
    (lo / "inkwash.preview.png").write_bytes(png_bytes())
    out["lora"] = lora
    # a "preview" that is really HTML with a script: must never be served
    sneaky = lo / "sneaky.safetensors"
    sneaky.write_bytes(tiny_lora_bytes(np.random.default_rng(8)))
    (lo / "sneaky.preview.png").write_text("<html><script>alert(1)</script></html>")
    out["sneaky"] = sneaky
    out["vae"] = write_model(va / "kl-f8.safetensors", "vae-sd-kl-f8", scale=16, seed=3)
    emb = em / "bad-hands.pt"
    write_torch_zip(emb, [from_array("string_to_param.*", np.random.default_rng(4).standard_normal((3, 768)).astype(np.float32))],
                    wrap=None, overwrite=True)
    out["embedding"] = emb
    out["hostile"] = hostile_ckpt(ck / "free-model.ckpt", out["marker"])
    return out


# kohya names of two SD1 UNet modules and the LDM keys they patch (sdtk.architectures.lora_keys)
LORA_MODULES = {"lora_unet_down_blocks_0_attentions_0_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q":
                    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight"}


def matched_lora(base_model: Path, path: Path, seed: int) -> Path:
    """A kohya LoRA (rank 4, random values) whose modules fit `base_model`'s (scaled-down) shapes."""
    from helpers_lora import lora_family, write_tensors
    from sdtk.formats import open_model

    rng = np.random.default_rng(seed)
    with open_model(base_model) as cat:
        shapes = {k: tuple(cat.tensors[k].shape) for k in LORA_MODULES.values()}
    tensors = {}
    for module, key in LORA_MODULES.items():
        tensors.update(lora_family(module, "lora", shapes[key], rng, rank=4, alpha=2.0))
    return write_tensors(path, tensors, {"ss_network_module": "networks.lora"})
