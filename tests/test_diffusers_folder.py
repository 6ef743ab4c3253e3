"""diffusers folders without torch: every shared layout (random values, scaled down) round-trips
single file -> folder -> single file byte for byte, through sharded, .bin and fp16-variant
component files; bad folders and refused inputs give one line, exit 2, nothing left behind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdtk.formats.safetensors import read_safetensors, write_safetensors
from sdtk.samples import layout_plan, load_layout

LAYOUTS = ("sd15-full-ema", "sd15-inpainting", "sd21-768-v", "sdxl-base", "sdxl-vpred-ztsnr", "flux1-dev",
           "flux1-schnell", "flux1-dev-aio", "sd3-medium-incl-clips")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def _source(tmp: Path, layout: str, scale: int = 16) -> Path:
    src = tmp / f"{layout}.safetensors"
    write_safetensors(src, layout_plan(load_layout(layout), values="random", seed=3, scale=scale),
                      {"modelspec.title": layout, "note": "kept"})
    return src


def _to_folder(cli, src: Path, folder: Path, *extra) -> None:
    r = cli("convert", src, "--to", "diffusers", "-o", folder, "--no-source-hash", *extra)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_identical(layout, tmp, cli):
    src = _source(tmp, layout)
    folder = tmp / "folder"
    _to_folder(cli, src, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"].endswith("Pipeline")
    back = tmp / "back.safetensors"
    r = cli("convert", folder, "-o", back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()
    assert not [p for p in tmp.iterdir() if p.name.endswith(".sdtk-partial")]


def test_model_index_and_scheduler_follow_the_model(tmp, cli):
    from sdtk.ops.diffusers.write import plan_folder

    full = layout_plan(load_layout("sd15-inpainting"))  # full size (scaling would shrink the 9 input channels)
    fplan = plan_folder(full, architecture="stable-diffusion-v1-inpainting", source="inp.safetensors", metadata={},
                        prediction="epsilon")
    index = json.loads(next(f.data for f in fplan.files if f.relpath == "model_index.json"))
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    src = _source(tmp, "sd21-768-v")
    _to_folder(cli, src, tmp / "v", "--prediction-type", "v")
    sched = json.loads((tmp / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["_class_name"] == "DDIMScheduler"
    assert json.loads((tmp / "v" / "unet" / "config.json").read_text())["sample_size"] == 96
    tok2 = json.loads((tmp / "v" / "tokenizer" / "special_tokens_map.json").read_text())
    assert tok2["pad_token"] == "!"  # SD2 pads with "!" (id 0), as OpenCLIP does


def test_flux_folder_says_what_is_missing(tmp, cli):
    src = _source(tmp, "flux1-dev-aio")
    r = cli("convert", src, "--to", "diffusers", "-o", tmp / "f", "--no-source-hash")
    assert r.returncode == 0 and "no T5 tokenizer written" in r.stdout
    index = json.loads((tmp / "f" / "model_index.json").read_text())
    assert index["tokenizer_2"] == [None, None] and index["text_encoder_2"] == ["transformers", "T5EncoderModel"]


def test_sharded_bin_and_variant_components_read_the_same(tmp, cli):
    from sdtk.formats.torchzip_write import write_torch_zip

    src = _source(tmp, "sdxl-base")
    folder = tmp / "folder"
    _to_folder(cli, src, folder, "--variant", "fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    back16 = tmp / "back16.safetensors"
    assert cli("convert", folder, "-o", back16).returncode == 0
    assert back16.read_bytes() == src.read_bytes()  # the layout is fp16 already: the variant only renames
    # shard the UNet (with its index), and store text_encoder as a torch .bin
    unet = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    cat = read_safetensors(unet)
    names = list(cat.tensors)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.fp16.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.fp16.safetensors": names[half:]}
    for shard, keys in shards.items():
        write_safetensors(folder / "unet" / shard, [cat.tensors[k] for k in keys])
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    cat.close()
    unet.unlink()
    te = folder / "text_encoder" / "model.fp16.safetensors"
    te_cat = read_safetensors(te)
    write_torch_zip(folder / "text_encoder" / "pytorch_model.fp16.bin", list(te_cat.tensors.values()))
    te_cat.close()
    te.unlink()
    back = tmp / "back.safetensors"
    r = cli("convert", folder, "-o", back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()
    # shards that disagree with their index are refused
    index["weight_map"][names[0]] = "diffusion_pytorch_model-00002-of-00002.fp16.safetensors"
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    r = cli("convert", folder, "-o", tmp / "bad.safetensors")
    assert r.returncode == 2 and "disagrees with" in r.stderr and not (tmp / "bad.safetensors").exists()


def _folder(tmp, cli, layout="sd15-emaonly"):
    src = _source(tmp, layout)
    folder = tmp / "folder"
    _to_folder(cli, src, folder)
    return folder


def _refused(cli, folder, tmp, words):
    out = tmp / "out.safetensors"
    r = cli("convert", folder, "-o", out)
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line and words in line, line
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.endswith(".sdtk-partial")]


def test_missing_component_folder(tmp, cli):
    folder = _folder(tmp, cli)
    shutil.rmtree(folder / "vae")
    _refused(cli, folder, tmp, "'vae' is listed in model_index.json but its folder is missing")


def test_missing_tokenizer_files(tmp, cli):
    folder = _folder(tmp, cli)
    (folder / "tokenizer" / "merges.txt").unlink()
    _refused(cli, folder, tmp, "tokenizer/ is incomplete")


def test_truncated_component(tmp, cli):
    folder = _folder(tmp, cli)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) - 100)
    _refused(cli, folder, tmp, "truncated")


def test_component_with_missing_tensors(tmp, cli):
    folder = _folder(tmp, cli)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    cat = read_safetensors(weights)
    plan = [t for t in cat.tensors.values() if "mid_block" not in t.name]
    write_safetensors(tmp / "vae.safetensors", plan)
    cat.close()
    os.replace(tmp / "vae.safetensors", weights)
    _refused(cli, folder, tmp, "component 'vae'")


def test_unknown_pipeline_class(tmp, cli):
    folder = _folder(tmp, cli)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WuerstchenPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    _refused(cli, folder, tmp, "pipeline 'WuerstchenPipeline' has no single-file layout")


def test_hostile_bin_component(tmp, cli):
    hostile = SHARED / "corpus" / "picklescan" / "tests" / "data" / "bad_pytorch.pt"
    if not hostile.is_file():
        pytest.skip("../shared/corpus is not beside this checkout")
    folder = _folder(tmp, cli)
    (folder / "text_encoder" / "model.safetensors").unlink()
    shutil.copyfile(hostile, folder / "text_encoder" / "pytorch_model.bin")
    out = tmp / "out.safetensors"
    r = cli("convert", folder, "-o", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not out.exists()


def test_architecture_without_diffusers_layout(tmp, cli):
    src = tmp / "vae.safetensors"
    write_safetensors(src, layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=16))
    r = cli("convert", src, "--to", "diffusers", "-o", tmp / "out")
    assert r.returncode == 2 and "has no diffusers layout" in r.stderr and "--extract" in r.stderr
    assert not (tmp / "out").exists() and not [p for p in tmp.iterdir() if p.name.endswith(".sdtk-partial")]


def test_existing_output_folder_is_refused_unless_overwrite(tmp, cli):
    src = _source(tmp, "sd15-emaonly")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    r = cli("convert", src, "--to", "diffusers", "-o", tmp / "out", "--no-source-hash")
    assert r.returncode == 2 and "already exists" in r.stderr and (tmp / "out" / "keep.txt").exists()
    r = cli("convert", src, "--to", "diffusers", "-o", tmp / "out", "--no-source-hash", "--overwrite")
    assert r.returncode == 0 and (tmp / "out" / "model_index.json").exists() and not (tmp / "out" / "keep.txt").exists()
    r = cli("convert", src, "--to", "gguf2")
    assert r.returncode == 2 and "--to gguf2: choose one of" in r.stderr


def test_folder_opens_as_one_catalogue_for_every_command(tmp, cli):
    from sdtk.formats import open_model
    from sdtk.identify import identify

    folder = _folder(tmp, cli, "sdxl-base")
    with open_model(folder) as cat:
        assert cat.format == "diffusers-folder"
        assert "model.diffusion_model.label_emb.0.0.weight" in cat.tensors
        ident = identify(cat)
    assert ident.architecture == "stable-diffusion-xl-v1-base"
    (tmp / "b").mkdir()
    r = cli("diff", _source(tmp / "b", "sdxl-base"), folder)
    assert r.returncode == 0, r.stderr
