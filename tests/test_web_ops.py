"""sdtk serve's jobs for the operations that landed after the first web app: `lora apply`
(base + LoRAs with strengths), `convert --to gguf --quant`, `--to fp8-scaled` and `--to diffusers`.
Each job gives the bytes the CLI gives for the same options (the web is a thin layer over the same
library calls), reaches 100%, links its output into the library, and a cancelled job leaves no file."""
import html
import os
import time
from pathlib import Path

import pytest

from conftest import run_cli
from helpers_web import matched_lora
from helpers_webapp import HX, build, client_for, file_id, last_job, wait_job


@pytest.fixture
def lib(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample) as client:
        client.sample, client.base = sample, tmp_path
        yield client


def index_again(lib):
    lib.post("/run/index", headers=HX)
    assert wait_job(lib, last_job(lib).id).state == "done"


def partials(folder):
    return [p for p in os.listdir(folder) if ".sdtk-partial" in p]


def test_lora_apply_job_has_the_cli_bytes(lib):
    loras = lib.sample["lora"].parent
    one, two = matched_lora(lib.sample["sd_a"], loras / "detail.safetensors", 1), matched_lora(lib.sample["sd_a"], loras / "style.safetensors", 2)
    index_again(lib)
    base = file_id(lib, lib.sample["sd_a"])
    page = lib.get(f"/lora?base={base}").text
    assert "detail.safetensors" in page and "style.safetensors" in page and 'name="strength_0"' in page
    assert "Bake LoRAs" in lib.get(f"/model/{base}").text
    assert f'href="/lora?lora={file_id(lib, one)}"' in lib.get(f"/model/{file_id(lib, one)}").text
    form = {"base": base, "lora_0": file_id(lib, one), "strength_0": "0.7", "te_strength_0": "",
            "lora_1": file_id(lib, two), "strength_1": "-0.25", "te_strength_1": "0.5", "lora_2": "",
            "dora": "comfyui", "output": "baked.safetensors"}
    assert "queued" in lib.post("/run/lora-apply", data=form, headers=HX).text
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100 and job.result["computed"] == 2
    out = job.result["outputs"][0]
    assert out["id"] and out["name"] == "baked.safetensors" and "baked.safetensors" in lib.get("/").text
    assert any("detail.safetensors x0.7" in line for line in job.log)
    cli = lib.base / "cli" / "baked.safetensors"
    cli.parent.mkdir()
    r = run_cli("lora", "apply", lib.sample["sd_a"], f"{one}:0.7", f"{two}:-0.25:0.5", "-o", cli)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == Path(out["path"]).read_bytes()


def test_lora_apply_block_weights_job_has_the_cli_bytes(lib):
    """Block weights per LoRA (`LORA:S:lbw=...` on the CLI): named blocks, and a preset name the
    form resolves to the LoRA Block Weight extension's list; the bytes equal the CLI's."""
    from sdtk.web.operations import LBW_PRESETS

    loras = lib.sample["lora"].parent
    one, two = matched_lora(lib.sample["sd_a"], loras / "detail.safetensors", 1), matched_lora(lib.sample["sd_a"], loras / "style.safetensors", 2)
    index_again(lib)
    base = file_id(lib, lib.sample["sd_a"])
    page = lib.get(f"/lora?base={base}").text
    assert 'name="lbw_0"' in page and 'list="lbw-presets"' in page and '<option value="OUTS">' in page
    form = {"base": base, "lora_0": file_id(lib, one), "strength_0": "0.7", "lbw_0": "lbw=IN01=0.5,OUT11=0",
            "lora_1": file_id(lib, two), "strength_1": "-0.25", "te_strength_1": "0.5", "lbw_1": "outs",
            "output": "blocks.safetensors"}
    assert "queued" in lib.post("/run/lora-apply", data=form, headers=HX).text
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100 and job.result["outputs"][0]["id"]
    assert any("block weights: IN01 x0.5, OUT11 x0" in line for line in job.log), job.log
    web_bytes = Path(job.result["outputs"][0]["path"]).read_bytes()
    (lib.base / "cli").mkdir()
    cli, plain = lib.base / "cli" / "blocks.safetensors", lib.base / "cli" / "plain.safetensors"
    r = run_cli("lora", "apply", lib.sample["sd_a"], f"{one}:0.7:lbw=IN01=0.5,OUT11=0",
                f"{two}:-0.25:0.5:lbw={LBW_PRESETS['OUTS']}", "-o", cli)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == web_bytes
    r = run_cli("lora", "apply", lib.sample["sd_a"], f"{one}:0.7", f"{two}:-0.25:0.5", "-o", plain)
    assert r.returncode == 0 and plain.read_bytes() != web_bytes  # the block weights took effect


