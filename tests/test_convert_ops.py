"""convert's building blocks on scaled-down, random-valued files built from the real layouts."""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import torch_or_skip
from helpers_convert import read_all, write_layout, write_tensors
from sdtk.errors import SdtkError, UsageError
from sdtk.formats import open_model
from sdtk.ops.cast import cast_array
from sdtk.ops.clip_fix import fix_clip
from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options
from sdtk.ops.ema import ema_key_for
from sdtk.architectures.vae_keys import diffusers_to_ldm_key
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import dtype, from_array

NUMPY_TARGETS = {
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "fp8-e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8-e5m2": ml_dtypes.float8_e5m2,
}


@pytest.fixture(scope="module")
def sd15_full(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("sd15") / "sd15-full-ema.safetensors", "sd15-full-ema", scale=8,
                        metadata={"ss_note": "kept", "modelspec.title": "my title"})


@pytest.fixture(scope="module")
def sdxl_vpred(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("sdxl") / "noob-vpred.safetensors", "sdxl-vpred-ztsnr", scale=16)


def convert(path, out_dir: Path, **options):
    opts = resolve_options(ConvertOptions(source_hashes=options.pop("source_hashes", False), **options))
    conv, summary = convert_file(Path(path), opts, out_folder=out_dir)
    return conv, summary


# --- casting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(NUMPY_TARGETS))
def test_cast_equals_numpy_and_ml_dtypes(sd15_full, tmp_path, target):
    # fp8 casts the VAE and text encoders only when asked (--vae-dtype/--te-dtype): asked here
    fp8_parts = {"vae_dtype": target, "te_dtype": target} if target.startswith("fp8") else {}
    _, summary = convert(sd15_full, tmp_path, dtype=target, **fp8_parts)
    out = read_all(Path(summary["outputs"][0]["path"]))
    with open_model(sd15_full) as src:
        assert list(out) == list(src.tensors)  # order and names kept, nothing dropped without --prune
        for name, t in src.tensors.items():
            values = t.read()
            if not t.dtype.is_float or name.endswith("position_ids"):
                assert out[name].dtype == values.dtype and out[name].tobytes() == values.tobytes(), name
            else:
                expected = values.astype(NUMPY_TARGETS[target])
                assert out[name].dtype == expected.dtype, name
                assert out[name].tobytes() == expected.tobytes(), name


@pytest.mark.torch
@pytest.mark.parametrize("target", ["fp16", "bf16", "fp8-e4m3fn", "fp8-e5m2"])
def test_cast_equals_torch(target):
    torch = torch_or_skip()
    rng = np.random.default_rng(1)
    # normal values, tiny values (subnormals of the target), ties and values near each type's max
    values = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 0.05,
                             rng.standard_normal(2000).astype(np.float32) * 1e-6,
                             np.float32([0.5, 1.5, 2.5, -0.0, 65504, -65504, 448, 57344, 1e-8, 3e-5])])
    values = np.concatenate([values, np.float32([1e6, -1e6, np.inf, -np.inf, 480.0, 464.0])])  # out of range
    ours, _ = cast_array(values, dtype(target))
    theirs = torch.from_numpy(values).to(getattr(torch, dtype(target).torch_name))
    assert ours.view(np.uint8).tobytes() == theirs.view(torch.uint8).numpy().tobytes()
    nan = np.float32([np.nan, -np.nan])  # NaN stays NaN (the NaN bit pattern is each library's own)
    assert np.isnan(cast_array(nan, dtype(target))[0].astype(np.float32)).all()


def test_fp16_overflow_is_counted():
    arr = np.float32([1.0, 70000.0, -1e6, np.inf, np.nan, 3.0])
    out, overflow = cast_array(arr, dtype("fp16"))
    assert overflow == 2  # inf and nan were not finite to begin with
    assert np.isinf(out[1]) and np.isinf(out[2])
    _, overflow_bf16 = cast_array(arr, dtype("bf16"))
    assert overflow_bf16 == 0  # bf16 has fp32's range
    out_e4m3, overflow_e4m3 = cast_array(arr, dtype("fp8-e4m3fn"))
    assert overflow_e4m3 == 2  # e4m3fn has no inf: clipped to +-448 (as torch does), counted too
    assert out_e4m3.astype(np.float32)[[1, 2, 3]].tolist() == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("target,expected", [("fp16", 4), ("bf16", 0), ("fp8-e5m2", 4), ("fp8-e4m3fn", 5)])
