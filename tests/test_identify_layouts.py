"""Every shared layout, as a full-size sparse safetensors file, identified correctly (header only)."""
import pytest

from helpers_identify import layout, write_sparse
from sdtk.identify import identify_path

# layout -> (kind, architecture, variant, {component: prefix}, has_ema, precision, prediction)
EXPECTED = {
    "sd15-full-ema": ("checkpoint", "stable-diffusion-v1", None,
                      {"unet": "model.diffusion_model.", "unet_ema": "model_ema.", "vae": "first_stage_model.",
                       "text_encoder": "cond_stage_model.transformer.", "ddpm_buffers": ""}, True, "fp32", "epsilon"),
    "sd15-emaonly": ("checkpoint", "stable-diffusion-v1", None,
                     {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."},
                     False, "fp32", "epsilon"),
    "sd15-inpainting": ("checkpoint", "stable-diffusion-v1-inpainting", "inpainting", {"unet": "model.diffusion_model."}, False, "fp32", "epsilon"),
    "sd21-768-v": ("checkpoint", "stable-diffusion-v2", None, {"text_encoder": "cond_stage_model.model."}, False, "fp32", None),
    "sdxl-base": ("checkpoint", "stable-diffusion-xl-v1-base", None,
                  {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
                  False, "fp16", "epsilon"),
    "sdxl-vpred-ztsnr": ("checkpoint", "stable-diffusion-xl-v1-base", "v-prediction", {"markers": ""}, False, "fp16", "v"),
    "flux1-dev": ("diffusion-model", "flux-1-dev", None, {"unet": "model.diffusion_model."}, False, "bf16", "flow"),
    "flux1-schnell": ("diffusion-model", "flux-1-schnell", None, {"unet": "model.diffusion_model."}, False, "bf16", "flow"),
    "flux1-dev-aio": ("checkpoint", "flux-1-dev", None,
                      {"vae": "vae.", "text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.t5xxl."}, False,
                      "mixed bf16/fp32", "flow"),
    "sd3-medium-incl-clips": ("checkpoint", "stable-diffusion-v3-medium", None,
                              {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                               "text_encoder_3": "text_encoders.t5xxl.", "model_sampling": "model.model_sampling."}, False, "fp32", "flow"),
    "vae-sd-kl-f8": ("vae", "sd-vae-kl-f8", None, {"vae": ""}, False, "fp32", None),
    "clip-l-hf": ("text-encoder", "clip-l", None, {"text_encoder": ""}, False, "fp32", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_identified_full_size(tmp, name):
    kind, arch, variant, prefixes, ema, precision, prediction = EXPECTED[name]
    lay = layout(name)
    path = write_sparse(tmp / f"{name}.safetensors", lay)
    ident = identify_path(path)
    assert (ident.kind, ident.architecture, ident.variant) == (kind, arch, variant)
    for comp, prefix in prefixes.items():
        assert ident.components[comp].prefix == prefix, comp
    assert ident.has_ema is ema
    assert ident.precision == precision
    assert ident.prediction_type == prediction
    # every tensor is accounted for exactly once, with the layout's parameter count
    assert sum(len(c.keys) for c in ident.components.values()) == len(lay.tensors)
    assert ident.parameters == lay.parameter_count
    # a real, complete layout has no missing keys and no unknown extras
    assert not ident.missing_keys, ident.missing_keys
    assert not ident.extra_keys, ident.extra_keys
    assert ident.file_size == path.stat().st_size


def test_published_component_sizes(tmp):
    """Parameter counts of components match the published figures (architectures reference)."""
    ident = identify_path(write_sparse(tmp / "sd15.safetensors", layout("sd15-full-ema")))
    assert ident.components["unet"].parameters == 859_520_964
    assert ident.components["vae"].parameters == 83_653_863
    assert ident.components["text_encoder"].parameters == 123_060_480 + 77  # + int64 position_ids
    assert ident.components["unet"].bytes == 859_520_964 * 4
    xl = identify_path(write_sparse(tmp / "xl.safetensors", layout("sdxl-base")))
    assert xl.components["unet"].parameters == 2_567_463_684
    assert xl.components["text_encoder_2"].parameters == 694_659_841
    flux = identify_path(write_sparse(tmp / "flux.safetensors", layout("flux1-dev")))
    assert flux.parameters == 11_901_408_320


def test_header_only_no_tensor_bytes_read(tmp, monkeypatch):
    """Identification reads no tensor data except CLIP position_ids (77 values)."""
    from sdtk.formats import safetensors as st

    read = []
    real = st._mmap_loader

    def spy(mm, dt, shape, offset):
        inner = real(mm, dt, shape, offset)

        def load():
            read.append(shape)
            return inner()
        return load

    monkeypatch.setattr(st, "_mmap_loader", spy)
    from sdtk.identify import checks

    real_small = checks._small_values  # small tensors are read through their file span (no numpy)
    monkeypatch.setattr(checks, "_small_values", lambda t: (read.append(tuple(t.shape)), real_small(t))[1])
    identify_path(write_sparse(tmp / "sd15.safetensors", layout("sd15-full-ema")))
    assert read == [(1, 77)]
    read.clear()
    identify_path(write_sparse(tmp / "flux.safetensors", layout("flux1-dev")))
    assert read == []


def test_no_tensor_read_for_checkpoints_but_position_ids(tmp, monkeypatch):
    """Whatever the container (.ckpt here), identify reads only the 77 position_ids values."""
    from sdtk.formats import open_model
    from sdtk.identify import checks
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.identify import identify
    from sdtk.samples import layout_plan

    path = tmp / "sd15.ckpt"
    write_torch_zip(path, layout_plan(layout("sd15-full-ema")), wrap="state_dict", sparse_zeros=True)
    read = []
    real_small = checks._small_values  # small tensors are read through their file span (no numpy)
    monkeypatch.setattr(checks, "_small_values", lambda t: (read.append(t.name), real_small(t))[1] if t.span else real_small(t))
    with open_model(path) as cat:
        for t in cat.tensors.values():
            inner = t.loader
            t.loader = (lambda name, f: (lambda: (read.append(name), f())[1]))(t.name, inner)
        ident = identify(cat)
    assert ident.architecture == "stable-diffusion-v1"
    assert read == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
