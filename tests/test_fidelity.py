"""What sdtk writes about a model is true (issue 17): prediction type and its evidence, the A1111
yaml beside inputs and outputs, ModelSpec of high confidence only, merge = convert, the SD2
value check, all-or-nothing multi-part outputs, A1111's AutoV3, placement advice, LoRA ModelSpec,
the output hash, EMA extraction, fp8 wording and defaults. Files are scaled-down or sparse copies
of the shared real layouts."""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import helpers_identify as H
from conftest import run_cli
from helpers_convert import files_in, metadata_of, planned_outputs, read_all, write_layout
from sdtk.errors import OutputError
from sdtk.identify import identify_path
from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options
from sdtk.ops.sidecar import config_text

NORM_BIAS = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD_EPS_LDM_YAML = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"
SDXL_EPS_YAML = ("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n    denoiser_config:\n"
                 "      params:\n        scaling_config:\n          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling\n")


def convert(src: Path, **options):
    options.setdefault("source_hashes", False)
    return convert_file(Path(src), resolve_options(ConvertOptions(**options)))


def said(ident):
    """What inspect says of a model: architecture, variant, prediction type and confidence."""
    return (ident.architecture, ident.variant, ident.prediction_type, ident.prediction_confidence)


def lineage_facts(path: Path) -> dict:
    return json.loads(metadata_of(path)["sdtk.lineage"])[-1].get("facts", {})


# --- 1. convert reads the <model>.yaml beside its input --------------------------------------------


def test_sd15_vpred_with_its_yaml_stays_v_prediction(tmp_path):
    src = write_layout(tmp_path / "sd15-v.safetensors", "sd15-emaonly", scale=16)
    yaml_in = config_text("v1-inference-v.yaml")
    (tmp_path / "sd15-v.yaml").write_text(yaml_in)
    before = identify_path(src)
    assert said(before)[1:] == ("v-prediction", "v", "high") and before.prediction_source == "config"
    conv, summary = convert(src, dtype="fp16")
    out = conv.outputs[0].dest
    meta = metadata_of(out)
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    # the input's own yaml travels with the output (A1111 reads it first), byte for byte
    assert out.with_suffix(".yaml").read_text() == yaml_in and "copied sd15-v.yaml" in summary["sidecar"]
    assert said(identify_path(out)) == said(before)
    (tmp_path / "sd15-v.yaml").unlink()
    out.with_suffix(".yaml").unlink()
    # the output alone (no yaml) still says v, from its ModelSpec
    again = identify_path(out)
    assert said(again) == said(before) and again.prediction_source == "modelspec"


