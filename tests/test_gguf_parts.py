"""`convert --to gguf --extract vae,text-encoders`: city96's GGUF holds the diffusion model alone, so
the VAE and text encoders a full checkpoint carries are written beside it as the stand-alone
safetensors files ComfyUI's VAE and CLIP loaders take (issue 12: "the text encoders and VAE
written separately on request"). Built from the real SD1.5 layout, scaled down."""
from __future__ import annotations

import json

from helpers_merge import make_model, tensors


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_gguf_and_parts_equal_the_separate_conversions(tmp, cli):
    src = make_model(tmp, "model", "sd15-emaonly", scale=8)
    alone, parts, both = tmp / "alone", tmp / "parts", tmp / "both"
    for d in (alone, parts, both):
        d.mkdir()
    assert cli("convert", src, "--to", "gguf", "--quant", "Q8_0", "-o", alone).returncode == 0
    assert cli("convert", src, "--extract", "vae,text-encoders", "-o", parts).returncode == 0
    r = cli("convert", src, "--to", "gguf", "--quant", "Q8_0", "--extract", "vae,text-encoders", "-o", both, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [o["part"] for o in summary["outputs"]] == ["diffusion-model", "vae", "clip-l"]
    assert _files(both) == ["model-Q8_0.gguf", "model-clip-l.safetensors", "model-vae.safetensors"]
    assert (both / "model-Q8_0.gguf").read_bytes() == (alone / "model-Q8_0.gguf").read_bytes()
    for name in ("model-vae.safetensors", "model-clip-l.safetensors"):
        a, b = tensors(both / name), tensors(parts / name)
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # what is in neither output is listed: the schedule buffers, not the VAE or CLIP
    left = {d["key"] for d in summary["dropped"]}
    assert left and all(not k.startswith(("first_stage_model.", "cond_stage_model.")) for k in left)
    assert "alphas_cumprod" in left


def test_refusals_write_nothing(tmp, cli):
    src = make_model(tmp, "model", "sd15-emaonly", scale=8)
    out = tmp / "out"
    out.mkdir()
    for args, words in ((["--extract", "t5xxl"], "has no t5xxl to extract"),
                        (["--extract", "unet"], "the GGUF is the diffusion model"),
                        (["--extract", "vae", "--dtype", "fp16"], "does not combine")):
        r = cli("convert", src, "--to", "gguf", "--quant", "Q4_K_S", *args, "-o", out)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert _files(out) == []
    r = cli("convert", src, "--to", "gguf", "--quant", "Q8_0", "--extract", "vae", "-o", out / "x.gguf")
    assert r.returncode == 2 and "give a folder" in r.stderr and _files(out) == []
