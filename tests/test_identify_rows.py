"""A test per architecture-table row: synthetic variants built by rule (helpers_identify.py)
from the real layouts or from the signature keys with their real widths."""
import pytest

import helpers_identify as H
from sdtk.architectures import ADJACENT, ARCHITECTURES, VARIANTS
from sdtk.identify import identify_path

SD15 = "sd15-emaonly"


def _ckpt_in(layout_name, n):
    return lambda: H.unet_in_channels(H.layout(layout_name), n)


# case id -> (builder, kind, architecture, variant)
DIFFUSION_CASES = {
    "sd1-inpainting": (_ckpt_in(SD15, 9), "checkpoint", "stable-diffusion-v1-inpainting", "inpainting"),
    "sd1-instruct-pix2pix": (_ckpt_in(SD15, 8), "checkpoint", "stable-diffusion-v1-instruct-pix2pix", "instruct-pix2pix"),
    "sd1": (lambda: H.layout(SD15), "checkpoint", "stable-diffusion-v1", None),
    "sd2-inpainting": (_ckpt_in("sd21-768-v", 9), "checkpoint", "stable-diffusion-v2-inpainting", "inpainting"),
    "sd2-depth": (_ckpt_in("sd21-768-v", 5), "checkpoint", "stable-diffusion-v2-depth", "depth"),
    "sd2": (lambda: H.layout("sd21-768-v"), "checkpoint", "stable-diffusion-v2", None),
    "sd2-unclip-l": (lambda: H.sd2_unclip(1536), "checkpoint", "stable-diffusion-v2-unclip-l", "unclip"),
    "sd2-unclip-h": (lambda: H.sd2_unclip(2048), "checkpoint", "stable-diffusion-v2-unclip-h", "unclip"),
    "x4-upscaler": (H.sd_x4_upscaler, "checkpoint", "stable-diffusion-x4-upscaler", "x4-upscaler"),
    "ssd-1b": (lambda: H.sdxl_distilled(4), "checkpoint", "ssd-1b", "distilled"),
    "segmind-vega": (lambda: H.sdxl_distilled(2), "checkpoint", "segmind-vega", "distilled"),
    "sdxl-inpainting": (_ckpt_in("sdxl-base", 9), "checkpoint", "stable-diffusion-xl-v1-inpainting", "inpainting"),
    "sdxl-instruct-pix2pix": (_ckpt_in("sdxl-base", 8), "checkpoint", "stable-diffusion-xl-v1-instruct-pix2pix", "instruct-pix2pix"),
    "sdxl-base": (lambda: H.layout("sdxl-base"), "checkpoint", "stable-diffusion-xl-v1-base", None),
    "playground-v2.5": (H.playground_v25, "checkpoint", "playground-v2.5", "edm"),
    "sdxl-refiner": (H.sdxl_refiner, "checkpoint", "stable-diffusion-xl-v1-refiner", "refiner"),
    "sd35-medium": (lambda: H.sd35("medium"), "diffusion-model", "stable-diffusion-v3.5-medium", None),
    "sd35-large": (lambda: H.sd35("large"), "diffusion-model", "stable-diffusion-v3.5-large", None),
    "sd3-medium": (lambda: H.layout("sd3-medium-incl-clips"), "checkpoint", "stable-diffusion-v3-medium", None),
    "sd3-other-depth": (lambda: H.with_shape(H.layout("sd3-medium-incl-clips"), "model.diffusion_model.x_embedder.proj.weight", (1920, 16, 2, 2)),
                        "checkpoint", "stable-diffusion-v3", None),
    "flux-fill": (lambda: H.flux_img_in(384), "diffusion-model", "flux-1-fill-dev", "inpainting"),
    "flux-depth": (lambda: H.flux_img_in(128), "diffusion-model", "flux-1-depth-dev", "depth"),
    "flux-dev": (lambda: H.layout("flux1-dev"), "diffusion-model", "flux-1-dev", None),
    "flux-dev-bare": (lambda: H.sub_prefix(H.layout("flux1-dev"), "model.diffusion_model."), "diffusion-model", "flux-1-dev", None),
    "flux-schnell": (lambda: H.layout("flux1-schnell"), "diffusion-model", "flux-1-schnell", None),
    "flux-2": (lambda: H.dit("flux-2"), "diffusion-model", "flux-2", None),
    "chroma": (lambda: H.dit("chroma"), "diffusion-model", "chroma", None),
    "auraflow": (lambda: H.dit("auraflow"), "diffusion-model", "auraflow", None),
    "hunyuan-dit": (lambda: H.dit("hunyuan-dit"), "diffusion-model", "hunyuan-dit", None),
    "lumina-2": (lambda: H.dit("lumina-2"), "diffusion-model", "lumina-2", None),
    "z-image": (lambda: H.dit("z-image", prefix=""), "diffusion-model", "z-image", None),
    "qwen-image": (lambda: H.dit("qwen-image"), "diffusion-model", "qwen-image", None),
    "pixart-alpha": (lambda: H.dit("pixart-alpha"), "diffusion-model", "pixart-alpha", None),
    "pixart-sigma": (lambda: H.dit("pixart-sigma"), "diffusion-model", "pixart-sigma", None),
    "cascade-c": (lambda: H.dit("stable-cascade-stage-c"), "diffusion-model", "stable-cascade-stage-c", None),
    "cascade-b": (lambda: H.dit("stable-cascade-stage-b"), "diffusion-model", "stable-cascade-stage-b", None),
    "diffusers-unet-sd1": (H.diffusers_unet_sd1, "diffusion-model", "stable-diffusion-v1", None),
    "diffusers-unet-sd1-inpainting": (lambda: H.diffusers_unet_sd1(in_channels=9), "diffusion-model", "stable-diffusion-v1-inpainting", "inpainting"),
    "diffusers-unet-sd2": (lambda: H.diffusers_unet_sd1(context=1024), "diffusion-model", "stable-diffusion-v2", None),
    "diffusers-unet-sdxl": (lambda: H.diffusers_unet_sd1(context=2048, sdxl=True), "diffusion-model", "stable-diffusion-xl-v1-base", None),
    "diffusers-flux-dev": (H.diffusers_flux, "diffusion-model", "flux-1-dev", None),
    "diffusers-flux-schnell": (lambda: H.diffusers_flux(guidance=False), "diffusion-model", "flux-1-schnell", None),
}


