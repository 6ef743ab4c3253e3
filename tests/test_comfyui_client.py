"""Real client: ComfyUI's own loaders (../shared/clients/ComfyUI, unmodified) on sdtk's outputs.

For each shared layout, the output sdtk plans for a conversion (names, shapes, dtypes and
metadata, exactly what `convert` writes; values zero, the file sparse) is loaded with ComfyUI's
checkpoint loader (`comfy.sd.load_state_dict_guess_config`, what CheckpointLoaderSimple runs) or
UNet loader (`load_diffusion_model_state_dict`), the model built on the meta device (no RAM for
weights). ComfyUI's model class and model type (EPS / V_PREDICTION / FLOW, zsnr) must be what
sdtk recorded, with no missing or unexpected UNet keys. Skipped when ../shared/clients is absent
(a user's clone) or torch is not installed."""
from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.machinery
import logging
import re
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
    def __init__(self, level=logging.WARNING):
        super().__init__(level)
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


@contextlib.contextmanager
def comfy_key_reports():
    """ComfyUI's own lists of missing and unexpected keys, as its loaders log them (comfy/sd.py: VAE
    "Missing VAE keys" warning / "Leftover VAE keys" debug; text encoders "clip missing" warning /
    "clip unexpected" debug). Yields {"missing": [...], "unexpected": [...]}, filled on exit."""
    handler = _Warnings(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    found = {"missing": [], "unexpected": []}
    try:
        yield found
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    for message in handler.messages:
        m = re.match(r"(Missing VAE keys|clip missing|Leftover VAE keys|clip unexpected)\W*(\[.*\])", message, re.S)
        if m:
            found["missing" if "issing" in m.group(1) else "unexpected"] += ast.literal_eval(m.group(2))


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
    with comfy_warnings() as warnings, torch.device("meta"):  # with its VAE and text encoders, all on meta
        patcher, clip, vae, _ = sd_module.load_state_dict_guess_config(
            sd, output_vae=True, output_clip=True, output_clipvision=False, metadata=meta,
            te_model_options={"initial_device": torch.device("meta")})
    model = patcher.model
    assert vae is not None and vae.first_stage_model is not None and clip is not None
    assert type(model).__name__ == model_class
    assert ident.prediction_type == conv.prediction_type and model.model_type.name in COMFY_TYPES[ident.prediction_type]
    assert bool(model.model_config.sampling_settings.get("zsnr", False)) == ident.zero_terminal_snr
    assert not [w for w in warnings if "missing" in w.lower() or "unet unexpected" in w or "not init" in w], warnings


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
         ("flux1-schnell", {"dtype": "bf16"}, "Flux", "FLOW"),  # no guidance_in: ComfyUI FluxSchnell (plain flow, shift 1)
         ("sd15-emaonly", {"extract": ["unet"]}, "BaseModel", "EPS"),
         ("sdxl-base", {"extract": ["unet"]}, "SDXL", "EPS"),
         ("sdxl-vpred-ztsnr", {"extract": ["unet"]}, "SDXL", "V_PREDICTION"),  # the markers travel with the UNet
         ("sdxl-base", {"extract": ["unet"], "prediction_type": "v"}, "SDXL", "V_PREDICTION")]


@pytest.mark.parametrize("layout,options,model_class,model_type", UNETS,
                         ids=[f"{u[0]}-{'-'.join(map(str, u[1].values()))}" for u in UNETS])
def test_unet_loader_on_diffusion_models_alone(comfy, tmp_path, layout, options, model_class, model_type):
    from sdtk.identify import identify_path

    sd_module, torch = comfy
    src = H.write_sparse(tmp_path / f"{layout}.safetensors", H.layout(layout))
    out, conv = planned_output(src, tmp_path, **options)
    ident = identify_path(out)
    assert ident.kind == "diffusion-model" and model_type in COMFY_TYPES[ident.prediction_type]
    sd, _ = meta_state_dict(torch, out)
    markers = sorted(k for k in sd if "." not in k)  # (ComfyUI pops the keys it loads from `sd`)
    with comfy_warnings() as warnings, torch.device("meta"):  # the UNet loader builds on the default device
        patcher = sd_module.load_diffusion_model_state_dict(sd)
    assert patcher is not None and type(patcher.model).__name__ == model_class
    assert patcher.model.model_type.name == model_type
    assert bool(patcher.model.model_config.sampling_settings.get("zsnr", False)) == ident.zero_terminal_snr
    # the prediction markers are not parameters of the network: ComfyUI's UNet loader reads them, then
    # lists them as "unet unexpected" (as for any v-pred UNet); nothing else may be missing or unexpected
    expected = [f"unet unexpected: {markers}"] if markers else []
    assert [w for w in warnings if "missing" in w or "unexpected" in w] == expected, warnings


