"""`hash`, `merge`, `diff` and `lora apply` take a diffusers folder where they take a single file,
and give what they give for the file it stands for: the same content hash, the same merged
tensors (folder+file = file+folder = folder+folder = file+file), no difference in `diff`, the same
LoRA bake; a merge of folders is reproduced by `--recipe-from` byte for byte."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from sdtk.formats import open_model
from sdtk.formats.diffusers import SIDECAR, folder_size
from sdtk.formats.safetensors import write_safetensors
from sdtk.hashing.content import content_hash, content_hash_v2
from sdtk.samples import layout_plan, load_layout

LAYOUT = "sd15-emaonly"


def _pair(tmp: Path, cli, seed: int, name: str):
    src = tmp / f"{name}.safetensors"
    write_safetensors(src, layout_plan(load_layout(LAYOUT), values="random", seed=seed, scale=16), {"note": name})
    folder = tmp / name.upper()
    r = cli("convert", src, "--to", "diffusers", "-o", folder, "--no-source-hash")
    assert r.returncode == 0, r.stderr
    return src, folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("models")
    return _pair(tmp, run_cli, 3, "a") + _pair(tmp, run_cli, 4, "b")


@pytest.fixture
def models(pristine, tmp):
    """The module's two models (files and folders), copied into this test's folder."""
    out = []
    for p in pristine:
        dest = tmp / p.name
        (shutil.copytree if p.is_dir() else shutil.copyfile)(p, dest)
        out.append(dest)
    return tuple(out)


def _content(path) -> str:
    with open_model(path) as cat:
        return content_hash(cat)


def test_hash_of_a_folder_is_the_content_of_its_single_file(models, tmp, cli):
    a, fa, _, _ = models
    r = cli("hash", a, fa, "--content", "--json")
    assert r.returncode == 0, r.stderr
    file_row, folder_row = json.loads(r.stdout)
    assert folder_row["folder"] == "diffusers" and folder_row["size"] == folder_size(fa)
    assert all(folder_row[k] is None for k in ("SHA256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3"))
    assert (folder_row["Content"], folder_row["ContentV2"]) == (file_row["Content"], file_row["ContentV2"])
    with open_model(a) as cat:
        assert folder_row["Content"] == content_hash(cat).upper() and folder_row["ContentV2"] == content_hash_v2(cat).upper()
    r = cli("hash", fa)  # a folder needs no --content: the content hashes are all it has
    assert r.returncode == 0 and "no file hashes" in r.stdout and file_row["Content"] in r.stdout
    # without the sidecar (a folder diffusers wrote) it stands for fewer tensors: the content of
    # the file `convert FOLDER` writes from it, not of the original
    (fa / SIDECAR).unlink()
    back = tmp / "back.safetensors"
    assert cli("convert", fa, "-o", back).returncode == 0
    r = cli("hash", fa, "--json")
    row = json.loads(r.stdout)[0]
    assert row["Content"] == _content(back).upper() != file_row["Content"]


@pytest.mark.parametrize("hashes", [True, False], ids=["hashed", "no-hash"])
def test_merge_with_folders_equals_merge_of_the_files(models, tmp, cli, hashes):
    a, fa, b, fb = models
    flag = [] if hashes else ["--no-hash"]
    results = {}
    pairs = {"file+file": (a, b), "folder+file": (fa, b), "file+folder": (a, fb), "folder+folder": (fa, fb)}
    if not hashes:  # the tensors do not depend on the hashing: two merges are enough here
        pairs = {k: pairs[k] for k in ("file+file", "folder+folder")}
    for label, (x, y) in pairs.items():
        out = tmp / f"{label}.safetensors"
        r = cli("merge", x, y, "-o", out, "-a", "0.3", *flag)
        assert r.returncode == 0, r.stderr
        results[label] = out
    contents = {label: _content(p) for label, p in results.items()}
    assert len(set(contents.values())) == 1, contents
    with open_model(results["folder+folder"]) as cat:
        recipe = json.loads(cat.metadata["sdtk.merge_recipe"])
        a1111 = json.loads(cat.metadata["sd_merge_models"])
    ident = recipe["models"]["A"]
    assert ident["folder"] == "diffusers" and ident["size"] == folder_size(fa) and ident["file"] == "A"
    if hashes:
        with open_model(a) as cat:
            assert ident["content_v2"] == content_hash_v2(cat)  # the folder is known by its file's content
        assert "sha256" not in ident and a1111[ident["content_v2"]]["legacy_hash"] is None
    else:
        assert len(ident["header_sha256"]) == 64
    again = tmp / "again.safetensors"
    r = cli("merge", "--recipe-from", results["folder+folder"], "-o", again, *flag)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == results["folder+folder"].read_bytes()


def test_recipe_from_refuses_a_changed_folder(models, tmp, cli):
    a, fa, b, fb = models
    out = tmp / "m.safetensors"
    assert cli("merge", fa, fb, "-o", out, "--no-hash").returncode == 0
    index = json.loads((fb / "model_index.json").read_text())
    (fb / "model_index.json").write_text(json.dumps(index, indent=4))
    r = cli("merge", "--recipe-from", out, "-o", tmp / "m2.safetensors", "--no-hash")
    assert r.returncode == 2 and "not the file the recipe was made from" in r.stderr
    assert not (tmp / "m2.safetensors").exists()


def test_diff_of_a_file_and_its_folder_finds_nothing(models, cli):
    a, fa, b, fb = models
    r = cli("diff", a, fa, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["family"] == "sd1" and not (d["only_in_a"] or d["only_in_b"] or d["shape_mismatch"] or d["non_float_differs"])
    assert d["total"]["identical_keys"] == d["total"]["keys"]
    r = cli("diff", fa, b, "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["total"]["identical_keys"] < d["total"]["keys"] and not d["only_in_a"]


def test_lora_apply_on_a_folder_bakes_what_it_bakes_in_the_file(models, tmp, cli):
    a, fa, _, _ = models
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    with open_model(a) as cat:
        shapes = {k: cat.tensors[k].shape for k in (key, te)}
    rng = np.random.default_rng(7)
    lora = {**lora_family("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "lora", shapes[key], rng),
            **lora_family("lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora", shapes[te], rng)}
    lpath = write_tensors(tmp / "l.safetensors", lora)
    outs = []
    for base in (a, fa):
        out = tmp / f"baked-{base.name}.safetensors"
        r = cli("lora", "apply", base, f"{lpath}:0.8", "-o", out)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    assert _content(outs[0]) == _content(outs[1]) != _content(a)
    with open_model(outs[1]) as cat:
        lineage = json.loads(cat.metadata["sdtk.lineage"])[-1]
    assert lineage["source"] == "A" and lineage["source_size"] == folder_size(fa)
    shutil.rmtree(fa / "vae")  # a folder missing a listed component is refused, nothing written
    r = cli("lora", "apply", fa, str(lpath), "-o", tmp / "bad.safetensors")
    assert r.returncode == 2 and "'vae' is listed" in r.stderr and not (tmp / "bad.safetensors").exists()