@pytest.mark.parametrize("case", sorted(DIFFUSION_CASES))
def test_diffusion_row(tmp, case):
    builder, kind, arch, variant = DIFFUSION_CASES[case]
    ident = identify_path(H.write_sparse(tmp / f"{case}.safetensors", builder()))
    assert (ident.kind, ident.architecture, ident.variant) == (kind, arch, variant)
    assert "unet" in ident.components


def test_every_family_row_has_a_case(tmp):
    """Each FAMILIES row (family, key naming) is what identifies at least one case."""
    from sdtk.architectures import FAMILIES

    hit = set()
    for case, (builder, _, _, _) in DIFFUSION_CASES.items():
        ident = identify_path(H.write_sparse(tmp / f"{case}.safetensors", builder()))
        hit.add((ident.family, ident.implementation))
    rows = {(f.name, f.implementation) for f in FAMILIES}
    assert rows <= hit, f"family rows without a test: {sorted(rows - hit)}"


def test_every_variant_row_has_a_case():
    tested = {c[2] for c in DIFFUSION_CASES.values()}
    rows = {v.architecture for v in VARIANTS}
    assert rows <= tested, f"variant rows without a test: {sorted(rows - tested)}"


def test_every_registered_architecture_is_reachable():
    """Each registry id is produced by a table row, or by prediction refinement (SD2 512/768-v), or by
    the Playground marker rule, or by diffusers pipeline names."""
    produced = {v.architecture for v in VARIANTS} | {"stable-diffusion-v2-512", "stable-diffusion-v2-768-v", "playground-v2.5"}
    assert set(ARCHITECTURES) <= produced


# ---- adjacent file types -----------------------------------------------------------------------