def test_overflow_counted_across_chunks(target, expected):
    """A tensor larger than one cast chunk (cast by several threads): every overflow is counted
    and the values equal one whole-array cast."""
    from sdtk.ops.cast import CHUNK_ELEMENTS

    values = np.random.default_rng(3).standard_normal(3 * CHUNK_ELEMENTS + 17).astype(np.float32)
    values[[5, CHUNK_ELEMENTS + 1, 2 * CHUNK_ELEMENTS + 2, 3 * CHUNK_ELEMENTS + 16]] = [7e4, -1e5, 3e38, -9e4]
    values[CHUNK_ELEMENTS * 2 + 9] = 500.0  # beyond e4m3fn's 448 only
    out, overflow = cast_array(values, dtype(target))
    assert overflow == expected
    want = np.clip(values, -448, 448) if target == "fp8-e4m3fn" else values
    with np.errstate(over="ignore"):
        assert out.tobytes() == want.astype(NUMPY_TARGETS[target]).tobytes()


def test_fp16_overflow_refused_then_allowed(tmp_path):
    src = write_tensors(tmp_path / "hot.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": np.float32([[1.0, 1e5], [2.0, 3.0]]),
        "model.diffusion_model.out.2.bias": np.float32([0.5, 0.25]),
    })
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SdtkError, match="bf16"):
        convert(src, out_dir, dtype="fp16")
    assert list(out_dir.iterdir()) == []  # nothing left behind
    _, summary = convert(src, out_dir, dtype="fp16", allow_overflow=True)
    assert summary["overflow"] == {"model.diffusion_model.input_blocks.0.0.weight": 1}
    _, summary = convert(src, out_dir, dtype="bf16")
    assert summary["overflow"] == {}


def test_per_component_dtypes(sd15_full, tmp_path):
    _, summary = convert(sd15_full, tmp_path, dtype="fp16", vae_dtype="fp32", te_dtype="bf16", ema="drop")
    with open_model(summary["outputs"][0]["path"]) as cat:
        kinds = {}
        for name, t in cat.tensors.items():
            part = name.split(".")[0]
            kinds.setdefault(part, set()).add(t.dtype.short)
    assert kinds["model"] == {"fp16"}
    assert kinds["first_stage_model"] == {"fp32"}
    assert kinds["cond_stage_model"] == {"bf16", "int64"}  # position_ids stay int64
    assert kinds["alphas_cumprod"] == {"fp16"}


# --- EMA -----------------------------------------------------------------------------------------


