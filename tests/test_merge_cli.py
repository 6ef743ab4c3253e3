"""`sdtk merge` end to end: bad input (exit 2, nothing written), recipes, --recipe-from, metadata,
--explain-blocks, and architecture refusal on full-size sparse files (header-only work)."""
import hashlib
import json
import os
import time

import numpy as np
import pytest

from helpers_merge import make_model, metadata, tensors
from sdtk.samples import load_layout, write_sparse_safetensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return d, {n: make_model(d, n, seed=s, scale=32) for n, s in (("a", 1), ("b", 2), ("c", 3))}


def assert_refused(result, out, *words):
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in result.stderr, result.stderr
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(os.path.dirname(out)) if p.endswith(".sdtk-partial")]


@pytest.mark.parametrize("args,words", [
    (["-a", "1.5"], ["--alpha 1.5", "[0, 1]"]),
    (["--blocks", "0.1,0.2,0.3"], ["3 values", "26 or 25"]),
    (["--blocks", "NOPE"], ["preset"]),
    (["-m", "add-difference"], ["takes 3 models"]),
    (["-m", "frobnicate"], ["unknown method"]),
    (["--te", "C"], ["merge, A or B"]),
    (["--dtype", "int8"], ["float type"]),
    (["--exclude", "model_ema["], ["not a valid regular expression"]),
    (["--blocks", ",".join(["0.5"] * 25 + ["1.5"])], ["block OUT11 weight 1.5", "[0, 1]"]),
])
def test_bad_options_exit_2_nothing_written(cli, models, args, words):
    d, m = models
    out = str(d / "bad.safetensors")
    assert_refused(cli("merge", m["a"], m["b"], "-o", out, *args), out, *words)


def test_missing_input_and_output_equal_to_input(cli, models):
    d, m = models
    out = str(d / "x.safetensors")
    assert_refused(cli("merge", m["a"], d / "missing.safetensors", "-o", out), out, "missing.safetensors", "no such file")
    r = cli("merge", m["a"], m["b"], "-o", m["b"], "--overwrite")
    assert r.returncode == 2 and "is one of the inputs" in r.stderr
    assert tensors(m["b"])  # untouched and readable


def test_different_architectures_refused_on_full_size_sparse_files(cli, tmp_path):
    """SD1 + SDXL full size: refused from the headers alone, in well under a second of work."""
    xl = tmp_path / "xl.safetensors"
    sd1 = tmp_path / "sd1.safetensors"
    write_sparse_safetensors(xl, load_layout("sdxl-base"))
    write_sparse_safetensors(sd1, load_layout("sd15-emaonly"))
    out = str(tmp_path / "o.safetensors")
    t = time.time()
    r = cli("merge", xl, sd1, "-o", out)
    assert_refused(r, out, "Stable Diffusion 1.x", "Stable Diffusion XL", "different architectures")
    assert time.time() - t < 30
    r = cli("diff", sd1, xl)
    assert r.returncode == 2 and "different architectures" in r.stderr


def test_same_family_with_shape_conflict_refused(cli, tmp_path):
    a = make_model(tmp_path, "a", seed=1, scale=32)
    b = make_model(tmp_path, "b", seed=2, scale=32,
                   transform=lambda l: l.rename(lambda k: k).without(lambda k: k == "model.diffusion_model.out.2.weight")
                   .plus([("model.diffusion_model.out.2.weight", (4, 77, 3, 3), "float32")]))
    out = str(tmp_path / "o.safetensors")
    assert_refused(cli("merge", a, b, "-o", out), out, "out.2.weight", "different architectures")


def test_full_size_sparse_sdxl_pair_plan_is_header_only(tmp_path):
    """The plan of a full-size SDXL merge (2515 keys, 6.9 GB each) is built from the headers;
    every key gets a decision and the output plan has the primary's shapes and dtypes."""
    from sdtk.formats import open_model
    from sdtk.ops.merge.arch import family_of
    from sdtk.ops.merge.plan import FileSource, StepSource, output_plan

    lay = load_layout("sdxl-vpred-ztsnr")
    write_sparse_safetensors(tmp_path / "a.safetensors", lay)
    write_sparse_safetensors(tmp_path / "b.safetensors", load_layout("sdxl-base"))
    with open_model(tmp_path / "a.safetensors") as ca, open_model(tmp_path / "b.safetensors") as cb:
        a, b = FileSource("a", ca, family_of(ca)), FileSource("b", cb, family_of(cb))
        assert a.family == b.family == "sdxl"
        step = StepSource("s", "weighted-sum", [a, b], 0.5, None, 0, blocks="GRAD_V")
        plan = output_plan(step, "fp16")
    assert [(t.name, t.shape) for t in plan] == [(k, tuple(s)) for k, s, _ in lay.tensors]
    assert step.report.merged == 2515 - 1  # all but position_ids
    assert step.report.copied == {"integer": 1, "empty marker": 2}
    pos = [t for t in plan if t.name.endswith("position_ids")][0]
    assert pos.dtype.short == "int64" and pos.span is not None  # copied byte for byte