XL_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # kohya SGM name of an SDXL cross-attention key (640 x 2048)
ADJACENT_CASES = {
    # case: (rows builder, values builder or None, kind, subtype/implementation, architecture)
    "kohya-lora-sd1": (lambda: H.kohya_lora("sd1", 16), 8.0, "lora", "kohya", "stable-diffusion-v1/lora"),
    "kohya-lora-sdxl": (lambda: H.kohya_lora("sdxl", 32), 16.0, "lora", "kohya", "stable-diffusion-xl-v1-base/lora"),
    "locon": (lambda: H.kohya_lora("sd1", 8, "locon"), 4.0, "lora", "kohya", "stable-diffusion-v1/lora"),
    "loha": (lambda: H.kohya_lora("sdxl", 8, "loha"), 1.0, "lora", "loha", "stable-diffusion-xl-v1-base/lora"),
    "lokr": (lambda: H.kohya_lora("sd1", 4, "lokr"), 1.0, "lora", "lokr", "stable-diffusion-v1/lora"),
    "peft-flux": (lambda: H.peft_flux_lora(32), None, "lora", "peft", "flux-1-dev/lora"),
    "diffusers-old": (lambda: H.diffusers_old_lora(4), None, "lora", "diffusers-old", "stable-diffusion-v1/lora"),
    "oft": (lambda: [(f"{XL_K}.oft_blocks", (4, 160, 160), "float32"), (f"{XL_K}.alpha", (), "float32")], None, "lora", "oft",
            "stable-diffusion-xl-v1-base/lora"),
    "ia3": (lambda: [(f"{XL_K}.weight", (640,), "float32"), (f"{XL_K}.on_input", (), "int64")], None, "lora", "ia3",
            "stable-diffusion-xl-v1-base/lora"),
    "glora": (lambda: [(f"{XL_K}.a1.weight", (2048, 4), "float32"), (f"{XL_K}.a2.weight", (4, 2048), "float32"),
                       (f"{XL_K}.b1.weight", (640, 4), "float32"), (f"{XL_K}.b2.weight", (4, 2048), "float32")], None, "lora", "glora",
              "stable-diffusion-xl-v1-base/lora"),
    "full-diff": (lambda: [(f"{XL_K}.diff", (640, 2048), "float16"), (f"{XL_K}.diff_b", (640,), "float16")], None, "lora", "full",
                  "stable-diffusion-xl-v1-base/lora"),
    "ti-diffusers": (lambda: [("<cat-toy>", (768,), "float32")], None, "embedding", "diffusers", "stable-diffusion-v1/textual-inversion"),
    "ti-sdxl": (lambda: [("clip_l", (4, 768), "float32"), ("clip_g", (4, 1280), "float32")], None, "embedding", "sdxl",
                "stable-diffusion-xl-v1-base/textual-inversion"),
    "ti-kohya-sd2": (lambda: [("emb_params", (6, 1024), "float32")], None, "embedding", "kohya", "stable-diffusion-v2/textual-inversion"),
    "ti-a1111-sd1": (lambda: [("string_to_param.*", (3, 768), "float32")], None, "embedding", "a1111", "stable-diffusion-v1/textual-inversion"),
    "hypernetwork": (H.hypernetwork_rows, None, "hypernetwork", "a1111", "stable-diffusion-v1/hypernetwork"),
    "controlnet-sd1": (lambda: H.controlnet_ldm(768), None, "controlnet", "ldm", "stable-diffusion-v1/controlnet"),
    "controlnet-bare-sd2": (lambda: H.rows_layout([(k[len("control_model."):], s, d) for k, s, d in H.controlnet_ldm(1024).tensors]),
                            None, "controlnet", "ldm", "stable-diffusion-v2/controlnet"),
    "controlnet-diffusers-sdxl": (H.controlnet_diffusers_sdxl, None, "controlnet", "diffusers", "stable-diffusion-xl-v1-base/controlnet"),
    "t2i-adapter": (H.t2i_adapter, None, "t2i-adapter", "tencent", "unknown/t2i-adapter"),
    "t2i-adapter-light": (lambda: [("conv_in.weight", (320, 192, 3, 3), "float32"), ("body.0.body.0.block1.weight", (320, 320, 3, 3), "float32")],
                          None, "t2i-adapter", "tencent", "unknown/t2i-adapter"),
    "vae-4ch": (lambda: H.layout("vae-sd-kl-f8"), None, "vae", "ldm", "sd-vae-kl-f8"),
    "vae-4ch-prefixed": (lambda: H.sub_prefix(H.layout("sd15-emaonly"), "first_stage_model.", "first_stage_model."), None, "vae", "ldm", "sd-vae-kl-f8"),
    "vae-16ch": (lambda: H.sub_prefix(H.layout("flux1-dev-aio"), "vae."), None, "vae", "ldm", "vae-kl-f8-16ch"),
    "vae-diffusers-4ch": (lambda: [("decoder.conv_in.weight", (512, 4, 3, 3), "float32"), ("decoder.up_blocks.0.resnets.0.conv1.weight", (512, 512, 3, 3), "float32"),
                                   ("encoder.down_blocks.0.resnets.0.conv1.weight", (128, 128, 3, 3), "float32")], None, "vae", "diffusers", "sd-vae-kl-f8"),
    "vae-diffusers-16ch": (lambda: [("decoder.conv_in.weight", (512, 16, 3, 3), "float32"), ("decoder.up_blocks.0.resnets.0.conv1.weight", (512, 512, 3, 3), "float32")],
                           None, "vae", "ldm", "vae-kl-f8-16ch"),
    "clip-l": (lambda: H.layout("clip-l-hf"), None, "text-encoder", "clip-l", "clip-l"),
    "clip-g-hf": (lambda: H.sub_prefix(H.layout("sd3-medium-incl-clips"), "text_encoders.clip_g.transformer."), None, "text-encoder", "clip-g", "clip-g"),
    "clip-h-hf": (lambda: H.map_dims(H.layout("clip-l-hf"), {768: 1024, 3072: 4096}), None, "text-encoder", "clip-h", "clip-h"),
    "clip-g-openclip": (lambda: H.sub_prefix(H.layout("sdxl-base"), "conditioner.embedders.1.model."), None, "text-encoder", "clip-g", "clip-g"),
    "clip-h-openclip": (lambda: H.sub_prefix(H.layout("sd21-768-v"), "cond_stage_model.model."), None, "text-encoder", "clip-h", "clip-h"),
    "t5-xxl": (lambda: H.sub_prefix(H.layout("flux1-dev-aio"), "text_encoders.t5xxl.transformer."), None, "text-encoder", "t5-xxl", "t5-xxl"),
    "t5-other": (lambda: H.map_dims(H.sub_prefix(H.layout("flux1-dev-aio"), "text_encoders.t5xxl.transformer."), {10240: 2816, 4096: 1024}),
                 None, "text-encoder", "t5", "t5"),
}


