"""Lumina-Image 2.0 and Z-Image, both ways, against the real client offline: diffusers 0.42.1 loads
the folders sdtk writes (no missing or unexpected key, the exact tensors of the models the single
files were made from, the whole pipeline with the text encoder passed as None), its own
from_single_file conversion gives the same tensors and forward pass, and the folder converts back
to the original file byte for byte (the unused `norm_final.weight` rides in the sidecar)."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_diffusers import build_models, write_single_file  # noqa: E402
from sdtk.formats.safetensors import read_safetensors  # noqa: E402

CLASSES = {"lumina2": ("Lumina2Pipeline", "Lumina2Transformer2DModel"), "z-image": ("ZImagePipeline", "ZImageTransformer2DModel")}


_BUILT = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lumina")


def _converted(family, workdir, cli):
    if family in _BUILT:
        return _BUILT[family]
    tmp = workdir / family
    tmp.mkdir()
    models = build_models(family)
    src = tmp / "model.safetensors"
    write_single_file(src, family, models)
    folder = tmp / "folder"
    r = cli("convert", src, "--to", "diffusers", "-o", folder, "--no-source-hash")
    assert r.returncode == 0, r.stderr
    _BUILT[family] = src, folder, models
    return _BUILT[family]


def _forward_inputs(cfg):
    g = torch.Generator().manual_seed(5)
    cap = cfg["cap_feat_dim"]
    return torch.randn(1, cfg["in_channels"], 8, 8, generator=g), torch.randn(1, 6, cap, generator=g)


def _forward(family, model, x, cap):
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # same memory placement for both models (see test_diffusers_client)
        if family == "z-image":
            return model([x[0][:, None]], torch.tensor([0.5]), [cap[0]], return_dict=False)[0][0]
        mask = torch.ones(1, cap.shape[1], dtype=torch.bool)
        return model(x, torch.tensor([0.5]), cap, mask, return_dict=False)[0]


@pytest.mark.parametrize("family", ("lumina2", "z-image"))
def test_folder_loads_in_diffusers_and_round_trips(family, workdir, tmp, cli):
    src, folder, models = _converted(family, workdir, cli)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == CLASSES[family][0] and index["text_encoder"] == [None, None]
    for name, model in models.items():
        cls = getattr(diffusers, index[name][1])
        loaded, info = cls.from_pretrained(folder, subfolder=name, local_files_only=True, output_loading_info=True)
        assert not any(info.values()), (name, info)
        want, got = model.state_dict(), loaded.state_dict()
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), name
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, text_encoder=None, tokenizer=None)
    assert type(pipe).__name__ == CLASSES[family][0] and type(pipe.transformer).__name__ == CLASSES[family][1]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    side = read_safetensors(folder / "sdtk_extra.safetensors")
    assert list(side.tensors) == ["model.diffusion_model.norm_final.weight"]
    side.close()
    back = tmp / "back.safetensors"
    r = cli("convert", folder, "-o", back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def _against_from_single_file(family, src, folder, model):
    cls = getattr(diffusers, CLASSES[family][1])
    ours = cls.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    theirs = cls.from_single_file(str(src), config=str(folder), subfolder="transformer", local_files_only=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and not [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    x, cap = _forward_inputs(dict(ours.config))
    y1, y2 = _forward(family, ours, x, cap), _forward(family, theirs, x, cap)
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)


def test_z_image_matches_diffusers_from_single_file(workdir, cli):
    src, folder, models = _converted("z-image", workdir, cli)
    _against_from_single_file("z-image", src, folder, models["transformer"])


def test_lumina2_real_width_matches_diffusers_from_single_file(workdir, tmp, cli):
    """diffusers' Lumina2 converter hard-codes the 2B model's q/k/v widths (2304/768/768): one block
    of each kind at that width. The file is a stand-alone DiT (no prefix): diffusers 0.42.1's
    converter raises KeyError on `model.diffusion_model.`-prefixed Lumina2 files (it strips the
    prefix, then looks the old names up), which sdtk reads either way."""
    src, folder, models = _converted("lumina2-real-width", workdir, cli)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_kv_heads"]) == (2304, 24, 8)
    _against_from_single_file("lumina2", src, folder, models["transformer"])
    back = tmp / "back.safetensors"
    assert cli("convert", folder, "-o", back).returncode == 0
    assert back.read_bytes() == src.read_bytes()
