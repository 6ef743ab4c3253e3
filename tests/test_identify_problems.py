"""What is wrong: each check, on files built from the real layouts."""
import numpy as np
import pytest

import helpers_identify as H
from sdtk.identify import identify_path

SD1_POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
XL_POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


def _codes(ident):
    return {p.code for p in ident.problems}


@pytest.mark.parametrize("layout_name,key", [("sd15-emaonly", SD1_POS), ("sdxl-base", XL_POS)])
def test_float_position_ids_name_the_damaged_positions(tmp, layout_name, key):
    path = H.write_sparse_with_values(tmp / "m.safetensors", H.layout(layout_name), {key: H.position_ids("float")})
    ident = identify_path(path)
    p = ident.problem("clip_position_ids_float")
    assert p is not None and p.severity == "error"
    assert p.details["key"] == key and p.details["dtype"] == "fp32"
    assert p.details["damaged_positions"] == list(H.FLOAT_DAMAGED)
    assert ident.has_problems
    assert "fix_clip" in {a.code for a in ident.advice}


def test_float_but_exact_position_ids_is_a_warning(tmp):
    path = H.write_sparse_with_values(tmp / "m.safetensors", H.layout("sd15-emaonly"), {SD1_POS: H.position_ids("float_exact")})
    p = identify_path(path).problem("clip_position_ids_float")
    assert p.severity == "warning" and p.details["damaged_positions"] == []


def test_shifted_position_ids(tmp):
    path = H.write_sparse_with_values(tmp / "m.safetensors", H.layout("sd15-emaonly"), {SD1_POS: H.position_ids("shifted")})
    p = identify_path(path).problem("clip_position_ids_shifted")
    assert p.severity == "error" and p.details["damaged_positions"] == list(range(40, 77))


def test_healthy_and_missing_position_ids_are_fine(tmp):
    ok = identify_path(H.write_sparse(tmp / "ok.safetensors", H.layout("sd15-emaonly")))
    assert not _codes(ok) & {"clip_position_ids_float", "clip_position_ids_shifted", "missing_keys"}
    none = identify_path(H.write_sparse(tmp / "none.safetensors", H.layout("sd15-emaonly").without(lambda k: k.endswith("position_ids"))))
    assert not none.problems and not none.missing_keys


