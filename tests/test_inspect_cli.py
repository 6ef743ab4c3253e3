"""`sdtk inspect`: report, JSON schema, languages, folders, exit codes, bad input."""
import json
import re
import string

import pytest

import helpers_identify as H
from sdtk.identify import identify_path
from sdtk.report import LANGUAGES, render_identity
from sdtk.report.messages import catalogue

EVIL_PICKLE = b"cos\nsystem\n(S'echo pwned > /tmp/sdtk-pwned'\ntR."  # protocol 0: os.system("...")


@pytest.fixture
def models(tmp):
    folder = tmp / "models"
    (folder / "Lora").mkdir(parents=True)
    H.write_sparse(folder / "sdxl.safetensors", H.layout("sdxl-base"))
    H.write_sparse(folder / "sd21.safetensors", H.layout("sd21-768-v"))
    rows = H.kohya_lora("sd1", 8)
    H.write_valued(folder / "Lora" / "style.safetensors", rows, values=H.lora_alphas(rows, 4.0))
    (folder / "evil.ckpt").write_bytes(EVIL_PICKLE)
    (folder / "notes.txt").write_text("not a model")
    return folder


def test_single_file_report_and_exit_0(cli, tmp):
    path = H.write_sparse(tmp / "sdxl.safetensors", H.layout("sdxl-base"))
    r = cli("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "Stable Diffusion XL 1.0 checkpoint (stable-diffusion-xl-v1-base)" in r.stdout
    assert "conditioner.embedders.1.model." in r.stdout and "Text encoder 2 (clip-g)" in r.stdout
    assert "Ready for generating images" in r.stdout


def test_problems_exit_1(cli, tmp):
    r = cli("inspect", H.write_sparse(tmp / "sd21.safetensors", H.layout("sd21-768-v")))
    assert r.returncode == 1
    assert "no .yaml config beside the file" in r.stdout


def test_unreadable_exit_2_one_line(cli, tmp):
    (tmp / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = cli("inspect", tmp / "junk.safetensors")
    assert r.returncode == 2
    assert "junk.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = cli("inspect", tmp / "missing.ckpt")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_folder_lists_every_model_then_totals(cli, models):
    r = cli("inspect", models)
    assert r.returncode == 2  # the hostile pickle is unreadable: the worst case wins
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5  # 4 model files (notes.txt skipped) + totals
    assert re.search(r"ok\s+Lora/style\.safetensors\s+stable-diffusion-v1/lora\s+\[LoRA\]", r.stdout)
    assert re.search(r"1!\s+sd21\.safetensors\s+stable-diffusion-v2", r.stdout)
    assert "evil.ckpt: unreadable:" in r.stdout
    assert lines[-1].startswith("4 files: 3 identified, 1 with problems, 0 unknown, 1 unreadable")
    assert "Traceback" not in r.stderr
    import os
    assert not os.path.exists("/tmp/sdtk-pwned")


def test_json_schema(cli, models):
    r = cli("inspect", "--json", models)
    data = json.loads(r.stdout)
    assert data["schema"] == "sdtk.inspect/1" and data["exit_code"] == 2 == r.returncode
    assert data["totals"] == {"files": 4, "identified": 3, "unknown": 0, "with_problems": 1, "unreadable": 1,
                              "bytes": data["totals"]["bytes"]}
    by_name = {f["path"].rsplit("/", 1)[-1]: f for f in data["files"]}
    xl = by_name["sdxl.safetensors"]
    for field in ("kind", "architecture", "variant", "components", "precision", "has_ema", "prediction", "problems", "advice",
                  "missing_keys", "extra_keys", "metadata", "safety", "file_size", "parameters"):
        assert field in xl
    assert xl["components"]["unet"] == {"name": "unet", "prefix": "model.diffusion_model.", "model": "unet", "tensors": 1680,
                                        "parameters": 2567463684, "dtypes": {"fp16": 1680}, "bytes": 2567463684 * 2}
    assert xl["prediction"] == {"type": "epsilon", "confidence": "medium", "source": "family-default", "zero_terminal_snr": False,
                                "evidence": [{"source": "family-default", "type": "epsilon", "confidence": "medium",
                                              "detail": "sdxl models are epsilon unless marked"}]}
    sd2 = by_name["sd21.safetensors"]
    p = next(p for p in sd2["problems"] if p["code"] == "needs_config_yaml")
    assert p["severity"] == "warning" and p["message_key"] == "problem.needs_config_yaml" and "A1111" in p["message"]
    lora = by_name["style.safetensors"]
    assert lora["adapter"]["rank"] == 8 and lora["adapter"]["alpha"] == 4.0
    assert data["unreadable"][0]["path"].endswith("evil.ckpt") and data["unreadable"][0]["error"] == "UnsafeFileError"


@pytest.mark.parametrize("lang,label,advice", [("ja", "構成要素", "学習用のフルチェックポイント"), ("zh", "组件", "完整的训练用模型"),
                                                ("ru", "Компоненты", "Полный чекпойнт для обучения")])
def test_languages(cli, tmp, lang, label, advice):
    r = cli("inspect", "--lang", lang, H.write_sparse(tmp / "sd15.safetensors", H.layout("sd15-full-ema")))
    assert r.returncode == 0
    assert label in r.stdout and advice in r.stdout


def test_unknown_language_is_a_usage_error(cli, tmp):
    r = cli("inspect", "--lang", "fr", H.write_sparse(tmp / "v.safetensors", H.layout("vae-sd-kl-f8")))
    assert r.returncode == 2 and "--lang" in r.stderr


def _fields(template):
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


@pytest.mark.parametrize("lang", [l for l in LANGUAGES if l != "en"])
def test_catalogues_are_complete_and_use_the_same_fields(lang):
    en, other = catalogue("en"), catalogue(lang)
    assert set(other) == set(en)
    for key, template in en.items():
        assert _fields(other[key]) == _fields(template), key


# the same in every language: names, program and format tokens, or a bare placeholder
SAME_WORDS = {"advice.needs_config_yaml", "folder.unreadable", "component.dit", "component.unet", "component.vae",
              "kind.controlnet", "kind.lora", "kind.t2i-adapter", "kind.vae", "prediction.ztsnr", "what.model",
              "train.clip_skip", "train.learning_rate", "train.network_alpha", "train.network_dim",
              "train.network_module", "trigger.modelspec.trigger_phrase"}


@pytest.mark.parametrize("lang", [l for l in LANGUAGES if l != "en"])
def test_every_message_is_translated(lang):
    """A message added in English only (copied into the other catalogues) fails here; the
    quantization messages (GGUF, NF4) are among those checked."""
    en, other = catalogue("en"), catalogue(lang)
    assert {k for k in en if k.startswith("quant.")} >= {"quant.component", "quant.kept", "quant.loaders",
                                                          "quant.caveat.orig_shape", "quant.caveat.double_quant"}
    copied = sorted(k for k, v in en.items() if not k.startswith("_") and other[k] == v and k not in SAME_WORDS)
    assert not copied, copied


def test_every_message_key_used_exists(tmp):
    """Render a spread of files in every language: no raw message key or unfilled field shows."""
    files = [H.write_sparse(tmp / "a.safetensors", H.layout("sd15-full-ema")),
             H.write_sparse(tmp / "b.safetensors", H.layout("sdxl-vpred-ztsnr")),
             H.write_sparse(tmp / "c.safetensors", H.layout("sd21-768-v").plus([("embedding_manager.x", (3,), "float32")])),
             H.write_sparse(tmp / "d.safetensors", H.layout("sdxl-base").without(lambda k: k.startswith("conditioner."))),
             H.write_sparse(tmp / "e.safetensors", [("x.y", (3, 3), "float32")]),
             H.write_sparse(tmp / "f.safetensors", H.kohya_lora("sdxl")),
             H.write_sparse(tmp / "g.safetensors", [("clip_l", (2, 768), "float32"), ("clip_g", (2, 1280), "float32")]),
             H.write_sparse(tmp / "h.safetensors", H.controlnet_ldm()),
             H.write_sparse(tmp / "i.safetensors", H.layout("clip-l-hf")),
             H.write_sparse(tmp / "j.safetensors", H.layout("vae-sd-kl-f8")),
             H.write_sparse(tmp / "k.safetensors", H.unet_in_channels(H.layout("sd15-emaonly"), 9)),
             H.write_sparse(tmp / "l.safetensors", H.sdxl_refiner())]
    from rich.console import Console

    for path in files:
        ident = identify_path(path)
        keys = [p.message_key for p in ident.problems] + [a.message_key for a in ident.advice]
        for key in keys:
            assert key in catalogue("en"), key
        for lang in LANGUAGES:
            console = Console(record=True, width=200)
            console.print(render_identity(ident, lang, verbose=True))
            out = console.export_text()
            assert "problem." not in out and "advice." not in out and "kind." not in out, (path, lang)
            assert " ? " not in out, (path, lang, out)


def test_vae_ref_cli(cli, tmp):
    lay = H.layout("sd15-emaonly")
    model = H.write_valued(tmp / "m.safetensors", lay, scale=16)
    vae = H.write_valued(tmp / "vae.safetensors", H.sub_prefix(lay, "first_stage_model."), scale=16)
    r = cli("inspect", "--json", "--vae-ref", vae, model)
    vc = json.loads(r.stdout)["files"][0]["vae_comparison"]
    assert vc["verdict"] == "identical" and vc["compared"] == 248
    r = cli("inspect", "--vae-ref", vae, model)
    assert "Baked VAE" in r.stdout and "identical to" in r.stdout


def test_deep_cli(cli, tmp):
    import numpy as np

    bad = np.full((20,), np.nan, np.float16)
    path = H.write_valued(tmp / "n.safetensors", H.layout("sd15-emaonly").with_dtype("float16"),
                          values={"model.diffusion_model.input_blocks.0.0.bias": bad}, scale=16)
    r = cli("inspect", "--deep", "--json", path)
    codes = {p["code"] for p in json.loads(r.stdout)["files"][0]["problems"]}
    assert "non_finite_values" in codes and r.returncode == 1


def test_diffusers_folder_cli(cli, tmp):
    root = H.write_diffusers_folder(tmp / "pipe")
    r = cli("inspect", "--json", root)
    f = json.loads(r.stdout)["files"][0]
    assert f["kind"] == "diffusers-pipeline" and f["architecture"] == "stable-diffusion-v1"
    assert set(f["components"]) == {"unet", "vae", "text_encoder"}


def test_folder_line_names_the_variant(cli, tmp):
    """v-prediction is what users must act on: the one-line listing says it, not only the report."""
    folder = tmp / "ckpts"
    folder.mkdir()
    H.write_sparse(folder / "noob.safetensors", H.layout("sdxl-vpred-ztsnr"))
    H.write_sparse(folder / "base.safetensors", H.layout("sdxl-base"))
    r = cli("inspect", folder)
    assert re.search(r"noob\.safetensors\s+stable-diffusion-xl-v1-base \(v-prediction\)\s+\[checkpoint\]", r.stdout), r.stdout
    assert re.search(r"base\.safetensors\s+stable-diffusion-xl-v1-base\s+\[checkpoint\]", r.stdout), r.stdout
