"""sdtk serve's jobs and pages over HTTP (in-process): convert to 100% with the output linked into
the library, cancel = no file, two queued jobs, a merge with the same bytes as the CLI's, a file
changed since indexed, two tabs writing one file, duplicates moved to the quarantine and back."""
import os
import shutil
import time

import pytest

from conftest import run_cli
from helpers_webapp import HX, build, client_for, file_id, last_job, wait_job


@pytest.fixture
def lib(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample) as client:
        client.sample, client.base = sample, tmp_path
        yield client


def partials(folder):
    return [p for p in os.listdir(folder) if p.endswith(".sdtk-partial")]


def test_library_page_search_filters_and_model_page(lib):
    page = lib.get("/").text
    assert "10 files" in page
    for name in ("alpha-mix.safetensors", "inkwash.safetensors", "kl-f8.safetensors", "bad-hands.pt", "free-model.ckpt"):
        assert name in page
    rows = lib.get("/library/rows?q=ink+wash").text  # a trigger word from the .civitai.info
    assert "inkwash.safetensors" in rows and "alpha-mix" not in rows and "1 file" in rows
    rows = lib.get("/library/rows?kind=vae").text
    assert "kl-f8.safetensors" in rows and "alpha-mix" not in rows
    rows = lib.get("/library/rows?architecture=stable-diffusion-v1").text
    assert "alpha-mix" in rows and "inkwash" not in rows
    rows = lib.get("/library/rows?problems=1").text
    assert "free-model.ckpt" in rows and "inkwash" not in rows  # (scaled-down test models have a problem too)
    sizes = lib.get("/library/rows?sort=size").text
    assert sizes.index("v1-5-pruned.ckpt") < sizes.index("kl-f8.safetensors")
    ink = lib.get(f"/model/{file_id(lib, lib.sample['lora'])}").text
    assert "ink wash" in ink and "Ink Wash" in ink and "/preview/" in ink and "LoRA" in ink
    demo = file_id(lib, lib.sample["demo_ckpt"])
    en, ja = lib.get(f"/model/{demo}").text, lib.get(f"/model/{demo}?lang=ja").text
    assert "EMA copy of the UNet" in en and "Convert for generation" in en and 'name="preset" value="generation"' in en
    assert "UNet の EMA コピー" in ja
    assert "Stable Diffusion 1.x" in lib.get(f"/model/{demo}?lang=ru").text
    assert lib.get("/model/999999").status_code == 404


def test_convert_job_reaches_100_and_output_is_in_the_library(lib):
    demo = file_id(lib, lib.sample["demo_ckpt"])
    r = lib.post("/run/convert", data={"file": demo, "preset": "generation"}, headers=HX)
    assert "queued" in r.text
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100
    out = job.result["outputs"][0]
    assert out["id"] and os.path.isfile(out["path"]) and out["name"] == "v1-5-pruned-fp16-emaonly.safetensors"
    assert out["name"] in lib.get("/").text
    page = lib.get(f"/model/{out['id']}").text
    assert "fp16" in page and "lineage" in page.lower()
    # the same conversion with the CLI gives the same bytes (same file name: the title is taken from it)
    (lib.base / "cli").mkdir()
    cli_out = lib.base / "cli" / out["name"]
    assert run_cli("convert", lib.sample["demo_ckpt"], "--for", "generation", "-o", cli_out).returncode == 0
    assert cli_out.read_bytes() == open(out["path"], "rb").read()


def test_cancel_leaves_no_file_and_second_job_waits(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample, progress_delay=0.05) as lib:
        folder = sample["sd_fp32"].parent
        before = set(os.listdir(folder))
        fid = file_id(lib, sample["sd_fp32"])
        lib.post("/run/convert", data={"file": fid, "dtype": "fp16", "output": "cancelled.safetensors"}, headers=HX)
        first = last_job(lib)
        lib.post("/run/convert", data={"file": fid, "dtype": "bf16", "output": "second.safetensors"}, headers=HX)
        second = last_job(lib)
        end = time.monotonic() + 60
        while not (first.state == "running" and first.done > 0 and partials(folder)):
            assert time.monotonic() < end, "the first job never started writing"
            time.sleep(0.02)
        assert second.state == "queued"  # two jobs queued: one at a time
        assert "Cancel" in lib.get("/jobs/%d" % first.id).text
        lib.post(f"/jobs/{first.id}/cancel", headers=HX)
        assert wait_job(lib, first.id).state == "cancelled"
        assert not os.path.exists(folder / "cancelled.safetensors")
        job2 = wait_job(lib, second.id, ("running", "done", "failed", "cancelled"))
        lib.post(f"/jobs/{second.id}/cancel", headers=HX)
        assert wait_job(lib, second.id).state in ("cancelled", "done")
        if second.state == "cancelled":
            assert not os.path.exists(folder / "second.safetensors")
        assert not partials(folder)
        assert set(os.listdir(folder)) - before <= {"second.safetensors"}