def test_novelai_clip_key_names(tmp):
    lay = H.layout("sd15-emaonly").rename(lambda k: k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."))
    ident = identify_path(H.write_sparse(tmp / "nai.safetensors", lay))
    assert ident.architecture == "stable-diffusion-v1"
    p = ident.problem("clip_old_key_names")
    assert p and p.details["count"] == 197


def test_partial_sdxl_without_text_encoders_is_named_partial(tmp):
    lay = H.layout("sdxl-base").without(lambda k: k.startswith("conditioner."))
    ident = identify_path(H.write_sparse(tmp / "p.safetensors", lay))
    assert ident.kind == "checkpoint" and ident.architecture == "stable-diffusion-xl-v1-base"
    assert ident.partial and ident.missing_components == ["text_encoder", "text_encoder_2"]
    assert ident.problem("missing_components").severity == "warning"


def test_unet_only_is_a_diffusion_model_not_a_broken_checkpoint(tmp):
    lay = H.sub_prefix(H.layout("sdxl-base"), "model.diffusion_model.", "model.diffusion_model.")
    ident = identify_path(H.write_sparse(tmp / "u.safetensors", lay))
    assert ident.kind == "diffusion-model" and not ident.partial and not ident.has_problems
    assert "diffusion_model_only" in {a.code for a in ident.advice}


def test_missing_and_extra_keys_against_the_known_layout(tmp):
    gone = "model.diffusion_model.output_blocks.2.1.conv.weight"
    lay = H.layout("sd15-emaonly").without(lambda k: k == gone).plus([("model.diffusion_model.mystery.weight", (4,), "float32")])
    ident = identify_path(H.write_sparse(tmp / "m.safetensors", lay))
    assert ident.missing_keys["unet"] == ["output_blocks.2.1.conv.weight"]
    assert ident.extra_keys["unet"] == ["mystery.weight"]
    assert ident.problem("missing_keys").severity == "warning"


def test_training_leftovers(tmp):
    lay = H.layout("sd15-emaonly").plus([("embedding_manager.embedding_parameters.*", (1, 768), "float32"),
                                         ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", (4, 768), "float32")])
    ident = identify_path(H.write_sparse(tmp / "j.safetensors", lay))
    assert ident.architecture == "stable-diffusion-v1"
    p = ident.problem("training_leftovers")
    assert p and p.details["count"] == 2 and p.details["bytes"] == (768 + 4 * 768) * 4


def test_sd2_prediction_from_modelspec_names_768_v(tmp):
    ident = identify_path(H.write_sparse(tmp / "v.safetensors", H.layout("sd21-768-v"), {"modelspec.prediction_type": "v"}))
    assert ident.architecture == "stable-diffusion-v2-768-v"
    assert (ident.prediction_type, ident.prediction_confidence, ident.prediction_source) == ("v", "high", "modelspec")
    assert ident.problem("needs_config_yaml") is not None  # v-pred SD2 without a .yaml beside it


def test_sd2_yaml_beside_the_file(tmp):
    path = H.write_sparse(tmp / "model.safetensors", H.layout("sd21-768-v"))
    bare = identify_path(path)
    assert bare.prediction_type is None and bare.architecture == "stable-diffusion-v2"
    assert bare.problem("needs_config_yaml") is not None
    (tmp / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    ident = identify_path(path)
    assert ident.architecture == "stable-diffusion-v2-768-v" and ident.prediction_source == "config"
    assert ident.problem("needs_config_yaml") is None


def test_sd2_deep_heuristic_and_its_low_confidence(tmp):
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    rng = np.random.default_rng(0)
    lay = H.layout("sd21-768-v")
    # scaled-down copies (20 bias values) keep --deep fast; the heuristic only needs that one tensor
    path_v = H.write_valued(tmp / "v.safetensors", lay, values={key: (rng.standard_normal(20) * 0.2).astype(np.float32)}, scale=16)
    path_e = H.write_valued(tmp / "e.safetensors", lay, values={key: (rng.standard_normal(20) * 0.02).astype(np.float32)}, scale=16)
    assert identify_path(path_v).prediction_type is None  # header only: no guess
    v, e = identify_path(path_v, deep=True), identify_path(path_e, deep=True)
    assert (v.prediction_type, v.prediction_confidence, v.architecture) == ("v", "low", "stable-diffusion-v2-768-v")
    assert (e.prediction_type, e.prediction_confidence, e.architecture) == ("epsilon", "low", "stable-diffusion-v2-512")
    zeros = identify_path(H.write_valued(tmp / "z.safetensors", lay, scale=16), deep=True)
    assert zeros.prediction_type is None  # all-zero weights carry no evidence


def test_kohya_v_parameterization_metadata(tmp):
    ident = identify_path(H.write_sparse(tmp / "m.safetensors", H.layout("sd15-emaonly"), {"ss_v_parameterization": "True"}))
    assert (ident.prediction_type, ident.prediction_source, ident.variant) == ("v", "kohya", "v-prediction")
    assert ident.problem("needs_config_yaml") is not None


def test_deep_finds_nan_in_fp16(tmp):
    lay = H.layout("sd15-emaonly").with_dtype("float16")
    bad = np.zeros((320,), np.float16)
    bad[3], bad[7] = np.nan, np.inf
    path = H.write_valued(tmp / "n.safetensors", lay, values={"model.diffusion_model.input_blocks.0.0.bias": bad[:20]}, scale=16)
    assert identify_path(path).problem("non_finite_values") is None  # only when asked
    p = identify_path(path, deep=True).problem("non_finite_values")
    assert p.severity == "error" and p.details["values"] == 2 and p.details["tensors"] == 1


def test_deep_bf16_scan(tmp):
    import ml_dtypes

    bad = np.zeros((48,), ml_dtypes.bfloat16)
    bad[0] = np.nan
    path = H.write_valued(tmp / "f.safetensors", H.layout("flux1-schnell"), values={"model.diffusion_model.img_in.bias": bad}, scale=64)
    assert identify_path(path, deep=True).problem("non_finite_values").details["values"] == 1


def test_unknown_file_is_reported_with_its_contents(tmp):
    rows = [(f"encoder.layer.{i}.attention.self.query.weight", (1024, 1024), "float32") for i in range(24)] + [
        ("embeddings.word_embeddings.weight", (30522, 1024), "float32")]
    ident = identify_path(H.write_sparse(tmp / "bert.safetensors", rows))
    assert ident.kind == "unknown" and ident.architecture == "unknown"
    assert ident.parameters == 24 * 1024 * 1024 + 30522 * 1024
    summary = ident.unknown_summary
    assert {g["prefix"] for g in summary["prefixes"]} == {"encoder.layer.", "embeddings.word_embeddings."}
    assert summary["largest_tensors"][0] == {"key": "embeddings.word_embeddings.weight", "shape": [30522, 1024], "dtype": "fp32"}
    assert ident.problem("unidentified").severity == "warning"


def test_near_miss_is_not_a_confident_wrong_answer(tmp):
    """A UNet whose cross-attention width matches no family is unknown, not guessed as SD1."""
    lay = H.map_dims(H.layout("sd15-emaonly"), {768: 896})
    assert identify_path(H.write_sparse(tmp / "odd.safetensors", lay)).kind == "unknown"


def test_scaled_down_copy_is_named_with_a_warning(tmp):
    path = H.write_valued(tmp / "s.safetensors", H.layout("sd15-inpainting"), scale=16)
    ident = identify_path(path)
    assert (ident.architecture, ident.variant) == ("stable-diffusion-v1-inpainting", "inpainting")
    p = ident.problem("scaled_copy")
    assert p.severity == "warning" and p.details["scale"] == 16 and p.details["layout"] == "sd15-inpainting"


def test_precision_mixed_and_components(tmp):
    lay = H.layout("sd15-emaonly").rename(lambda k: k)
    lay = type(lay)(lay.name, lay.description, tuple((k, s, "float16" if k.startswith("model.") and d == "float32" else d) for k, s, d in lay.tensors))
    ident = identify_path(H.write_sparse(tmp / "m.safetensors", lay))
    assert ident.precision == "mixed fp16/fp32"
    assert ident.components["unet"].dtypes == {"fp16": 686}


def test_vae_reference_same_after_rounding_and_different(tmp):
    lay = H.layout("sd15-emaonly")
    vae_keys = [k for k, _, _ in lay.tensors if k.startswith("first_stage_model.")]
    from sdtk.samples import layout_plan

    plan = {t.name: t for t in layout_plan(lay, values="random", seed=3, scale=16)}
    values32 = {k: plan[k].read() for k in vae_keys}
    model = H.write_valued(tmp / "model.safetensors", lay, values={k: v.astype(np.float16) for k, v in values32.items()}, scale=16)
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.tensors import from_array

    write_safetensors(tmp / "vae.safetensors", [from_array(k[len("first_stage_model."):], v) for k, v in values32.items()])
    other = {k: v + np.float32(0.5) for k, v in values32.items()}
    write_safetensors(tmp / "other.safetensors", [from_array(k[len("first_stage_model."):], v) for k, v in other.items()])
    same = identify_path(model, vae_ref=str(tmp / "vae.safetensors")).vae_comparison
    assert same["verdict"] == "same-after-rounding" and same["compared"] == 248 and same["different"] == 0
    diff = identify_path(model, vae_ref=str(tmp / "other.safetensors")).vae_comparison
    assert diff["verdict"] == "different" and diff["different"] > 200
    exact = identify_path(tmp / "vae.safetensors", vae_ref=str(tmp / "vae.safetensors")).vae_comparison
    assert exact["verdict"] == "identical"


def test_modelspec_naming_another_family(tmp):
    ident = identify_path(H.write_sparse(tmp / "m.safetensors", H.layout("sd15-emaonly"), {"modelspec.architecture": "stable-diffusion-xl-v1-base"}))
    p = ident.problem("modelspec_mismatch")
    assert p.details == {"claimed": "stable-diffusion-xl-v1-base", "detected": "stable-diffusion-v1"}
    same = identify_path(H.write_sparse(tmp / "s.safetensors", H.layout("sd15-inpainting"), {"modelspec.architecture": "stable-diffusion-v1"}))
    assert same.problem("modelspec_mismatch") is None  # same family, variant spelled differently: fine