@pytest.mark.parametrize("case", sorted(ADJACENT_CASES))
def test_adjacent_row(tmp, case):
    builder, alpha, kind, subtype, arch = ADJACENT_CASES[case]
    rows = builder()
    path = tmp / f"{case}.safetensors"
    if alpha is not None:
        H.write_valued(path, rows, values=H.lora_alphas(rows, alpha))
    else:
        H.write_sparse(path, rows)
    ident = identify_path(path)
    assert (ident.kind, ident.implementation, ident.architecture) == (kind, subtype, arch)


def test_every_adjacent_row_has_a_case():
    tested = {(c[2], c[3]) for c in ADJACENT_CASES.values()}
    rows = {(r.kind, r.subtype) for r in ADJACENT}
    assert rows <= tested, f"adjacent rows without a test: {sorted(rows - tested)}"


@pytest.mark.parametrize("algo,rank,alpha,expected_algo", [("lora", 16, 8.0, "lora"), ("locon", 8, 4.0, "locon"), ("loha", 8, 1.0, "loha")])
def test_lora_rank_alpha(tmp, algo, rank, alpha, expected_algo):
    rows = H.kohya_lora("sd1", rank, algo)
    ident = identify_path(H.write_valued(tmp / "l.safetensors", rows, values=H.lora_alphas(rows, alpha)))
    a = ident.adapter
    assert a["algorithm"] == expected_algo
    assert a["rank"] == rank and a["ranks"] == [rank]
    assert a["alpha"] == alpha
    assert a["scale"] == round(alpha / rank, 4)
    assert a["targets"]["unet"] >= 3 and a["targets"]["text_encoder"] >= 1


def test_lora_base_from_kohya_metadata_and_ss_summary(tmp):
    rows = H.kohya_lora("sd1", 4)
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", "ss_network_dim": "4",
            "ss_network_alpha": "2", "ss_steps": "1200", "ss_sd_model_name": "base.safetensors", "ss_resolution": "(1024, 1024)",
            "ss_tag_frequency": '{"10_x": {"1girl": 12, " smile": 3}, "5_y": {"smile": 4}}'}
    ident = identify_path(H.write_sparse(tmp / "l.safetensors", rows, meta))
    # SD1 shapes (context width 768) with SDXL metadata: the shapes decide, the metadata is a conflict
    assert ident.architecture == "stable-diffusion-v1/lora" and ident.adapter["base_source"] == "shapes"
    assert ident.problem("lora_base_conflict").details["claimed"] == "stable-diffusion-xl-v1-base"
    sdxl = identify_path(H.write_sparse(tmp / "x.safetensors", H.kohya_lora("sdxl", 4), meta))
    assert sdxl.architecture == "stable-diffusion-xl-v1-base/lora" and sdxl.adapter["base_source"] == "kohya"
    assert sdxl.adapter["base_confidence"] == "high" and sdxl.problem("lora_base_conflict") is None
    training = ident.metadata["training"]
    assert training["ss_steps"] == "1200" and training["top_tags"][:2] == ["1girl", "smile"]


def test_embedding_vectors(tmp):
    ident = identify_path(H.write_sparse(tmp / "e.safetensors", [("clip_l", (8, 768), "float32"), ("clip_g", (8, 1280), "float32")]))
    assert ident.adapter["vectors"] == 8


def test_diffusers_folder(tmp):
    root = H.write_diffusers_folder(tmp / "pipe")
    ident = identify_path(root)
    assert ident.kind == "diffusers-pipeline" and ident.architecture == "stable-diffusion-v1"
    assert ident.components["unet"].model == "diffusion-model:stable-diffusion-v1"
    assert ident.components["vae"].model == "vae:sd-vae-kl-f8"
    assert ident.components["text_encoder"].model == "text-encoder:clip-l"