def test_ema_key_mapping_matches_litema_names():
    assert ema_key_for("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    layout = load_layout("sd15-full-ema")
    names = {k for k, _, _ in layout.tensors}
    unet = [k for k in names if k.startswith("model.diffusion_model.")]
    assert all(ema_key_for(k) in names for k in unet)  # every UNet key of the real file has its EMA copy


def test_ema_use_yields_the_ema_values(sd15_full, tmp_path):
    _, summary = convert(sd15_full, tmp_path, ema="use")
    out = read_all(Path(summary["outputs"][0]["path"]))
    assert not any(k.startswith("model_ema.") for k in out)
    with open_model(sd15_full) as src:
        unet = [k for k in src.tensors if k.startswith("model.diffusion_model.")]
        assert len(unet) == 686
        for k in unet:
            ema = src.tensors[ema_key_for(k)].read()
            assert out[k].tobytes() == ema.tobytes(), k
            assert out[k].tobytes() != src.tensors[k].read().tobytes()  # really the other weight set
        # everything else untouched
        assert out["first_stage_model.decoder.conv_in.weight"].tobytes() == src.tensors["first_stage_model.decoder.conv_in.weight"].read().tobytes()
    assert summary["weight_set"] == "ema"


def test_ema_drop_keeps_model_weights(sd15_full, tmp_path):
    _, summary = convert(sd15_full, tmp_path, ema="drop")
    out = read_all(Path(summary["outputs"][0]["path"]))
    assert len(out) == 1831 - 688
    with open_model(sd15_full) as src:
        k = "model.diffusion_model.out.2.weight"
        assert out[k].tobytes() == src.tensors[k].read().tobytes()


def test_ema_use_without_ema_fails_clearly(tmp_path):
    src = write_layout(tmp_path / "emaonly.safetensors", "sd15-emaonly", scale=16)
    with pytest.raises(SdtkError, match="no EMA weights"):
        convert(src, tmp_path, ema="use")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emaonly.safetensors"]


# --- prune ---------------------------------------------------------------------------------------


def test_prune_keeps_markers_and_reports_dropped(sdxl_vpred, tmp_path):
    layout = load_layout("sdxl-vpred-ztsnr").plus([
        ("embedding_manager.embedder.weight", (4, 4), "float32"),
        ("some_tool.private_state", (3,), "float32"),
    ])
    src = write_layout(tmp_path / "vpred-junk.safetensors", layout, scale=16)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _, summary = convert(src, out_dir, prune=True, dtype="fp16")
    out = read_all(Path(summary["outputs"][0]["path"]))
    assert "v_pred" in out and "ztsnr" in out
    assert out["v_pred"].dtype == np.float16 and out["v_pred"].shape == (0,)
    dropped = {d["key"]: d["reason"] for d in summary["dropped"]}
    assert set(dropped) == {"embedding_manager.embedder.weight", "some_tool.private_state"}
    assert "unknown" in dropped["some_tool.private_state"]
    assert len(out) == 2517
    _, kept = convert(src, out_dir, prune=True, keep_unknown=True)
    assert "some_tool.private_state" in read_all(Path(kept["outputs"][0]["path"]))


def test_prune_drops_ema_unless_kept(sd15_full, tmp_path):
    _, summary = convert(sd15_full, tmp_path, prune=True)
    assert summary["weight_set"] == "non-ema"  # --prune drops the EMA copy unless it is kept
    assert len(read_all(Path(summary["outputs"][0]["path"]))) == 1143
    _, kept = convert(sd15_full, tmp_path, prune=True, ema="keep")
    assert kept["weight_set"] == "both" and len(read_all(Path(kept["outputs"][0]["path"]))) == 1831


def test_prune_drops_stray_ema_bookkeeping(tmp_path):
    """A single-weight file that still carries model_ema.decay/num_updates: pruned away."""
    layout = load_layout("sd15-emaonly").plus([("model_ema.decay", (), "float32"), ("model_ema.num_updates", (), "int32")])
    src = write_layout(tmp_path / "m.safetensors", layout, scale=16)
    _, summary = convert(src, tmp_path, prune=True)
    assert {d["key"] for d in summary["dropped"]} == {"model_ema.decay", "model_ema.num_updates"}
    assert summary["weight_set"] is None


# --- CLIP fixes ----------------------------------------------------------------------------------


def test_fix_clip_resets_damaged_position_ids_and_renames_novelai_keys():
    plan = [
        from_array("cond_stage_model.transformer.embeddings.position_ids", np.float32([np.arange(77) * 0.9999])),
        from_array("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.bias", np.ones(4, np.float32)),
        from_array("cond_stage_model.transformer.final_layer_norm.weight", np.ones(4, np.float32)),
        from_array("model.diffusion_model.out.2.bias", np.ones(4, np.float32)),
    ]
    result = fix_clip(plan)
    names = [t.name for t in result.plan]
    assert names == [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "model.diffusion_model.out.2.bias",
    ]
    ids = result.plan[0].read()
    assert ids.dtype == np.int64 and ids.shape == (1, 77) and (ids[0] == np.arange(77)).all()
    assert result.were_broken == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]


def test_position_ids_never_cast_to_half(sdxl_vpred, tmp_path):
    _, summary = convert(sdxl_vpred, tmp_path, dtype="fp8-e4m3fn")
    out = read_all(Path(summary["outputs"][0]["path"]))
    ids = out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == np.int64 and (ids[0] == np.arange(ids.shape[-1])).all()


# --- VAE -----------------------------------------------------------------------------------------

# Hand-written pairs (diffusers AutoencoderKL name -> LDM name), as in diffusers'
# convert_diffusers_to_original_stable_diffusion.py; independent of the rule table under test.
DIFFUSERS_PAIRS = [
    ("encoder.conv_in.weight", "encoder.conv_in.weight"),
    ("encoder.down_blocks.0.resnets.1.conv2.weight", "encoder.down.0.block.1.conv2.weight"),
    ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
    ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
    ("encoder.mid_block.resnets.0.norm1.weight", "encoder.mid.block_1.norm1.weight"),
    ("encoder.mid_block.resnets.1.conv1.bias", "encoder.mid.block_2.conv1.bias"),
    ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"),
    ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight"),
    ("encoder.mid_block.attentions.0.key.bias", "encoder.mid.attn_1.k.bias"),
    ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"),
    ("decoder.mid_block.attentions.0.proj_attn.bias", "decoder.mid.attn_1.proj_out.bias"),
    ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
    ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
    ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
    ("decoder.up_blocks.3.resnets.0.conv_shortcut.bias", "decoder.up.0.block.0.nin_shortcut.bias"),
    ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
    ("post_quant_conv.weight", "post_quant_conv.weight"),
]


