"""The single-file <-> diffusers key maps on every shared layout (full size, header only): each
component maps onto the diffusers/transformers model its generated config describes (built on
the meta device: no memory) with no missing or unexpected key and every shape equal; and the
whole file maps back to itself, name, shape and dtype, in order."""
from __future__ import annotations

import pytest

from sdtk.architectures.diffusers_keys import components as rows
from sdtk.architectures.diffusers_keys.assemble import join_component, split_single_file
from sdtk.samples import layout_plan, load_layout

LAYOUT_FAMILY = {"sd15-full-ema": "sd1", "sd15-emaonly": "sd1", "sd15-inpainting": "sd1", "sd21-768-v": "sd2",
                 "sdxl-base": "sdxl", "sdxl-vpred-ztsnr": "sdxl", "flux1-dev": "flux1", "flux1-schnell": "flux1",
                 "flux1-dev-aio": "flux1", "sd3-medium-incl-clips": "sd3"}


def _split(layout):
    plan = {t.name: t for t in layout_plan(load_layout(layout))}
    return plan, split_single_file(plan, LAYOUT_FAMILY[layout])


@pytest.mark.parametrize("layout", sorted(LAYOUT_FAMILY))
def test_every_component_matches_the_diffusers_model_of_its_config(layout):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    _, split = _split(layout)
    assert split.components
    for comp in split.components:
        cfg = rows.config_for(comp.spec.kind, comp.single_shapes, comp.shapes, LAYOUT_FAMILY[layout], comp.spec.options, "float32")
        with torch.device("meta"):
            if comp.spec.library == "diffusers":
                model = getattr(diffusers, comp.spec.cls).from_config({k: v for k, v in cfg.items() if k != "_class_name"})
            else:
                conf_cls = transformers.CLIPTextConfig if "CLIP" in comp.spec.cls else transformers.T5Config
                model = getattr(transformers, comp.spec.cls)(conf_cls(**cfg))
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if comp.spec.cls == "CLIPTextModel":  # transformers >= 5.6 flattened it; sdtk writes text_model.* (both load)
            want = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in want.items()}
        want.pop("encoder.embed_tokens.weight", None)  # T5: tied to shared.weight
        assert comp.shapes == want, (comp.spec.folder, sorted(set(comp.shapes) ^ set(want))[:5])


@pytest.mark.parametrize("layout", sorted(LAYOUT_FAMILY))
def test_whole_layout_maps_back_to_itself(layout):
    plan, split = _split(layout)
    back = []
    for comp in split.components:
        cfg = rows.config_for(comp.spec.kind, comp.single_shapes, comp.shapes, LAYOUT_FAMILY[layout], comp.spec.options, "float32")
        back += join_component(comp.spec, comp.prefix, {t.name: t for t in comp.tensors}, cfg, comp.created)
    back += split.extra
    got = {t.name: (tuple(t.shape), t.dtype) for t in back}
    assert got == {k: (tuple(t.shape), t.dtype) for k, t in plan.items()}


def test_what_diffusers_does_not_keep_goes_to_the_sidecar():
    _, split = _split("sd15-full-ema")
    extra = {t.name for t in split.extra}
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in extra
    assert "alphas_cumprod" in extra and sum(n.startswith("model_ema.") for n in extra) == 688
    _, split = _split("sd21-768-v")
    extra = {t.name for t in split.extra}
    assert "cond_stage_model.model.text_projection" in extra and "cond_stage_model.model.logit_scale" in extra
    assert sum(n.startswith("cond_stage_model.model.transformer.resblocks.23.") for n in extra) == 12
    _, split = _split("sdxl-vpred-ztsnr")
    assert {t.name for t in split.extra} == {"conditioner.embedders.1.model.logit_scale", "v_pred", "ztsnr",
                                             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}


def test_refiner_geometry_is_read_not_assumed():
    """The SDXL refiner (4 levels, attention at 1-2, depth 4): the script that hard-codes SDXL base's
    3 levels leaves 194 keys unmapped (reference 1.2); the geometry-driven map covers all of them."""
    from sdtk.architectures.diffusers_keys.unet import UNetGeometry, geometry_from_config, unet_config, unet_links

    g = UNetGeometry((384, 768, 1536, 1536), 2, (False, True, True, False), (0, 4, 4, 0), 4, 4, 4, 1280, True, 2560)
    links = unet_links(g)
    assert geometry_from_config(unet_config(g, fixed_heads=None, sample_size=128)) == g
    singles = {link.single for link in links}
    assert "output_blocks.2.1.conv.weight" in singles and "output_blocks.5.2.conv.weight" in singles
    assert "output_blocks.8.2.conv.weight" in singles and "label_emb.0.0.weight" in singles