# --- ComfyUI's VAE loader and text-encoder (CLIP) loaders on sdtk's extracts ------------------------------
# Which loader a user picks for each model's text encoders (nodes.py CLIPLoader / DualCLIPLoader /
# TripleCLIPLoader: the `type` names a comfy.sd.CLIPType; "sdxl" has none and is STABLE_DIFFUSION) and the
# text-encoder class ComfyUI builds from the files.
TEXT_ENCODER_LOADERS = {
    "sd15-emaonly": ("STABLE_DIFFUSION", "SD1ClipModel"),
    "sdxl-base": ("STABLE_DIFFUSION", "SDXLClipModel"),
    "sd21-768-v": ("STABLE_DIFFUSION", "SD2ClipModel"),
    "sd3-medium-incl-clips": ("SD3", "SD3ClipModel_"),
    "flux1-dev-aio": ("FLUX", "FluxClipModel_"),
}
# What ComfyUI reports for the files, each key accounted for: (missing, unexpected). The SD1.5, SDXL and
# FLUX checkpoints hold no CLIP-L `text_projection.weight` (their layouts), so no extract can; ComfyUI's
# checkpoint loader skips that key for the same reason (sd.py load_state_dict_guess_config) and none of
# these models uses CLIP-L's projected pooled output (FLUX: return_projected_pooled=False). The CLIP-L
# `position_ids` and the OpenCLIP `logit_scale` are kept as the source holds them; ComfyUI logs them at
# debug level only. The real stand-alone CLIP-L layout (clip-l-hf) gets the very same report.
CLIP_L_HF_REPORT = (["text_projection.weight"], ["text_model.embeddings.position_ids"])
KEY_REPORTS = {
    ("sd15-emaonly", "clip-l"): CLIP_L_HF_REPORT,
    ("sdxl-base", "clip-l"): CLIP_L_HF_REPORT,
    ("sdxl-base", "clip-g"): ([], ["logit_scale"]),
    ("sd21-768-v", "open-clip-h"): ([], ["logit_scale"]),
    ("flux1-dev-aio", "clip-l"): (["text_projection.weight"], []),
    ("clip-l-hf", "model"): CLIP_L_HF_REPORT,
}


def _load_text_encoders(sd_module, torch, state_dicts, clip_type, device=None):
    options = {"initial_device": device} if device is not None else {}
    return sd_module.load_text_encoder_state_dicts(state_dicts, clip_type=getattr(sd_module.CLIPType, clip_type),
                                                   model_options=options)


@pytest.mark.parametrize("layout", list(TEXT_ENCODER_LOADERS))
def test_vae_and_text_encoder_loaders_on_every_extract(comfy, tmp_path, layout):
    """Full-size extracts (headers as convert writes them), ComfyUI's networks on the meta device:
    the VAE and text-encoder classes ComfyUI picks, every key accounted for."""
    sd_module, torch = comfy
    src = H.write_sparse(tmp_path / f"{layout}.safetensors", H.layout(layout))
    conv = planned_outputs(src, tmp_path, extract=["vae", "text-encoders"])
    files = {o.part: meta_state_dict(torch, o.dest)[0] for o in conv.outputs}
    vae_sd = files.pop("vae")
    with comfy_key_reports() as report, torch.device("meta"):
        vae = sd_module.VAE(sd=vae_sd)
    assert vae.first_stage_model is not None and vae.latent_channels == (16 if layout.startswith(("sd3", "flux")) else 4)
    assert report == {"missing": [], "unexpected": []}
    clip_type, clip_class = TEXT_ENCODER_LOADERS[layout]
    expected = {"missing": [], "unexpected": []}
    for part in files:
        missing, unexpected = KEY_REPORTS.get((layout, part), ([], []))
        expected["missing"] += missing
        expected["unexpected"] += unexpected
    with comfy_key_reports() as report:
        clip = _load_text_encoders(sd_module, torch, list(files.values()), clip_type, torch.device("meta"))
    assert type(clip.cond_stage_model).__name__ == clip_class
    assert sorted(report["missing"]) == sorted(expected["missing"]) and sorted(report["unexpected"]) == sorted(expected["unexpected"])


@pytest.mark.parametrize("layout,loader", [("vae-sd-kl-f8", "vae"), ("clip-l-hf", "clip")])
def test_stand_alone_vae_and_clip_files_converted(comfy, tmp_path, layout, loader):
    sd_module, torch = comfy
    src = H.write_sparse(tmp_path / f"{layout}.safetensors", H.layout(layout))
    out, _ = planned_output(src, tmp_path, dtype="fp16")
    sd, _ = meta_state_dict(torch, out)
    with comfy_key_reports() as report, torch.device("meta"):
        if loader == "vae":
            assert type(sd_module.VAE(sd=sd).first_stage_model).__name__ == "AutoencoderKL"
        else:
            clip = _load_text_encoders(sd_module, torch, [sd], "STABLE_DIFFUSION", torch.device("meta"))
            assert type(clip.cond_stage_model).__name__ == "SD1ClipModel"
    missing, unexpected = KEY_REPORTS.get((layout, "model"), ([], []))
    assert report == {"missing": missing, "unexpected": unexpected}