@pytest.mark.parametrize("diffusers,ldm", DIFFUSERS_PAIRS)
def test_diffusers_vae_names_map_to_ldm(diffusers, ldm):
    assert diffusers_to_ldm_key(diffusers, up_blocks=4) == ldm


def test_bake_vae_under_first_stage_model(sd15_full, tmp_path):
    vae = write_layout(tmp_path / "vae-ft-mse.safetensors", "vae-sd-kl-f8", scale=8, seed=7)
    _, summary = convert(sd15_full, tmp_path, bake_vae=str(vae), ema="drop")
    out = read_all(Path(summary["outputs"][0]["path"]))
    with open_model(vae) as v:
        for name, t in v.tensors.items():
            assert out["first_stage_model." + name].tobytes() == t.read().tobytes()
    assert len(out) == 1143


def test_bake_diffusers_vae(sd15_full, tmp_path):
    """A VAE saved by diffusers (renamed keys, attention as Linear) ends up as the LDM tensors."""
    from sdtk.architectures.vae_keys import is_diffusers_vae

    ldm = {t.name: t.read() for t in layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=8, seed=3)}
    to_diffusers = _ldm_to_diffusers_names(list(ldm))
    diff = {}
    for k, v in ldm.items():
        dk = to_diffusers[k]
        diff[dk] = v.reshape(v.shape[:2]) if dk.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")) else v
    vae = write_tensors(tmp_path / "diffusion_pytorch_model.safetensors", diff)
    with open_model(vae) as cat:
        assert is_diffusers_vae(cat.tensors)
    _, summary = convert(sd15_full, tmp_path, bake_vae=str(vae), ema="drop")
    out = read_all(Path(summary["outputs"][0]["path"]))
    for k, v in ldm.items():
        assert out["first_stage_model." + k].shape == v.shape
        assert out["first_stage_model." + k].tobytes() == v.tobytes(), k


def _ldm_to_diffusers_names(ldm_names):
    """diffusers names for the LDM kl-f8 VAE, written out independently of sdtk's rule table."""
    import re

    out = {}
    for name in ldm_names:
        d = name
        d = re.sub(r"^encoder\.down\.(\d)\.block\.(\d)\.", r"encoder.down_blocks.\1.resnets.\2.", d)
        d = re.sub(r"^encoder\.down\.(\d)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", d)
        d = re.sub(r"^decoder\.up\.(\d)\.block\.(\d)\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.resnets.{m[2]}.", d)
        d = re.sub(r"^decoder\.up\.(\d)\.upsample\.", lambda m: f"decoder.up_blocks.{3 - int(m[1])}.upsamplers.0.", d)
        d = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", d)
        d = d.replace(".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm.")
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            d = d.replace(f".mid.attn_1.{a}.", f".mid_block.attentions.0.{b}.")
        d = d.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        out[name] = d
    return out


def test_bake_vae_into_flux_all_in_one_goes_under_vae_prefix(tmp_path):
    aio = write_layout(tmp_path / "flux-aio.safetensors", "flux1-dev-aio", scale=64)
    vae_layout = load_layout("flux1-dev-aio").without(lambda k: not k.startswith("vae.")).rename(lambda k: k[len("vae."):])
    vae = write_layout(tmp_path / "ae.safetensors", vae_layout, scale=64, seed=5)
    _, summary = convert(aio, tmp_path, bake_vae=str(vae))
    out = read_all(Path(summary["outputs"][0]["path"]))
    assert not any(k.startswith("first_stage_model.") for k in out)
    with open_model(vae) as v:
        for name, t in v.tensors.items():
            assert out["vae." + name].tobytes() == t.read().tobytes()


