"""Real client: ComfyUI's own loaders (../shared/clients/ComfyUI, unmodified) on sdtk's outputs.

For each shared layout, the output sdtk plans for a conversion (names, shapes, dtypes and
metadata, exactly what `convert` writes; values zero, the file sparse) is loaded with ComfyUI's
checkpoint loader (`comfy.sd.load_state_dict_guess_config`, what CheckpointLoaderSimple runs) or
UNet loader (`load_diffusion_model_state_dict`), the model built on the meta device (no RAM for
weights). ComfyUI's model class and model type (EPS / V_PREDICTION / FLOW, zsnr) must be what
sdtk recorded, with no missing or unexpected UNet keys. Skipped when ../shared/clients is absent
(a user's clone) or torch is not installed."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import helpers_identify as H
from helpers_convert import planned_outputs

CLIENTS = Path(__file__).resolve().parents[1].parent / "shared" / "clients"
COMFY = CLIENTS / "ComfyUI"
NORM_BIAS = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"

pytestmark = pytest.mark.skipif(not (COMFY / "comfy" / "sd.py").is_file(),
                                reason=f"real clients not found at {CLIENTS} (they live in the project's shared folder, not in a clone)")


class _StubVisionAudio(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision/torchaudio wheels do not load beside the CPU torch here; ComfyUI only uses them
    inside models these tests never build (clients/README.md)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "torchaudio"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = mock.MagicMock(name=spec.name)
        m.__path__, m.__spec__, m.__name__ = [], spec, spec.name
        return m

    def exec_module(self, module):
        pass


@pytest.fixture(scope="module")
def comfy():
    torch = pytest.importorskip("torch")
    sys.meta_path.insert(0, _StubVisionAudio())
    sys.path.insert(0, str(COMFY))
    argv = sys.argv
    sys.argv = ["comfy", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
        import comfy.model_management as mm
        import comfy.sd
    finally:
        sys.argv = argv
    mm.unet_inital_load_device = lambda *a, **k: torch.device("meta")  # build the network without RAM
    mm.load_models_gpu = lambda *a, **k: None  # nothing to move: the weights are never used
    mm.unet_offload_device = lambda *a, **k: torch.device("meta")
    return comfy.sd, torch


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def comfy_warnings():
    handler = _Warnings()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def planned_output(src: Path, tmp: Path, **options):
    """What `sdtk convert` writes for `src` (header: names, shapes, dtypes, metadata), as a sparse file."""
    conv = planned_outputs(src, tmp, **options)
    return conv.outputs[0].dest, conv


def meta_state_dict(torch, path: Path, real=()):
    from sdtk.formats import open_model

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    with open_model(path) as cat:
        sd = {k: (torch.from_numpy(np.array(t.read())) if k in real else
                  torch.empty(tuple(t.shape), dtype=dtypes[t.dtype.name], device="meta")) for k, t in cat.tensors.items()}
        return sd, dict(cat.metadata)


# sdtk's prediction type -> ComfyUI ModelType names (comfy/model_base.py: FLUX is ComfyUI's flow
# type with FLUX's shift schedule)
COMFY_TYPES = {"epsilon": {"EPS"}, "v": {"V_PREDICTION"}, "flow": {"FLOW", "FLUX"}}
CHECKPOINTS = [  # (layout, convert options, ComfyUI model class)
    ("sd15-full-ema", {"preset": "generation"}, "BaseModel"),
    ("sd15-inpainting", {"dtype": "fp16"}, "BaseModel"),
    ("sdxl-base", {"dtype": "bf16"}, "SDXL"),
    ("sdxl-vpred-ztsnr", {"preset": "generation"}, "SDXL"),
    ("sdxl-base", {"prediction_type": "v"}, "SDXL"),  # stated: sdtk adds the v_pred marker ComfyUI reads
    ("flux1-dev-aio", {"dtype": "fp8-e4m3fn"}, "Flux"),
    ("sd3-medium-incl-clips", {"dtype": "fp16"}, "SD3"),
]


@pytest.mark.parametrize("layout,options,model_class", CHECKPOINTS, ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CHECKPOINTS])
def test_checkpoint_loader_agrees_with_what_sdtk_recorded(comfy, tmp_path, layout, options, model_class):
    from sdtk.identify import identify_path

    sd_module, torch = comfy
    src = H.write_sparse(tmp_path / f"{layout}.safetensors", H.layout(layout))
    out, conv = planned_output(src, tmp_path, **options)
    ident = identify_path(out)
    sd, meta = meta_state_dict(torch, out)
    with comfy_warnings() as warnings:
        patcher = sd_module.load_state_dict_guess_config(sd, output_vae=False, output_clip=False,
                                                         output_clipvision=False, metadata=meta)[0]
    model = patcher.model
    assert type(model).__name__ == model_class
    assert ident.prediction_type == conv.prediction_type and model.model_type.name in COMFY_TYPES[ident.prediction_type]
    assert bool(model.model_config.sampling_settings.get("zsnr", False)) == ident.zero_terminal_snr
    assert not [w for w in warnings if "unet missing" in w or "unet unexpected" in w], warnings


def test_sd2_value_check_agrees_with_comfyui(comfy, tmp_path):
    """SD2 without markers: sdtk's `--prediction-type auto` (ComfyUI's statistic) and ComfyUI's loader agree."""
    sd_module, torch = comfy
    for std, expected in ((0.2, "V_PREDICTION"), (0.03, "EPS")):
        bias = np.random.default_rng(0).standard_normal(320).astype(np.float32)
        bias = (bias - bias.mean()) / bias.std() * std
        src = H.write_sparse_with_values(tmp_path / f"sd2-{std}.safetensors", H.layout("sd21-768-v"), {NORM_BIAS: bias})
        out, conv = planned_output(src, tmp_path, prediction_type="auto", dtype="fp16")
        sd, meta = meta_state_dict(torch, src, real={NORM_BIAS})  # the bias values ComfyUI measures
        out_sd, _ = meta_state_dict(torch, out)
        out_sd[NORM_BIAS] = sd[NORM_BIAS].half()
        with comfy_warnings() as warnings:
            model = sd_module.load_state_dict_guess_config(out_sd, output_vae=False, output_clip=False,
                                                           output_clipvision=False)[0].model
        assert type(model).__name__ == "SD21UNCLIP" or type(model).__name__ == "BaseModel"
        assert model.model_type.name == expected and expected in COMFY_TYPES[conv.prediction_type]
        assert not [w for w in warnings if "unet missing" in w or "unet unexpected" in w], warnings