def test_explain_blocks(cli, models, tmp_path):
    d, m = models
    r = cli("merge", "--explain-blocks", m["a"], "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["family"] == "sd1" and len(data["blocks"]) == 26
    assert data["mapping"]["IN00"]["keys"] > 0 and "te" in data["mapping"]["BASE"]["components"]
    xl = tmp_path / "xl.safetensors"
    write_sparse_safetensors(xl, load_layout("sdxl-base"))
    r = cli("merge", "--explain-blocks", xl)
    assert r.returncode == 0 and "OUT08" in r.stdout and "OUT09" not in r.stdout


def test_metadata_a1111_fields_and_sha256(cli, models):
    d, m = models
    out = d / "meta.safetensors"
    r = cli("merge", m["a"], m["b"], "-a", "0.25", "--dtype", "fp16", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    md = metadata(out)
    sha = {n: hashlib.sha256(m[n].read_bytes()).hexdigest() for n in ("a", "b")}
    rec = json.loads(md["sd_merge_recipe"])
    assert rec["primary_model_hash"] == sha["a"] and rec["secondary_model_hash"] == sha["b"]
    assert rec["interp_method"] == "Weighted sum" and rec["multiplier"] == 0.25 and rec["save_as_half"] is True
    models_md = json.loads(md["sd_merge_models"])
    assert set(models_md) == {sha["a"], sha["b"]} and models_md[sha["a"]]["name"] == "a.safetensors"
    full = json.loads(md["sdtk.merge_recipe"])
    from sdtk.hashing.model import lineage_hashes

    fresh = lineage_hashes(m["a"], use_cache=False)  # SHA256, AutoV3, content v2: what `sdtk hash` prints
    assert full["models"]["A"] == {"file": "a.safetensors", "size": m["a"].stat().st_size, **fresh}
    assert fresh["sha256"] == sha["a"]
    assert full["steps"][0]["method"] == "weighted-sum" and full["steps"][0]["alpha"] == 0.25
    assert summary["models"]["B"]["sha256"] == sha["b"]
    # a merge of a merge keeps the lineage (A1111: the inputs' own sd_merge_models are carried)
    out2 = d / "meta2.safetensors"
    assert cli("merge", out, m["c"], "-o", out2).returncode == 0
    lineage = json.loads(metadata(out2)["sd_merge_models"])
    sha_out = hashlib.sha256(out.read_bytes()).hexdigest()
    assert {sha["a"], sha["b"], sha_out} <= set(lineage)
    assert lineage[sha_out]["sd_merge_recipe"]["multiplier"] == 0.25


def test_recipe_two_steps_equals_two_merges_and_recipe_from_reproduces_bytes(cli, models, tmp_path):
    d, m = models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
models: {{base: {m['a']}, x: {m['b']}, y: {m['c']}}}
steps:
  - {{name: mix, method: add-difference, inputs: [base, x, y], alpha: 0.5}}
  - {{method: weighted-sum, inputs: [mix, y], alpha: 0.3, blocks: GRAD_V, te: A}}
dtype: fp16
""")
    out = tmp_path / "r.safetensors"
    r = cli("merge", "--recipe", recipe, "-o", out)
    assert r.returncode == 0, r.stderr
    # the same by hand, with the intermediate kept in fp32 (exact)
    mid = tmp_path / "mid.safetensors"
    assert cli("merge", m["a"], m["b"], m["c"], "-m", "add-difference", "-a", "0.5", "--dtype", "fp32", "-o", mid).returncode == 0
    hand = tmp_path / "hand.safetensors"
    assert cli("merge", mid, m["c"], "-a", "0.3", "--blocks", "GRAD_V", "--te", "A", "--dtype", "fp16", "-o", hand).returncode == 0
    R, H = tensors(out), tensors(hand)
    assert R.keys() == H.keys()
    for k in R:
        assert R[k].tobytes() == H[k].tobytes(), k
    # --recipe-from: the same bytes, models found beside the files by name
    again = tmp_path / "again.safetensors"
    r = cli("merge", "--recipe-from", out, "-o", again, "--models-dir", d)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()


def test_recipe_from_detects_a_different_input(cli, models, tmp_path):
    d, m = models
    out = tmp_path / "o.safetensors"
    assert cli("merge", m["a"], m["b"], "-o", out).returncode == 0
    other = tmp_path / "b.safetensors"
    make_model(tmp_path, "b", seed=99, scale=32)
    again = tmp_path / "again.safetensors"
    r = cli("merge", "--recipe-from", out, "-o", again, "--model", f"A={m['a']}")
    assert r.returncode == 2 and "the recipe was made from" in r.stderr and "b.safetensors" in r.stderr
    assert not again.exists()
    assert other.exists()


@pytest.mark.parametrize("text,words", [
    ("steps: []", ["no models"]),
    ("models: {a: a.safetensors}\nsteps:\n  - {method: weighted-sum, inputs: [a, zz]}", ["'zz'", "neither a model nor an earlier step"]),
    ("models: {a: a.safetensors, b: b.safetensors}\nsteps:\n  - {method: weighted-sum, inputs: [a, b], alpha: 3}", ["--alpha 3"]),
    ("models: [", ["not valid YAML"]),
])
def test_bad_recipes(cli, models, tmp_path, text, words):
    d, m = models
    recipe = d / "bad.yaml"
    recipe.write_text(text)
    out = str(tmp_path / "o.safetensors")
    assert_refused(cli("merge", "--recipe", recipe, "-o", out), out, *words)


def test_recipe_from_with_baked_vae_and_no_hash(cli, models, tmp_path):
    d, m = models
    vae = make_model(d, "vae", "vae-sd-kl-f8", seed=9, scale=32)
    out = tmp_path / "o.safetensors"
    r = cli("merge", m["a"], m["b"], "-m", "slerp", "-a", "0.3", "--bake-vae", vae, "--no-hash", "-o", out)
    assert r.returncode == 0, r.stderr
    recipe = json.loads(metadata(out)["sdtk.merge_recipe"])
    assert recipe["bake_vae"]["file"] == "vae.safetensors" and "header_sha256" in recipe["models"]["A"]
    again = tmp_path / "again.safetensors"
    r = cli("merge", "--recipe-from", out, "-o", again, "--models-dir", d)
    assert r.returncode == 2 and "--no-hash" in r.stderr  # made without hashes: say how to reproduce
    r = cli("merge", "--recipe-from", out, "-o", again, "--models-dir", d, "--no-hash")
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()