def test_two_queued_jobs_both_finish(lib):
    a, b = file_id(lib, lib.sample["sd_a"]), file_id(lib, lib.sample["sd_b"])
    lib.post("/run/convert", data={"file": a, "dtype": "bf16"}, headers=HX)
    first = last_job(lib)
    lib.post("/run/convert", data={"file": b, "dtype": "bf16"}, headers=HX)
    second = last_job(lib)
    assert second.id == first.id + 1
    assert wait_job(lib, first.id).state == "done" and wait_job(lib, second.id).state == "done"
    assert first.finished <= second.started
    names = lib.get("/").text
    assert "alpha-mix-bf16.safetensors" in names and "beta-mix-bf16.safetensors" in names


def test_block_weight_merge_has_the_cli_bytes(lib):
    a, b = file_id(lib, lib.sample["sd_a"]), file_id(lib, lib.sample["sd_b"])
    page = lib.get(f"/merge?a={a}").text
    assert "beta-mix.safetensors" in page and "GRAD_V" in page and "OUT11" in page
    custom = [str(round(i / 25, 4)) for i in range(26)]
    form = {"model_a": a, "model_b": b, "method": "weighted-sum", "alpha": "0.3", "use_blocks": "1", "block_preset": "",
            **{f"block_{i}": v for i, v in enumerate(custom)}, "output": "web-merge.safetensors", "te": "merge", "vae": "merge"}
    preview = lib.post("/merge/preview", data=form, headers=HX).text
    assert "weighted-sum" in preview and "alpha-mix.safetensors" in preview and custom[5] in preview
    recipe = lib.get("/merge/recipe.yaml", params=form)
    assert recipe.status_code == 200 and "attachment" in recipe.headers["content-disposition"]
    lib.post("/run/merge", data=form, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    cli_out = lib.base / "cli-merge.safetensors"
    r = run_cli("merge", lib.sample["sd_a"], lib.sample["sd_b"], "-o", cli_out, "-a", "0.3", "--blocks", ",".join(custom))
    assert r.returncode == 0, r.stderr
    assert cli_out.read_bytes() == open(job.result["outputs"][0]["path"], "rb").read()
    # the recipe the page exported reproduces it with the CLI too
    (lib.sample["sd_a"].parent / "recipe.yaml").write_text(recipe.text)
    again = lib.base / "from-recipe.safetensors"
    r = run_cli("merge", "--recipe", lib.sample["sd_a"].parent / "recipe.yaml", "-o", again)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == cli_out.read_bytes()


def test_file_changed_since_indexed_is_refused(lib):
    vae = lib.sample["vae"]
    fid = file_id(lib, vae)
    with open(vae, "ab") as f:
        f.write(b"\0" * 8)
    lib.post("/run/hash", data={"file": fid}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "failed" and "changed since it was indexed" in job.error
    assert lib.get("/").status_code == 200  # the server keeps running


def test_two_tabs_writing_the_same_file(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample, progress_delay=0.02) as lib:
        fid = file_id(lib, sample["sd_fp32"])
        data = {"file": fid, "dtype": "fp16", "output": "same.safetensors"}
        assert "queued" in lib.post("/run/convert", data=data, headers=HX).text
        second = lib.post("/run/convert", data=data, headers=HX).text
        assert "another job is already writing this file" in second
        first = wait_job(lib, last_job(lib).id)
        assert first.state == "done"
        third = lib.post("/run/convert", data=data, headers=HX).text  # now it exists: refused by the job, said in the page
        if "queued" in third:
            job = wait_job(lib, last_job(lib).id)
            assert job.state == "failed" and "already exists" in job.error


def test_hash_and_scan_jobs(lib):
    fid = file_id(lib, lib.sample["sd_a"])
    lib.post("/run/hash", data={"file": fid}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done" and job.result["matches_library"]
    row = lib.web.conn.execute("SELECT sha256 FROM files WHERE id = ?", (fid,)).fetchone()
    assert job.result["hashes"]["SHA256"] == row["sha256"].upper()
    lib.post("/run/scan", data={"file": fid}, headers=HX)
    assert wait_job(lib, last_job(lib).id).result["verdict"] == "safe"


@pytest.fixture
def lib_quarantine(tmp_path):
    sample = build(tmp_path)
    with client_for(tmp_path, sample, removal="quarantine") as client:  # `sdtk serve --remove-to quarantine`
        client.sample, client.base = sample, tmp_path
        yield client


def test_duplicates_quarantine_and_undo(lib_quarantine):
    lib = lib_quarantine
    copy = lib.sample["sd_b"].parent / "beta-copy.safetensors"
    shutil.copy2(lib.sample["sd_b"], copy)
    lib.post("/run/index", headers=HX)
    assert wait_job(lib, last_job(lib).id).state == "done"
    page = lib.get("/dupes").text
    assert "beta-copy.safetensors" in page and "8.56 MB reclaimable" in page
    assert "beta-copy.safetensors" in lib.get("/library/rows?dupes=1").text
    fid = file_id(lib, copy)
    r = lib.post("/dupes/remove", data={"file": fid}, headers=HX).text
    assert "moved 1 file(s) to the quarantine" in r
    assert not copy.exists()
    moved = list((lib.sample["root"] / ".sdtk-quarantine").rglob("beta-copy.safetensors"))
    assert len(moved) == 1 and moved[0].read_bytes() == lib.sample["sd_b"].read_bytes()
    assert "beta-copy.safetensors" not in lib.get("/").text
    page = lib.get("/dupes").text
    assert "Undo" in page
    batch = lib.web.undo_log.execute("SELECT batch FROM moves").fetchone()["batch"]
    assert "moved back" in lib.post("/dupes/undo", data={"batch": batch}, headers=HX).text
    assert copy.read_bytes() == lib.sample["sd_b"].read_bytes()
    assert "beta-copy.safetensors" in lib.get("/").text
    assert "nothing to undo" in lib.post("/dupes/undo", data={"batch": batch}, headers=HX).text


def test_new_roots_indexed_in_the_background(tmp_path):
    from helpers_web import sample_library
    sample = sample_library(tmp_path)
    with client_for(tmp_path, sample, index_roots=[os.path.realpath(sample["root"])]) as lib:
        job = wait_job(lib, lib.web.queue.jobs()[-1].id)
        assert job.op == "index" and job.state == "done" and job.result["seen"] == 10
        assert "10 files" in lib.get("/").text


def test_per_block_similarity_beside_the_sliders_is_the_cli_diff(lib):
    import json as _json
    a, b = file_id(lib, lib.sample["sd_a"]), file_id(lib, lib.sample["sd_b"])
    assert "Compare A and B per block" in lib.get(f"/merge/similarity?model_a={a}&model_b={b}").text
    lib.post("/run/diff", data={"model_a": a, "model_b": b}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    html = lib.get(f"/merge/similarity?model_a={a}&model_b={b}").text
    r = run_cli("diff", lib.sample["sd_a"], lib.sample["sd_b"], "--json")
    cli = _json.loads(r.stdout)
    assert list(cli["blocks"]) == list(job.result["blocks"])
    for name, row in cli["blocks"].items():
        assert f"<span>{name}</span> <strong>{row['cosine']:.4f}</strong>" in html


def test_vanished_and_unreadable_files_are_a_message_not_a_crash(lib):
    vae = lib.sample["vae"]
    fid = file_id(lib, vae)
    os.unlink(vae)
    page = lib.get(f"/model/{fid}")
    assert page.status_code == 200 and "no longer there" in page.text
    r = lib.post("/run/convert", data={"file": fid}, headers=HX).text
    assert 'class="msg error"' in r and "no longer there" in r
    emb = lib.sample["embedding"]
    eid = file_id(lib, emb)
    emb.write_bytes(b"PK\x03\x04 truncated")  # now a broken zip
    page = lib.get(f"/model/{eid}").text
    assert "Unreadable" in page or "changed" in page
    assert lib.get("/").status_code == 200