UNETS = [("flux1-dev", {"dtype": "fp8-e4m3fn"}, "Flux", "FLUX"),
         ("sd15-emaonly", {"extract": ["unet"]}, "BaseModel", "EPS"),
         ("sdxl-base", {"extract": ["unet"]}, "SDXL", "EPS")]


@pytest.mark.parametrize("layout,options,model_class,model_type", UNETS, ids=[u[0] for u in UNETS])
def test_unet_loader_on_diffusion_models_alone(comfy, tmp_path, layout, options, model_class, model_type):
    from sdtk.identify import identify_path

    sd_module, torch = comfy
    src = H.write_sparse(tmp_path / f"{layout}.safetensors", H.layout(layout))
    out, conv = planned_output(src, tmp_path, **options)
    ident = identify_path(out)
    assert ident.kind == "diffusion-model" and model_type in COMFY_TYPES[ident.prediction_type]
    sd, _ = meta_state_dict(torch, out)
    with comfy_warnings() as warnings, torch.device("meta"):  # the UNet loader builds on the default device
        patcher = sd_module.load_diffusion_model_state_dict(sd)
    assert patcher is not None and type(patcher.model).__name__ == model_class
    assert patcher.model.model_type.name == model_type
    assert not [w for w in warnings if "missing" in w or "unexpected" in w], warnings
