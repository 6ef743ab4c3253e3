"""PyTorch .ckpt/.pt files: every layout as a scaled-down checkpoint, the full-size SD1.5
training checkpoint (sparse), and .pt embeddings/hypernetworks."""
import numpy as np
import pytest

import helpers_identify as H
from conftest import torch_or_skip
from sdtk.formats.torchzip_write import write_torch_zip
from sdtk.identify import identify_path
from sdtk.samples import LAYOUT_NAMES, layout_plan
from sdtk.tensors import from_array
from test_identify_layouts import EXPECTED


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_scaled_down_ckpt_of_every_layout(tmp, name):
    kind, arch, variant, prefixes, ema, precision, prediction = EXPECTED[name]
    path = tmp / f"{name}.ckpt"
    write_torch_zip(path, layout_plan(H.layout(name), scale=16), wrap="state_dict", extras={"global_step": 470000, "epoch": 6})
    ident = identify_path(path)
    assert ident.format == "torch-zip"
    assert (ident.kind, ident.architecture, ident.variant) == (kind, arch, variant)
    assert ident.has_ema is ema
    for comp, prefix in prefixes.items():
        assert ident.components[comp].prefix == prefix
    assert ident.problem("scaled_copy").details["scale"] == 16  # named, with the honest warning
    assert ident.training_state == ["epoch", "global_step"]
    assert ident.safety["verdict"] == "read-safely"


def test_full_size_sd15_training_ckpt(tmp):
    path = tmp / "v1-5-pruned.ckpt"
    write_torch_zip(path, layout_plan(H.layout("sd15-full-ema")), wrap="state_dict", sparse_zeros=True)
    ident = identify_path(path)
    assert (ident.architecture, ident.has_ema, ident.precision) == ("stable-diffusion-v1", True, "fp32")
    assert ident.problem("scaled_copy") is None and not ident.missing_keys
    assert ident.file_size == path.stat().st_size and 7_700_000_000 < ident.file_size < 7_710_000_000
    advice = {a.code: a for a in ident.advice}
    assert {"training_checkpoint", "convert_to_safetensors"} <= set(advice)
    assert abs(advice["training_checkpoint"].details["target_size"] - 2_132_650_708) < 0.01 * 2_132_650_708


def test_a1111_embedding_pt(tmp):
    path = tmp / "emb.pt"
    vec = from_array("string_to_param.*", np.zeros((3, 768), np.float32))
    write_torch_zip(path, [vec], extras={"name": "myemb", "step": 500, "sd_checkpoint_name": "v1-5-pruned"})
    ident = identify_path(path)
    assert (ident.kind, ident.architecture) == ("embedding", "stable-diffusion-v1/textual-inversion")
    assert ident.adapter["vectors"] == 3 and ident.adapter["name"] == "myemb" and ident.adapter["step"] == 500


def test_hypernetwork_pt_written_by_torch(tmp):
    torch = torch_or_skip()
    from collections import OrderedDict

    mod = lambda w: OrderedDict({"linear.0.weight": torch.zeros(w * 2, w), "linear.0.bias": torch.zeros(w * 2),
                                 "linear.1.weight": torch.zeros(w, w * 2), "linear.1.bias": torch.zeros(w)})
    hn = {w: [mod(w), mod(w)] for w in (320, 640, 768, 1280)}
    hn.update(layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False, name="hn", step=100)
    torch.save(hn, tmp / "hn.pt")
    ident = identify_path(tmp / "hn.pt")
    assert (ident.kind, ident.architecture) == ("hypernetwork", "stable-diffusion-v1/hypernetwork")
    assert ident.adapter["widths"] == [320, 640, 768, 1280] and ident.adapter["layer_structure"] == [1, 2, 1]