def test_bad_block_weights_are_refused_in_the_page(lib):
    loras = lib.sample["lora"].parent
    one = matched_lora(lib.sample["sd_a"], loras / "detail.safetensors", 1)
    index_again(lib)
    base, lora = file_id(lib, lib.sample["sd_a"]), file_id(lib, one)
    folder = lib.sample["sd_a"].parent
    before = set(os.listdir(folder)), len(lib.web.queue.jobs())
    for lbw, words in (("1,0,1", "LoRA 1: block weights '1,0,1': 3 values"),
                       ("IN99=1", "unknown block 'IN99'"),
                       ("IN04=x", "'x' is not a number"),
                       ("1,0,IN04=1", "not both"),
                       ("NOPE", "'NOPE'"),
                       (",".join(["1"] * 12), "are for SDXL, but alpha-mix")):
        r = html.unescape(lib.post("/run/lora-apply", data={"base": base, "lora_0": lora, "lbw_0": lbw,
                                                            "output": "no.safetensors"}, headers=HX).text)
        assert 'class="msg error"' in r and words in r, (lbw, r)
    assert (set(os.listdir(folder)), len(lib.web.queue.jobs())) == before


def test_lora_that_fits_nothing_is_refused_and_nothing_written(lib):
    base = file_id(lib, lib.sample["sd_a"])
    folder = lib.sample["sd_a"].parent
    before = set(os.listdir(folder))
    # the sample LoRA is an SDXL-shaped module: it matches nothing in an SD1 model
    lib.post("/run/lora-apply", data={"base": base, "lora_0": file_id(lib, lib.sample["lora"]), "output": "nope.safetensors"},
             headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "failed" and "inkwash.safetensors" in job.error
    assert set(os.listdir(folder)) == before
    # bad forms are refused in the page, before any job
    for form, words in (({"base": base}, "choose at least one LoRA"),
                        ({"base": base, "lora_0": base}, "cannot also be one of the LoRAs"),
                        ({"base": base, "lora_0": file_id(lib, lib.sample["lora"]), "strength_0": "nan"}, "finite"),
                        ({"base": base, "lora_0": file_id(lib, lib.sample["lora"]), "output": "../x.safetensors"}, "no folders")):
        r = lib.post("/run/lora-apply", data=form, headers=HX).text
        assert 'class="msg error"' in r and words in r, r


@pytest.mark.parametrize("form, cli_args, name", [
    ({"to": "gguf", "quant": "Q8_0"}, ["--to", "gguf", "--quant", "Q8_0"], "alpha-mix-Q8_0.gguf"),
    ({"to": "fp8-scaled"}, ["--to", "fp8-scaled"], "alpha-mix-fp8-scaled.safetensors"),
])
def test_gguf_and_fp8_scaled_jobs_have_the_cli_bytes(lib, form, cli_args, name):
    fid = file_id(lib, lib.sample["sd_a"])
    assert 'value="gguf"' in lib.get(f"/convert?file={fid}").text and "Q4_K_S" in lib.get(f"/convert?file={fid}").text
    lib.post("/run/convert", data={"file": fid, "preset": "", **form}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100 and job.total > 1000  # the real byte total (GGUF: header and padded tensors)
    out = job.result["outputs"][0]
    assert out["name"] == name and out["id"], out
    row = lib.web.conn.execute("SELECT format FROM files WHERE id = ?", (out["id"],)).fetchone()
    assert row["format"] == ("gguf" if name.endswith(".gguf") else "safetensors")
    assert name in lib.get("/").text
    cli = lib.base / "cli" / name
    cli.parent.mkdir()
    r = run_cli("convert", lib.sample["sd_a"], *cli_args, "-o", cli)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == Path(out["path"]).read_bytes()


def test_diffusers_folder_job_has_the_cli_files(lib):
    fid = file_id(lib, lib.sample["sd_a"])
    lib.post("/run/convert", data={"file": fid, "to": "diffusers", "variant": "fp16", "output": "alpha-diffusers"}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100
    folder = Path(job.result["outputs"][0]["path"])
    assert folder.name == "alpha-diffusers" and (folder / "model_index.json").is_file()
    linked = {o["name"] for o in job.result["outputs"][1:] if o["id"]}
    assert "alpha-diffusers/unet/diffusion_pytorch_model.fp16.safetensors" in linked, linked
    cli = lib.base / "cli" / "alpha-diffusers"
    cli.parent.mkdir()
    r = run_cli("convert", lib.sample["sd_a"], "--to", "diffusers", "--variant", "fp16", "-o", cli)
    assert r.returncode == 0, r.stderr
    ours = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert ours == sorted(str(p.relative_to(cli)) for p in cli.rglob("*") if p.is_file())
    for rel in ours:
        assert (folder / rel).read_bytes() == (cli / rel).read_bytes(), rel


def test_target_options_are_checked_in_the_page(lib):
    fid = file_id(lib, lib.sample["sd_a"])
    for form, words in (({"to": "gguf", "quant": "Q8_0", "dtype": "fp16"}, "does not combine"),
                        ({"to": "gguf", "quant": "Q9_9"}, "Q9_9"),
                        ({"to": "gguf", "quant": "Q8_0", "output": "x.safetensors"}, "ending in .gguf"),
                        ({"to": "fp8-scaled", "prune": "1"}, "does not combine"),
                        ({"to": "diffusers", "output": "x.safetensors"}, "folder name"),
                        ({"to": "diffusers", "extract": "vae"}, "cannot be combined"),
                        ({"to": "zip"}, "is not one of")):
        r = lib.post("/run/convert", data={"file": fid, **form}, headers=HX).text
        assert 'class="msg error"' in r and words in r, (form, r)


@pytest.mark.parametrize("form, leftover", [
    ({"to": "gguf", "quant": "Q8_0", "output": "cancel.gguf"}, "cancel.gguf"),
    ({"to": "diffusers", "output": "cancel-folder"}, "cancel-folder"),
])
def test_cancelled_gguf_and_diffusers_jobs_leave_nothing(tmp_path, form, leftover):
    sample = build(tmp_path)
    with client_for(tmp_path, sample, progress_delay=0.05) as lib:
        folder = sample["sd_fp32"].parent
        before = set(os.listdir(folder))
        lib.post("/run/convert", data={"file": file_id(lib, sample["sd_fp32"]), **form}, headers=HX)
        job = last_job(lib)
        end = time.monotonic() + 60
        while not (job.state == "running" and job.done > 0):
            assert time.monotonic() < end and job.state in ("queued", "running"), (job.state, job.error)
            time.sleep(0.02)
        lib.post(f"/jobs/{job.id}/cancel", headers=HX)
        assert wait_job(lib, job.id).state == "cancelled"
        assert set(os.listdir(folder)) == before, set(os.listdir(folder)) - before
        assert not partials(folder)


def test_convert_replace_parts_has_the_cli_bytes(lib):
    """`convert --replace vae=FILE --replace unet=FILE` from the convert form: the donors chosen
    from the library, the bytes the CLI writes; bad rows refused in the page."""
    a, b, vae = lib.sample["sd_a"], lib.sample["sd_b"], lib.sample["vae"]
    fid = file_id(lib, a)
    page = lib.get(f"/convert?file={fid}").text
    assert 'name="replace_part_0"' in page and 'name="replace_file_0"' in page and "kl-f8.safetensors" in page
    form = {"file": fid, "replace_part_0": "vae", "replace_file_0": file_id(lib, vae),
            "replace_part_1": "unet", "replace_file_1": file_id(lib, b), "output": "swapped.safetensors"}
    assert "queued" in lib.post("/run/convert", data=form, headers=HX).text
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    out = job.result["outputs"][0]
    assert job.percent == 100 and out["id"] and out["name"] == "swapped.safetensors"
    (lib.base / "cli").mkdir()
    cli = lib.base / "cli" / "swapped.safetensors"
    r = run_cli("convert", a, "--replace", f"vae={vae}", "--replace", f"unet={b}", "-o", cli)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == Path(out["path"]).read_bytes()
    plain = lib.base / "cli" / "plain.safetensors"
    assert run_cli("convert", a, "-o", plain).returncode == 0 and plain.read_bytes() != cli.read_bytes()
    folder = a.parent
    before = set(os.listdir(folder))
    for bad, words in (({"replace_part_0": "vae"}, "choose both"),
                       ({"replace_file_0": file_id(lib, vae)}, "choose both"),
                       ({"replace_part_0": "lora", "replace_file_0": file_id(lib, vae)}, "is not one of"),
                       ({"replace_part_0": "vae", "replace_file_0": fid}, "another file than the model itself"),
                       ({"replace_part_0": "vae", "replace_file_0": "999999"}, "no file 999999"),
                       ({"replace_part_0": "vae", "replace_file_0": file_id(lib, vae), "bake_vae": file_id(lib, vae)},
                        "both replace the VAE")):
        r = html.unescape(lib.post("/run/convert", data={"file": fid, "output": "no.safetensors", **bad}, headers=HX).text)
        assert 'class="msg error"' in r and words in r, (bad, r)
    assert set(os.listdir(folder)) == before