def test_bake_vae_into_sd3_all_in_one_replaces_its_vae_where_it_is(tmp_path):
    """ComfyUI's SD3 all-in-one file keeps its 16-channel VAE under first_stage_model.: the baked
    VAE replaces it there; a 4-channel SD VAE is refused."""
    sd3 = write_layout(tmp_path / "sd3.safetensors", "sd3-medium-incl-clips", scale=64)
    vae_layout = load_layout("sd3-medium-incl-clips").without(lambda k: not k.startswith("first_stage_model.")).rename(
        lambda k: k[len("first_stage_model."):])
    vae = write_layout(tmp_path / "sd3-vae.safetensors", vae_layout, scale=64, seed=9)
    _, summary = convert(sd3, tmp_path, bake_vae=str(vae))
    out = read_all(Path(summary["outputs"][0]["path"]))
    with open_model(vae) as v:
        assert all(out["first_stage_model." + n].tobytes() == t.read().tobytes() for n, t in v.tensors.items())
    sd_vae = write_layout(tmp_path / "sd-vae.safetensors", "vae-sd-kl-f8", scale=64)
    with pytest.raises(SdtkError, match="latent channels|does not match"):
        convert(sd3, tmp_path, bake_vae=str(sd_vae))


def test_bake_vae_of_wrong_architecture_refused(tmp_path):
    model = write_layout(tmp_path / "sd15.safetensors", "sd15-emaonly", scale=16)
    vae_layout = load_layout("flux1-dev-aio").without(lambda k: not k.startswith("vae.")).rename(lambda k: k[len("vae."):])
    flux_vae = write_layout(tmp_path / "flux-ae.safetensors", vae_layout, scale=16)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SdtkError, match="does not match|wrong architecture|latent channels"):
        convert(model, out_dir, bake_vae=str(flux_vae))
    not_a_vae = write_layout(tmp_path / "clip.safetensors", "clip-l-hf", scale=16)
    with pytest.raises(SdtkError, match="not a VAE"):
        convert(model, out_dir, bake_vae=str(not_a_vae))
    assert list(out_dir.iterdir()) == []


def test_bake_full_size_vae_checked_against_reference_when_model_has_none(tmp_path):
    """A UNet+CLIP file without a VAE: the (full-size) VAE is checked against the real kl-f8 layout;
    a VAE with one tensor of the wrong shape is refused."""
    from sdtk.samples import write_sparse_safetensors

    layout = load_layout("sd15-emaonly").without(lambda k: k.startswith("first_stage_model."))
    model = write_layout(tmp_path / "novae.safetensors", layout, scale=16)
    bad = tmp_path / "bad-vae.safetensors"
    write_sparse_safetensors(bad, load_layout("vae-sd-kl-f8").rename(lambda k: k).without(
        lambda k: k == "decoder.conv_out.bias").plus([("decoder.conv_out.bias", (4,), "float32")]))
    with pytest.raises(SdtkError, match="decoder.conv_out.bias"):
        convert(model, tmp_path, bake_vae=str(bad))
    vae = tmp_path / "vae.safetensors"
    write_sparse_safetensors(vae, load_layout("vae-sd-kl-f8"))
    _, summary = convert(model, tmp_path, bake_vae=str(vae))
    with open_model(summary["outputs"][0]["path"]) as cat:
        assert sum(1 for k in cat.tensors if k.startswith("first_stage_model.")) == 248
    Path(summary["outputs"][0]["path"]).unlink()


# --- extract / replace ----------------------------------------------------------------------------


def test_extract_parts_in_loadable_layouts(sd15_full, tmp_path):
    _, summary = convert(sd15_full, tmp_path, extract=["vae,unet", "text-encoders"], dtype="fp16")
    outs = {o["part"]: Path(o["path"]) for o in summary["outputs"]}
    assert set(outs) == {"vae", "unet", "clip-l"}
    vae = read_all(outs["vae"])
    assert set(vae) == {k for k, _, _ in load_layout("vae-sd-kl-f8").tensors}  # bare LDM names, as vae files ship
    clip = read_all(outs["clip-l"])
    assert set(clip) == {k for k, _, _ in load_layout("clip-l-hf").tensors}  # HF layout text_model.*
    unet = read_all(outs["unet"])
    assert len(unet) == 686 and "input_blocks.0.0.weight" in unet
    with open_model(sd15_full) as src:
        assert unet["out.2.bias"].tobytes() == src.tensors["model.diffusion_model.out.2.bias"].read().astype(np.float16).tobytes()