def test_sd2_768v_with_its_yaml_is_named_768v(tmp_path):
    src = write_layout(tmp_path / "v2-768.safetensors", "sd21-768-v", scale=8)
    (tmp_path / "v2-768.yaml").write_text(config_text("v2-inference-v.yaml"))
    before = identify_path(src)
    conv, _ = convert(src, dtype="fp16")
    out = conv.outputs[0].dest
    meta = metadata_of(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v" and meta["modelspec.prediction_type"] == "v"
    assert yaml.safe_load(out.with_suffix(".yaml").read_text())["model"]["params"]["parameterization"] == "v"
    assert said(identify_path(out)) == said(before) == ("stable-diffusion-v2-768-v", None, "v", "high")


def test_sd2_unknown_prediction_is_never_labelled_512(tmp_path):
    src = write_layout(tmp_path / "sd2.safetensors", "sd21-768-v", scale=8)
    before = identify_path(src)
    assert said(before) == ("stable-diffusion-v2", None, None, "none")
    conv, summary = convert(src, dtype="fp16")
    out = conv.outputs[0].dest
    meta = metadata_of(out)
    assert not any(k.startswith("modelspec.") for k in meta)  # no architecture id states a prediction type
    assert summary["prediction_type"] is None and not out.with_suffix(".yaml").exists()
    assert lineage_facts(out) == {"architecture": "stable-diffusion-v2", "prediction_type": None, "confidence": "none",
                                  "source": "unknown"}
    assert said(identify_path(out)) == said(before)


def test_an_input_labelled_512_whose_yaml_says_v_is_corrected(tmp_path):
    src = write_layout(tmp_path / "m.safetensors", "sd21-768-v", scale=8,
                       metadata={"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-512"})
    (tmp_path / "m.yaml").write_text(config_text("v2-inference-v.yaml"))
    conv, _ = convert(src, dtype="bf16")
    meta = metadata_of(conv.outputs[0].dest)
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == ("stable-diffusion-v2-768-v", "v")


# --- 3. guesses are written nowhere; merge writes what convert writes -------------------------------


def test_family_default_is_not_modelspec_and_merge_agrees_with_convert(tmp_path, cli):
    a = write_layout(tmp_path / "a.safetensors", "sd15-emaonly", scale=16, seed=1)
    b = write_layout(tmp_path / "b.safetensors", "sd15-emaonly", scale=16, seed=2)
    conv, _ = convert(a, dtype="fp16")
    converted = metadata_of(conv.outputs[0].dest)
    assert "modelspec.prediction_type" not in converted
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", "--no-hash")
    assert r.returncode == 0, r.stderr
    merged = metadata_of(tmp_path / "m.safetensors")
    assert "modelspec.prediction_type" not in merged
    assert merged["modelspec.architecture"] == converted["modelspec.architecture"] == "stable-diffusion-v1"
    assert json.loads(merged["sdtk.model_facts"])["confidence"] == "medium"
    assert said(identify_path(tmp_path / "m.safetensors")) == said(identify_path(a))
    # both inputs v-prediction for sure (their yamls): the merge records v and gets its yaml, like convert
    for p in (a, b):
        p.with_suffix(".yaml").write_text(config_text("v1-inference-v.yaml"))
    r = cli("merge", a, b, "-o", tmp_path / "mv.safetensors", "--no-hash", "--json")
    assert r.returncode == 0, r.stderr
    assert metadata_of(tmp_path / "mv.safetensors")["modelspec.prediction_type"] == "v"
    assert json.loads(r.stdout)["sidecar"] == str(tmp_path / "mv.yaml")
    conv, _ = convert(a, dtype="fp16", overwrite=True)
    assert metadata_of(conv.outputs[0].dest)["modelspec.prediction_type"] == "v"
    # one input v, the other unknown: a merge is v only as a guess
    b.with_suffix(".yaml").unlink()
    r = cli("merge", a, b, "-o", tmp_path / "mx.safetensors", "--no-hash")
    assert r.returncode == 0, r.stderr
    assert "modelspec.prediction_type" not in metadata_of(tmp_path / "mx.safetensors")
    assert not (tmp_path / "mx.yaml").exists()


# --- the SD2 value check: random-valued files on each side of ComfyUI's rule ------------------------


def _bias_with_std(std: float, n: int = 20, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(n)
    v = (v - v.mean()) / v.std() * std  # exactly this (population) standard deviation
    return v.astype(np.float32)


@pytest.mark.parametrize("std,expected", [(0.0935, "v"), (0.0865, "epsilon"), (0.3, "v"), (0.01, "epsilon")])
def test_sd2_value_check_each_side_of_the_rule(tmp_path, std, expected):
    lay = H.layout("sd21-768-v")
    path = H.write_valued(tmp_path / "sd2.safetensors", lay, values={NORM_BIAS: _bias_with_std(std)}, scale=16, random=True)
    assert identify_path(path).prediction_type is None  # header only: no guess
    deep = identify_path(path, deep=True)
    assert (deep.prediction_type, deep.prediction_confidence, deep.prediction_source) == (expected, "low", "heuristic")
    # convert: the check's answer is recorded only when asked (--prediction-type auto), saying its confidence
    conv, summary = convert(path, dtype="fp16")
    assert "modelspec.prediction_type" not in metadata_of(conv.outputs[0].dest)
    conv, summary = convert(path, dtype="bf16", prediction_type="auto")
    out = conv.outputs[0].dest
    assert metadata_of(out)["modelspec.prediction_type"] == expected
    assert any("value check" in n and "low confidence" in n for n in summary["notes"])
    assert out.with_suffix(".yaml").exists() == (expected == "v")


def test_value_check_without_information_decides_nothing(tmp_path):
    path = H.write_valued(tmp_path / "z.safetensors", H.layout("sd21-768-v"), scale=16)  # zeros
    conv, summary = convert(path, prediction_type="auto", dtype="fp16")
    assert summary["prediction_type"] is None and not any(k.startswith("modelspec.") for k in metadata_of(conv.outputs[0].dest))


# --- bad input: the yaml beside the file ------------------------------------------------------------


def test_yaml_contradicting_the_marker_is_reported_and_the_marker_wins(tmp_path):
    src = write_layout(tmp_path / "xl.safetensors", "sdxl-vpred-ztsnr", scale=16)
    (tmp_path / "xl.yaml").write_text(SDXL_EPS_YAML)
    ident = identify_path(src)
    assert (ident.prediction_type, ident.prediction_source) == ("v", "marker")
    p = ident.problem("prediction_conflict")
    assert p and p.severity == "warning" and (p.details["loser"], p.details["loser_source"]) == ("epsilon", "config")
    conv, summary = convert(src, dtype="fp16")
    assert any("followed marker" in n for n in summary["notes"])
    written = yaml.safe_load(conv.outputs[0].sidecar.read_text())  # the right config, not the input's
    assert written["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"].endswith("VScaling")
    r = run_cli("inspect", src)
    assert r.returncode == 1 and "sdtk follows the stronger evidence (marker" in r.stdout


def test_yaml_of_another_family_is_reported_and_ignored(tmp_path):
    src = write_layout(tmp_path / "sd1.safetensors", "sd15-emaonly", scale=16)
    (tmp_path / "sd1.yaml").write_text(config_text("v2-inference-v.yaml"))  # an SD2 config beside SD1 weights
    ident = identify_path(src)
    p = ident.problem("config_mismatch")
    assert p and (p.details["config_family"], p.details["family"]) == ("sd2", "sd1")
    conv, summary = convert(src, dtype="fp16")
    assert not conv.outputs[0].dest.with_suffix(".yaml").exists()
    assert any("describes a sd2 model" in n for n in summary["notes"])


@pytest.mark.parametrize("content", [b"model:\n  params: [unclosed\n", b"\xff\xfe\x00binary", b"just text\n"])
def test_unreadable_yaml_is_reported_and_ignored(tmp_path, content):
    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    (tmp_path / "m.yaml").write_bytes(content)
    ident = identify_path(src)
    assert ident.problem("config_unreadable") is not None
    assert said(ident)[2:] == ("epsilon", "medium")  # the yaml counts for nothing
    conv, summary = convert(src, dtype="fp16")
    assert not conv.outputs[0].dest.with_suffix(".yaml").exists()
    assert any("ignored m.yaml" in n for n in summary["notes"])
    r = run_cli("inspect", src)
    assert r.returncode == 1 and "m.yaml" in r.stdout and "Traceback" not in r.stderr


# --- A1111 sidecars and what inspect advises ----------------------------------------------------------


def test_inspect_says_when_a1111_needs_the_yaml(tmp_path):
    xl = identify_path(write_layout(tmp_path / "xl.safetensors", "sdxl-vpred-ztsnr", scale=16))
    p = xl.problem("needs_config_yaml")
    assert p and p.severity == "info" and p.details["config"] == "sd_xl_v.yaml"  # Forge/ComfyUI read the marker
    r = run_cli("inspect", tmp_path / "xl.safetensors")
    flat = " ".join(r.stdout.split())  # reports wrap to the terminal
    assert "A1111 (1.10) does not read the v_pred marker" in flat and "sd_xl_v.yaml" in flat
    sd2 = identify_path(write_layout(tmp_path / "sd2.safetensors", "sd21-768-v", scale=8))
    p = sd2.problem("needs_config_yaml")
    assert p.severity == "warning" and p.details["prediction"] == "unknown"
    r = run_cli("inspect", tmp_path / "sd2.safetensors")
    assert "running the UNet once" in " ".join(r.stdout.split())  # A1111's own check, said accurately (reports wrap)
    sd2_eps = identify_path(write_layout(tmp_path / "e.safetensors", "sd21-768-v", scale=8,
                                         metadata={"modelspec.prediction_type": "epsilon"}))
    assert sd2_eps.problem("needs_config_yaml") is None


# --- 4. multi-part --extract: all parts or none -----------------------------------------------------


def test_full_disk_mid_extract_leaves_nothing_and_the_retry_uses_the_same_names(tmp_path, monkeypatch):
    import sdtk.formats.safetensors as st

    src = write_layout(tmp_path / "model.safetensors", "sd15-emaonly", scale=16)
    before = files_in(tmp_path)
    real = st._write_tensors

    def disk_full_on_the_text_encoder(out, plan, dest, *args):
        if "clip" in str(dest):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out, plan, dest, *args)

    monkeypatch.setattr(st, "_write_tensors", disk_full_on_the_text_encoder)
    with pytest.raises(OutputError, match="disk full while writing; nothing was written"):
        convert(src, extract=["vae", "unet", "clip-l"])
    assert files_in(tmp_path) == before  # the VAE and UNet already written were taken back
    monkeypatch.setattr(st, "_write_tensors", real)
    conv, _ = convert(src, extract=["vae", "unet", "clip-l"])
    assert sorted(o.dest.name for o in conv.outputs) == ["model-clip-l.safetensors", "model-unet.safetensors",
                                                         "model-vae.safetensors"]


# --- 5. AutoV3 as A1111 and kohya compute it -----------------------------------------------------------


def test_a1111_autov3_always_skips_the_header_and_equals_the_output_hash(tmp_path):
    big = {"modelspec.thumbnail": "data:image/png;base64," + "A" * (17 << 20)}  # a header over 16 MiB
    src = write_layout(tmp_path / "big.safetensors", "sd15-emaonly", scale=32, metadata=big)
    conv, _ = convert(src, dtype="fp16", output_hash=True)
    out = conv.outputs[0].dest
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n >= 16 << 20
    addnet = hashlib.sha256(data[8 + n:]).hexdigest()  # A1111 hashes.addnet_hash_safetensors: seek(8 + n)
    r = run_cli("hash", out, "--style", "a1111", "--json")
    row = json.loads(r.stdout)
    row = row[0] if isinstance(row, list) else row.get("files", [row])[0]
    assert row["AutoV3"] == addnet == metadata_of(out)["modelspec.hash_sha256"][2:]
    r = run_cli("hash", out, "--json")  # Civitai's rule: a 16 MiB+ length is not a header, hash from 8
    row = json.loads(r.stdout)
    row = row[0] if isinstance(row, list) else row.get("files", [row])[0]
    assert row["AutoV3"] == hashlib.sha256(data[8:]).hexdigest()[:12].upper()


# --- 6. where a diffusion model alone goes ------------------------------------------------------------


@pytest.mark.parametrize("make", ["flux-transformer", "bare-unet"])
def test_placement_advice_for_diffusion_models_alone(tmp_path, make):
    if make == "flux-transformer":  # full size on paper (sparse): only the header is read
        path = H.write_sparse(tmp_path / "flux1-dev.safetensors", H.layout("flux1-dev"))
    else:  # the bare UNet keys of SD1.5 (what --extract unet writes), fp16, sparse
        unet = H.sub_prefix(H.layout("sd15-emaonly").with_dtype("float16"), "model.diffusion_model.")
        path = H.write_sparse(tmp_path / "sd15-unet.safetensors", unet)
    ident = identify_path(path)
    codes = {a.code for a in ident.advice}
    assert "ready_for_generation_diffusion_model" in codes and "ready_for_generation" not in codes
    r = run_cli("inspect", path)
    assert "models/diffusion_models" in r.stdout and "A1111 cannot load it" in r.stdout
    assert "Stable-diffusion (A1111/Forge)" not in r.stdout


# --- 7. LoRA ModelSpec, the output hash, EMA extraction -------------------------------------------------


def test_lora_conversion_gets_modelspec_and_every_output_its_hash(tmp_path):
    lora = H.write_valued(tmp_path / "style.safetensors", H.kohya_lora("sdxl"), random=True)
    conv, _ = convert(lora, dtype="fp16", output_hash=True)
    out = conv.outputs[0].dest
    meta = metadata_of(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + n:]).hexdigest()
    full = write_layout(tmp_path / "sd15.safetensors", "sd15-emaonly", scale=16)
    conv, _ = convert(full, extract=["clip-l", "vae"], output_hash=True)
    for o in conv.outputs:  # a text encoder has no ModelSpec architecture; it still gets its hash
        data = o.dest.read_bytes()
        n = int.from_bytes(data[:8], "little")
        assert metadata_of(o.dest)["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + n:]).hexdigest()


def test_extract_unet_from_a_file_with_ema_says_which_set(tmp_path):
    src = write_layout(tmp_path / "full.safetensors", "sd15-full-ema", scale=16)
    key = "input_blocks.0.0.weight"
    values = read_all(src)
    conv, summary = convert(src, extract=["unet"])
    out = conv.outputs[0].dest
    assert not any("kept both" in n for n in summary["notes"])
    assert any("non-EMA weights" in n and "--ema use" in n for n in summary["notes"])
    assert lineage_facts(out)["weights"] == "non-ema" and summary["weight_set"] == "non-ema"
    assert read_all(out)[key].tobytes() == values["model.diffusion_model." + key].tobytes()
    conv, summary = convert(src, extract=["unet"], ema="use", overwrite=True)
    out = conv.outputs[0].dest
    assert lineage_facts(out)["weights"] == "ema"
    assert read_all(out)[key].tobytes() == values["model_ema.diffusion_modelinput_blocks00weight"].tobytes()


# --- 8. fp8 ------------------------------------------------------------------------------------------


def test_fp8_e4m3fn_refusal_says_values_saturate(tmp_path):
    lay = H.layout("sd15-emaonly")
    big = np.full((8,), 1000.0, np.float32)
    src = H.write_valued(tmp_path / "m.safetensors", lay, values={"model.diffusion_model.out.2.bias": big}, scale=16)
    r = run_cli("convert", src, "--dtype", "fp8-e4m3fn", "--no-source-hash")
    assert r.returncode == 2 and "saturated to +-448" in r.stderr and "inf" not in r.stderr
    assert files_in(tmp_path) == ["m.safetensors"]
    r = run_cli("convert", src, "--dtype", "fp16", "--no-source-hash")  # in range for fp16: nothing to refuse
    assert r.returncode == 0, r.stderr


def test_fp8_keeps_vae_and_text_encoders_16_bit_and_inspect_agrees(tmp_path):
    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    conv, summary = convert(src, dtype="fp8-e4m3fn")
    out = conv.outputs[0].dest
    ident = identify_path(out)
    dtypes = {name: set(c.dtypes) for name, c in ident.components.items()}
    assert dtypes["unet"] == {"fp8-e4m3fn"} and dtypes["vae"] == {"fp16"} and dtypes["text_encoder"] <= {"fp16", "int64"}
    assert any("VAE and text encoders stay 16-bit" in n for n in summary["notes"])
    assert "fp8_vae_or_text_encoder" not in {a.code for a in ident.advice}
    conv, _ = convert(src, dtype="fp8-e4m3fn", vae_dtype="fp8-e4m3fn", te_dtype="fp8-e4m3fn", overwrite=True)
    all_fp8 = identify_path(conv.outputs[0].dest)
    codes = {a.code for a in all_fp8.advice}
    assert "fp8_vae_or_text_encoder" in codes and "ready_for_generation" not in codes


# --- inspect of every output says what the input's inspect said -------------------------------------

LAYOUTS = ["sd15-emaonly", "sd15-full-ema", "sd15-inpainting", "sd21-768-v", "sdxl-base", "sdxl-vpred-ztsnr",
           "flux1-dev", "flux1-schnell", "flux1-dev-aio", "sd3-medium-incl-clips"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inspect_of_every_output_says_what_the_input_said(tmp_path, layout):
    src = write_layout(tmp_path / f"{layout}.safetensors", layout, scale=32)  # scaled down: outputs of a few MB
    before = identify_path(src)
    assert before.architecture != "unknown"
    for options in ({"dtype": "bf16"}, {"preset": "generation"}, {"dtype": "fp8-e4m3fn", "allow_overflow": True}):
        conv, _ = convert(src, overwrite=True, **options)
        assert said(identify_path(conv.outputs[0].dest)) == said(before), options


# --- extracting the UNet of a v-prediction model keeps what says so ----------------------------------


def test_extract_unet_of_sdxl_vpred_keeps_its_markers_and_inspect_agrees(tmp_path):
    src = write_layout(tmp_path / "noob.safetensors", "sdxl-vpred-ztsnr", scale=16)  # values: written for real
    conv, summary = convert(src, extract=["unet", "vae", "clip-l"])
    parts = {o.part: o.dest for o in conv.outputs}
    unet = read_all(parts["unet"])
    # ComfyUI's UNet loader reads these two empty tensors from the bare file (supported_models.SDXL.model_type)
    assert unet["v_pred"].size == 0 and unet["ztsnr"].size == 0
    assert metadata_of(parts["unet"])["modelspec.prediction_type"] == "v"
    assert lineage_facts(parts["unet"])["prediction_type"] == "v"
    for part in ("vae", "clip-l"):  # components without a prediction type get no marker or claim
        assert not set(read_all(parts[part])) & {"v_pred", "ztsnr"}
        assert "modelspec.prediction_type" not in metadata_of(parts[part])
    assert files_in(tmp_path) == sorted(["noob.safetensors", *(p.name for p in parts.values())])  # no yaml for parts
    # inspect of the full-size bare UNet (shapes identify it) says what the input's inspect said
    (tmp_path / "full").mkdir()
    full = H.write_sparse(tmp_path / "full" / "noob.safetensors", H.layout("sdxl-vpred-ztsnr"))
    before = identify_path(full)
    assert (before.prediction_type, before.prediction_source, before.zero_terminal_snr) == ("v", "marker", True)
    out = planned_outputs(full, tmp_path / "full", extract=["unet"]).outputs[0].dest
    after = identify_path(out)
    assert (after.kind, after.prediction_type, after.prediction_confidence, after.prediction_source, after.zero_terminal_snr) == \
        ("diffusion-model", "v", "high", "marker", True)
    assert (after.architecture, after.variant) == (before.architecture, before.variant)
    assert after.problem("needs_config_yaml") is None  # A1111 cannot load a bare UNet: no yaml advice for it
    assert before.problem("needs_config_yaml") is not None  # (the checkpoint does get it)


def test_extract_unet_with_a_stated_v_prediction_gets_the_marker(tmp_path):
    src = H.write_sparse(tmp_path / "xl.safetensors", H.layout("sdxl-base"))  # full size, sparse; outputs: headers
    conv = planned_outputs(src, tmp_path, extract=["unet"], prediction_type="v")
    out = conv.outputs[0].dest
    assert [t.name for t in conv.outputs[0].plan if "." not in t.name] == ["v_pred"]
    assert any("add v_pred marker" in op for op in conv.operations)
    after = identify_path(out)
    assert (after.kind, after.prediction_type, after.prediction_source) == ("diffusion-model", "v", "marker")


@pytest.mark.parametrize("layout,yaml_name,arch", [("sd15-emaonly", "v1-inference-v.yaml", "stable-diffusion-v1"),
                                                    ("sd21-768-v", "v2-inference-v.yaml", "stable-diffusion-v2-768-v")])
def test_extract_unet_of_a_v_model_known_by_its_yaml_keeps_v_in_modelspec(tmp_path, layout, yaml_name, arch):
    src = H.write_sparse(tmp_path / "m.safetensors", H.layout(layout))
    (tmp_path / "m.yaml").write_text(config_text(yaml_name))
    before = identify_path(src)
    unet = planned_outputs(src, tmp_path, extract=["unet"]).outputs[0]
    out = unet.dest
    meta = metadata_of(out)
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.architecture"] == arch
    assert "v_pred" not in {t.name for t in unet.plan}  # SD1/SD2 have no marker tensor (no loader reads one)
    assert not out.with_suffix(".yaml").exists()  # A1111 cannot load a bare UNet: no yaml for it
    after = identify_path(out)
    assert (after.kind, after.prediction_type, after.prediction_confidence, after.prediction_source) == \
        ("diffusion-model", "v", "high", "modelspec")
    assert (before.prediction_type, before.prediction_source, after.architecture) == ("v", "config", before.architecture)


# --- A1111's SD2 check: one UNet forward pass (sdtk.identify.sd2_forward) ------------------------------


def _sd2_with_forward_mean(tmp_path, name, target, norm_bias_std=None):
    """A random-valued SD2 copy (every dim / 10: 32..128 channels, GroupNorm(32) still splits) whose
    last bias is shifted so that A1111's mean(unet(x) - x) is `target` (the output moves with it 1:1)."""
    from sdtk.formats import open_model
    from sdtk.identify.sd2_forward import A1111_CONTEXT_TOKENS, unet_forward

    lay = H.layout("sd21-768-v")
    values = {NORM_BIAS: _bias_with_std(norm_bias_std, n=32)} if norm_bias_std else {}
    path = H.write_valued(tmp_path / name, lay, values=values, scale=10, random=True)
    with open_model(path) as cat:
        pre = "model.diffusion_model."
        unet = {k[len(pre):]: t for k, t in cat.tensors.items() if k.startswith(pre)}
        ctx = np.full((A1111_CONTEXT_TOKENS, unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]), 0.5, np.float32)
        x = np.full((1, 4, 8, 8), 0.5, np.float32)
        mean = float((unet_forward(unet, x, 999, ctx) - x).mean())
        bias = np.asarray(unet["out.2.bias"].read(), np.float32)
        values = {**values, pre + "out.2.bias": bias + np.float32(target - mean)}
    return H.write_valued(tmp_path / name, lay, values=values, scale=10, random=True)


@pytest.mark.parametrize("target,expected", [(-1.2, "v"), (-0.8, "epsilon")])
def test_a1111_forward_check_each_side_of_the_rule(tmp_path, target, expected):
    path = _sd2_with_forward_mean(tmp_path, "sd2.safetensors", target)
    assert identify_path(path).prediction_type is None  # header only: no guess
    deep = identify_path(path, deep=True)
    forward = next(e for e in deep.prediction_evidence if e["detail"].startswith("forward check"))
    assert (forward["type"], forward["confidence"]) == (expected, "medium") and f"= {target:.3f}" in forward["detail"]
    assert (deep.prediction_type, deep.prediction_confidence, deep.prediction_source) == (expected, "medium", "heuristic")
    conv, summary = convert(path, dtype="fp16", prediction_type="auto")
    assert metadata_of(conv.outputs[0].dest)["modelspec.prediction_type"] == expected
    assert any("forward check" in n and "medium confidence" in n for n in summary["notes"])


def test_a1111_check_outweighs_comfyuis_statistic_and_both_are_listed(tmp_path):
    path = _sd2_with_forward_mean(tmp_path, "sd2.safetensors", -0.5, norm_bias_std=0.3)  # ComfyUI's rule: v
    deep = identify_path(path, deep=True)
    assert (deep.prediction_type, deep.prediction_confidence) == ("epsilon", "medium")
    said = [(e["type"], e["confidence"], e["detail"].split(":")[0]) for e in deep.prediction_evidence]
    assert said == [("epsilon", "medium", "forward check"), ("v", "low", "value check")]  # strongest first


# --- when A1111's and ComfyUI's SD2 rules disagree, the report says so ---------------------------------


def test_programs_disagree_when_a1111s_check_and_comfyuis_statistic_differ(tmp_path):
    path = _sd2_with_forward_mean(tmp_path, "sd2.safetensors", -0.5, norm_bias_std=0.3)  # A1111: epsilon, ComfyUI: v
    deep = identify_path(path, deep=True)
    p = deep.problem("programs_disagree")
    assert p and p.severity == "warning"
    assert (p.details["a1111"], p.details["comfyui"], p.details["winner"]) == ("epsilon", "v", "epsilon")
    assert p.details["a1111_how"].startswith("forward check") and p.details["comfyui_how"].startswith("value check")
    assert deep.problem("prediction_conflict") is None  # the same disagreement is not said twice
    r = run_cli("inspect", "--deep", path)
    flat = " ".join(r.stdout.split())
    assert "A1111 loads this file as epsilon" in flat and "ComfyUI as v" in flat
    conv, summary = convert(path, dtype="fp16", prediction_type="auto")
    assert any("A1111 would load the input as epsilon" in n and "ComfyUI as v" in n for n in summary["notes"])


def test_programs_agreeing_raise_nothing(tmp_path):
    path = _sd2_with_forward_mean(tmp_path, "sd2.safetensors", -1.2, norm_bias_std=0.3)  # both: v
    deep = identify_path(path, deep=True)
    assert deep.prediction_type == "v" and deep.problem("programs_disagree") is None


def test_a_v_yaml_beside_an_sd2_file_comfyui_reads_as_epsilon_is_reported_without_deep(tmp_path):
    lay = H.layout("sd21-768-v")
    path = H.write_valued(tmp_path / "sd2.safetensors", lay, values={NORM_BIAS: _bias_with_std(0.01)}, scale=16, random=True)
    (tmp_path / "sd2.yaml").write_text(config_text("v2-inference-v.yaml"))
    ident = identify_path(path)  # header + one 5 kB tensor: ComfyUI's statistic needs no --deep
    assert (ident.prediction_type, ident.prediction_source) == ("v", "config")
    p = ident.problem("programs_disagree")
    assert p and (p.details["a1111"], p.details["comfyui"]) == ("v", "epsilon")
    assert p.details["a1111_how"] == "sd2.yaml beside the file"
    (tmp_path / "sd2.yaml").unlink()
    assert identify_path(path).problem("programs_disagree") is None  # without the yaml, A1111's choice needs --deep


def test_sd2_inpainting_is_epsilon_in_comfyui_whatever_its_statistic(tmp_path):
    from sdtk.identify.checks import _comfyui_sd2_choice
    from sdtk.identify.prediction import Evidence
    class Conv:
        shape = (320, 9, 3, 3)

    stat = Evidence("heuristic", "v", "low", "value check: ...", method="comfyui-statistic")
    assert _comfyui_sd2_choice([stat], {"input_blocks.0.0.weight": Conv()})[0] == "epsilon"
    Conv.shape = (320, 4, 3, 3)
    assert _comfyui_sd2_choice([stat], {"input_blocks.0.0.weight": Conv()})[0] == "v"


def test_v_prediction_advice_says_comfyui_reads_sdxl_markers_but_not_sd1_yaml(tmp_path):
    xl = identify_path(write_layout(tmp_path / "xl.safetensors", "sdxl-vpred-ztsnr", scale=16))
    codes = [a.code for a in xl.advice]
    assert "vpred_marked" in codes and "vpred_settings" not in codes  # ComfyUI's SDXL class reads v_pred / ztsnr
    r = run_cli("inspect", tmp_path / "xl.safetensors")
    flat = " ".join(r.stdout.split())
    assert "ComfyUI and Forge read them and sample it as v-prediction + zsnr" in flat
    src = write_layout(tmp_path / "sd15-v.safetensors", "sd15-emaonly", scale=16)
    (tmp_path / "sd15-v.yaml").write_text(config_text("v1-inference-v.yaml"))
    sd1 = identify_path(src)  # v from the yaml: ComfyUI reads no yaml and loads SD1 as epsilon
    codes = [a.code for a in sd1.advice]
    assert "vpred_settings" in codes and "vpred_marked" not in codes
    assert "ModelSamplingDiscrete" in " ".join(run_cli("inspect", src).stdout.split())