@pytest.fixture(scope="module")
def sd15_with_real_vae_and_clip(tmp_path_factory):
    """An SD1.5 checkpoint at real shapes whose VAE and CLIP-L carry distinct random fp16 values
    (83.7M + 123.1M of them, 413 MB); the UNet is a zero-filled hole."""
    folder = tmp_path_factory.mktemp("sd15-real")
    lay = H.layout("sd15-emaonly")
    rng = np.random.default_rng(17)
    values = {}
    for key, shape, dt in lay.tensors:
        if key.startswith(("first_stage_model.", "cond_stage_model.")) and dt.startswith("float"):
            bits = rng.integers(0, 1 << 16, size=int(np.prod(shape)), dtype=np.uint16) & np.uint16(0xBFFF)
            values[key] = bits.view(np.float16).reshape(shape)  # any finite fp16 below 2 in magnitude
    src = H.write_sparse_with_values(folder / "sd15.safetensors", lay, values)
    yield src
    for f in folder.iterdir():
        f.unlink()


def test_vae_and_clip_loaders_load_the_extracts_tensor_for_tensor(comfy, sd15_with_real_vae_and_clip, tmp_path):
    """Real allocation: `convert --extract vae,clip-l` written for real, then ComfyUI's VAELoader and
    CLIPLoader code (load_torch_file, comfy.sd.VAE, comfy.sd.load_clip): every tensor ComfyUI holds
    equals the input checkpoint's, read by the safetensors library."""
    from safetensors import safe_open

    from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options

    sd_module, torch = comfy
    import comfy.utils

    src = sd15_with_real_vae_and_clip
    conv, _ = convert_file(src, resolve_options(ConvertOptions(source_hashes=False, extract=["vae", "clip-l"])),
                           out_folder=tmp_path)
    parts = {o.part: o.dest for o in conv.outputs}
    with safe_open(str(src), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("first_stage_model.", "cond_stage_model."))}

    with comfy_key_reports() as report:
        vae = sd_module.VAE(sd=comfy.utils.load_torch_file(str(parts["vae"]), safe_load=True))
    assert report == {"missing": [], "unexpected": []}
    held = vae.first_stage_model.state_dict()
    assert sorted(held) == sorted(k[len("first_stage_model."):] for k in original if k.startswith("first_stage_model."))
    for k, v in held.items():  # ComfyUI's CPU VAE dtype is fp32 (or the file's fp16): exact either way
        assert v.dtype in (torch.float16, torch.float32) and torch.equal(v.half(), original["first_stage_model." + k]), k

    with comfy_key_reports() as report:
        clip = sd_module.load_clip([str(parts["clip-l"])], clip_type=sd_module.CLIPType.STABLE_DIFFUSION)
    assert (report["missing"], report["unexpected"]) == CLIP_L_HF_REPORT
    held = {k[len("clip_l.transformer."):]: v for k, v in clip.cond_stage_model.state_dict().items()
            if k.startswith("clip_l.transformer.text_model.")}
    te = {k[len("cond_stage_model.transformer."):]: v for k, v in original.items()
          if k.startswith("cond_stage_model.transformer.") and not k.endswith("position_ids")}
    assert sorted(held) == sorted(te)
    for k, v in held.items():
        assert v.dtype in (torch.float16, torch.float32) and torch.equal(v.half(), te[k]), k
    for f in parts.values():
        f.unlink()


def test_a1111_forward_pass_equals_comfyuis_unet(comfy):
    """sdtk's numpy UNet pass (A1111's SD2 check) against ComfyUI's UNetModel (the LDM network) with
    SD2's structure (linear transformers, attention in levels 0-2, none at the lowest), scaled down
    (32..64 channels, 8-channel heads), random weights: the same output."""
    sd_module, torch = comfy
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from sdtk.identify.sd2_forward import unet_forward
    from sdtk.tensors import from_array

    torch.manual_seed(0)
    with torch.device("cpu"):
        net = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                        channel_mult=[1, 2, 2, 2], num_head_channels=8, use_spatial_transformer=True,
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                        transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=16, legacy=False,
                        dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
    sd = net.state_dict()
    for v in sd.values():
        v.copy_(torch.randn_like(v) * (0.3 if v.ndim > 1 else 0.1))
    net.load_state_dict(sd)
    assert "output_blocks.11.1.transformer_blocks.0.norm1.bias" in sd and "output_blocks.0.1.transformer_blocks.0.norm1.bias" not in sd
    x, ctx = torch.full((1, 4, 8, 8), 0.5), torch.full((1, 2, 16), 0.5)
    with torch.no_grad():
        ref = net(x, torch.tensor([999.0]), context=ctx).numpy()
    out = unet_forward({k: from_array(k, v.numpy()) for k, v in sd.items()}, x.numpy(), 999, ctx[0].numpy(), head_channels=8)
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
