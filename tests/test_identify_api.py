"""The API other commands build on: component prefixes, EMA key mapping, metadata summary, JSON."""
import json

import helpers_identify as H
from sdtk.architectures import COMPONENT_ORDER, component_prefixes, ema_key_for, ema_map, family_of
from sdtk.identify import SCHEMA, identify_path


def test_ema_key_for_matches_the_real_layout():
    lay = H.layout("sd15-full-ema")
    keys = {k for k, _, _ in lay.tensors}
    assert ema_key_for("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    unet = [k for k in keys if k.startswith("model.diffusion_model.")]
    mapped = ema_map(unet)
    assert set(mapped) == {k for k in keys if k.startswith("model_ema.")} - {"model_ema.decay", "model_ema.num_updates"}
    assert len(mapped) == len(unet)  # the dot-less names never collide in SD1


def test_component_prefixes_per_architecture():
    assert component_prefixes("stable-diffusion-v1")["text_encoder"][0] == "cond_stage_model.transformer."
    assert component_prefixes("stable-diffusion-v2-768-v")["text_encoder"][0] == "cond_stage_model.model."
    xl = component_prefixes("stable-diffusion-xl-v1-base")
    assert xl["text_encoder"][0] == "conditioner.embedders.0.transformer." and xl["text_encoder_2"][0] == "conditioner.embedders.1.model."
    assert component_prefixes("stable-diffusion-xl-v1-refiner")["text_encoder_2"][0] == "conditioner.embedders.0.model."
    flux = component_prefixes("flux-1-dev")
    assert flux["vae"] == ["first_stage_model.", "vae."] and flux["text_encoder_2"] == ["text_encoders.t5xxl."]
    assert component_prefixes("sdxl") == xl  # family names work too
    assert family_of("stable-diffusion-v1/lora") == "sd1"
    assert set(component_prefixes("auraflow")) <= set(COMPONENT_ORDER)


def test_identify_components_cover_every_key_with_the_right_prefix(tmp):
    ident = identify_path(H.write_sparse(tmp / "x.safetensors", H.layout("sd3-medium-incl-clips")))
    for comp in ident.components.values():
        assert all(k.startswith(comp.prefix) for k in comp.keys), comp.name
    assert ident.components["text_encoder_2"].model == "clip-g" and ident.components["text_encoder_3"].model == "t5-xxl"


def test_metadata_summary(tmp):
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.title": "My merge", "modelspec.thumbnail": "data:image/png;base64," + "A" * 5000,
            "sd_merge_recipe": json.dumps({"type": "webui", "primary_model_hash": "abc", "secondary_model_hash": "def",
                                           "interp_method": "Weighted sum", "multiplier": 0.3, "other": "x"}),
            "sd_merge_models": json.dumps({"abc": {"name": "a.safetensors"}, "def": {"name": "b.safetensors"}}),
            "sdtk.source": "a.ckpt", "format": "pt"}
    ident = identify_path(H.write_sparse(tmp / "m.safetensors", H.layout("sdxl-base"), meta))
    m = ident.metadata
    assert m["modelspec"]["title"] == "My merge" and m["modelspec"]["thumbnail"].startswith("(image")
    assert m["merge"]["sd_merge_models"] == ["a.safetensors", "b.safetensors"]
    assert m["merge"]["sd_merge_recipe"]["multiplier"] == 0.3 and "other" not in m["merge"]["sd_merge_recipe"]
    assert m["lineage"] == {"sdtk.source": "a.ckpt"} and m["other_keys"] == ["format"]


def test_to_json_is_plain_json(tmp):
    ident = identify_path(H.write_sparse(tmp / "x.safetensors", H.layout("flux1-dev-aio")))
    data = json.loads(json.dumps(ident.to_json()))
    assert data["schema"] == SCHEMA == "sdtk.inspect/1"
    assert data["components"]["vae"]["prefix"] == "vae." and data["components"]["vae"]["model"] == "vae-kl-f8-16ch"