def test_extract_missing_part_refused(tmp_path):
    flux = write_layout(tmp_path / "flux.safetensors", "flux1-schnell", scale=64)
    with pytest.raises(UsageError, match="no vae"):
        convert(flux, tmp_path, extract=["vae"])


def test_replace_unet_from_other_file(sd15_full, tmp_path):
    donor = write_layout(tmp_path / "other.safetensors", "sd15-emaonly", scale=8, seed=42)
    _, summary = convert(sd15_full, tmp_path, replace=[f"unet={donor}"], ema="drop")
    out = read_all(Path(summary["outputs"][0]["path"]))
    with open_model(donor) as d, open_model(sd15_full) as src:
        k = "model.diffusion_model.middle_block.1.proj_in.weight"
        assert out[k].tobytes() == d.tensors[k].read().tobytes()
        v = "first_stage_model.decoder.conv_out.weight"
        assert out[v].tobytes() == src.tensors[v].read().tobytes()
    sd2 = write_layout(tmp_path / "sd2.safetensors", "sd21-768-v", scale=8)
    with pytest.raises(SdtkError, match="lacks|shape"):
        convert(sd15_full, tmp_path, replace=[f"clip-l={sd2}"])


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,match", [
    (dict(preset="training", ema="drop"), "conflicts"),
    (dict(preset="training", prune=True), "conflicts"),
    (dict(preset="generation", ema="keep"), "conflicts"),
    (dict(keep_unknown=True), "--prune"),
    (dict(bake_vae="a.safetensors", replace=["vae=b.safetensors"]), "give one"),
    (dict(dtype="fp12"), "choose one of"),
    (dict(ema="maybe"), "keep, drop or use"),
    (dict(extract=["tail"]), "unknown part"),
    (dict(replace=["unet"]), "COMPONENT=FILE"),
    (dict(replace_input=True, extract=["vae"]), "--replace-input"),
])
def test_conflicting_options_refused(options, match):
    with pytest.raises(UsageError, match=match):
        resolve_options(ConvertOptions(**options))


def test_presets():
    gen = resolve_options(ConvertOptions(preset="generation"))
    assert (gen.dtype, gen.prune, gen.fix_clip, gen.ema) == ("fp16", True, True, None)
    assert resolve_options(ConvertOptions(preset="generation", dtype="bf16")).dtype == "bf16"
    train = resolve_options(ConvertOptions(preset="training"))
    assert (train.dtype, train.ema, train.prune) == ("fp32", "keep", False)


@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("fast", [True, False], ids=["C", "numpy"])
def test_e4m3fn_beyond_range_is_bit_identical_to_torch(source, fast, monkeypatch):
    """torch's `.to(float8_e4m3fn)` clamps everything beyond +-448 (inf included) to +-448; our C
    path and the numpy fallback give the same bits and count the finite values clamped (NaN:
    NaN in both; torch's NaN sign from bfloat16 is not a value, so only NaN-ness is compared)."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    from sdtk import fastcast

    if not fast:
        monkeypatch.setenv("SDTK_FASTCAST", "off")
    elif fastcast.status() != "F16C":
        pytest.skip("the C path needs the built extension on an F16C CPU")
    np_src = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[source]
    if source == "float32":
        rng = np.random.default_rng(7)
        mags = np.concatenate([np.linspace(440, 500, 4001), 10 ** rng.uniform(2.6, 38, 2000), [3.4e38, np.inf]])
        values = np.concatenate([mags, -mags, rng.standard_normal(1000) * 100, [np.nan, 0.0, -0.0]]).astype(np.float32)
    else:  # every 16-bit pattern
        values = np.arange(1 << 16, dtype=np.uint16).view(np_src)
    ours, clamped = cast_array(values, dtype("fp8-e4m3fn"))
    theirs = torch.from_numpy(values.view(np.uint16 if source != "float32" else np.float32).copy())
    if source != "float32":
        theirs = theirs.view(torch.float16 if source == "float16" else torch.bfloat16)
    theirs = theirs.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    ours_bits = ours.view(np.uint8)
    wide = values.astype(np.float32)
    nan = np.isnan(wide)
    assert np.array_equal(ours_bits[~nan], theirs[~nan])
    assert np.isnan(ours[nan].astype(np.float32)).all() and ((theirs[nan] & 0x7F) == 0x7F).all()
    assert clamped == int(np.count_nonzero(np.isfinite(wide) & (np.abs(wide) > 448))) > 0
