"""sdtk serve's `lora merge` and `lora resize` jobs: the form pages reached from a LoRA's page, the
bytes the CLI writes for the same options, the output linked into the library, bad forms refused
in the page, a job on a file that changed meanwhile failing with a message, and a cancelled job
leaving no file."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from helpers_lora import lora_family, write_tensors
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


def two_loras(lib):
    folder = lib.sample["lora"].parent
    one = matched_lora(lib.sample["sd_a"], folder / "detail.safetensors", 1)
    two = matched_lora(lib.sample["sd_a"], folder / "style.safetensors", 2)
    index_again(lib)
    return one, two


def cli_output(lib, name, *args):
    out = lib.base / "cli" / name
    out.parent.mkdir(exist_ok=True)
    r = run_cli("lora", *args, "-o", out)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def test_lora_merge_job_has_the_cli_bytes(lib):
    one, two = two_loras(lib)
    one_id, two_id = file_id(lib, one), file_id(lib, two)
    assert f'href="/lora/merge?lora={one_id}"' in lib.get(f"/model/{one_id}").text
    page = lib.get(f"/lora/merge?lora={one_id}").text
    assert f'<option value="{one_id}" selected>' in page and "style.safetensors" in page and 'name="weight_1"' in page
    form = {"lora_0": one_id, "weight_0": "0.7", "lora_1": two_id, "weight_1": "-0.25", "lora_2": "", "dtype": "fp16",
            "output": "together.safetensors"}
    assert "queued" in lib.post("/run/lora-merge", data=form, headers=HX).text
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100 and job.total > 0 and job.result["modules"] == 2 and job.result["ranks"] == {"8": 2}
    out = job.result["outputs"][0]
    assert out["id"] and out["name"] == "together.safetensors" and Path(out["path"]).parent == one.parent
    row = lib.web.conn.execute("SELECT kind FROM files WHERE id = ?", (out["id"],)).fetchone()
    assert row["kind"] == "lora" and "together.safetensors" in lib.get("/").text
    assert any("2 modules (rank 8: 2)" in line for line in job.log)
    assert cli_output(lib, "together.safetensors", "merge", f"{one}:0.7", f"{two}:-0.25", "--dtype", "fp16") == \
        Path(out["path"]).read_bytes()


@pytest.mark.parametrize("form, cli_args, name", [
    ({"rank": "2"}, ["--rank", "2"], "detail-rank2.safetensors"),
    ({"rank": "3", "dynamic": "sv_fro", "dynamic_param": "0.9"}, ["--rank", "3", "--dynamic", "sv_fro:0.9"],
     "detail-rank3-sv_fro.safetensors"),
])
def test_lora_resize_job_has_the_cli_bytes(lib, form, cli_args, name):
    one, _ = two_loras(lib)
    fid = file_id(lib, one)
    assert f'href="/lora/resize?file={fid}"' in lib.get(f"/model/{fid}").text
    page = lib.get(f"/lora/resize?file={fid}").text
    assert "Current rank: 4" in page and 'value="sv_cumulative"' in page
    lib.post("/run/lora-resize", data={"file": fid, **form}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done", job.error
    assert job.percent == 100 and job.result["modules"] == 2
    out = job.result["outputs"][0]
    assert out["id"] and out["name"] == name and name in lib.get("/").text
    assert any("Frobenius norm retained" in line for line in job.log)
    assert cli_output(lib, name, "resize", one, *cli_args) == Path(out["path"]).read_bytes()


def test_bad_lora_forms_are_refused_in_the_page(lib):
    one, two = two_loras(lib)
    a, b = file_id(lib, one), file_id(lib, two)
    folder = one.parent
    before = set(os.listdir(folder))
    for op, form, words in (
            ("lora-merge", {"lora_0": a}, "two or more LoRAs"),
            ("lora-merge", {"lora_0": a, "lora_1": a}, "chosen twice"),
            ("lora-merge", {"lora_0": a, "lora_1": b, "weight_1": "inf"}, "finite"),
            ("lora-merge", {"lora_0": a, "lora_1": b, "output": "../x.safetensors"}, "no folders"),
            ("lora-merge", {"lora_0": a, "lora_1": b, "output": "detail.safetensors"}, "cannot be one of the LoRAs"),
            ("lora-merge", {"lora_0": a, "lora_1": "999999"}, "no file 999999"),
            ("lora-merge", {"lora_0": a, "lora_1": "../1"}, "choose a file"),
            ("lora-merge", {"lora_0": a, "lora_1": b, "dtype": "int8"}, "is not one of"),
            ("lora-resize", {"file": a, "rank": "0"}, "at least 1"),
            ("lora-resize", {"file": a, "rank": "two"}, "whole number"),
            ("lora-resize", {"file": a, "rank": "2", "dynamic": "sv_max"}, "is not one of"),
            ("lora-resize", {"file": a, "rank": "2", "dynamic": "sv_ratio"}, "give its number"),
            ("lora-resize", {"file": a, "rank": "2", "output": "detail.safetensors"}, "cannot be the LoRA itself"),
            ("lora-resize", {"file": a, "rank": "2", "output": "/tmp/x.safetensors"}, "no folders"),
            ("lora-resize", {"file": "", "rank": "2"}, "choose a file")):
        r = lib.post(f"/run/{op}", data=form, headers=HX).text
        assert 'class="msg error"' in r and words in r, (op, form, r)
    assert set(os.listdir(folder)) == before
    assert lib.get("/lora/resize?file=999999").status_code == 404


def big_lora(path: Path, modules: int, seed: int, rank: int = 4) -> Path:
    """A kohya LoRA of `modules` modules (names need not fit a model: merge and resize do not read one)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(modules):
        tensors.update(lora_family(f"lora_unet_block_{i}_proj", "lora", (32, 32), rng, rank=rank, alpha=2.0))
    return write_tensors(path, tensors, {"ss_network_module": "networks.lora"})


def test_lora_jobs_refuse_what_does_not_fit_or_changed_meanwhile(lib):
    one, two = two_loras(lib)
    folder = one.parent
    # the same module names as detail.safetensors, other shapes: refused, nothing written
    rng = np.random.default_rng(3)
    odd = write_tensors(folder / "odd.safetensors", {
        **lora_family("lora_unet_down_blocks_0_attentions_0_proj_in", "lora", (8, 8), rng),
        **lora_family("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q", "lora", (8, 8), rng)},
        {"ss_network_module": "networks.lora"})
    index_again(lib)
    before = set(os.listdir(folder))
    lib.post("/run/lora-merge", data={"lora_0": file_id(lib, one), "lora_1": file_id(lib, odd), "output": "no.safetensors"},
             headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "failed" and "has shape" in job.error and "odd.safetensors" in job.error
    assert any("has shape" in line for line in job.log) or job.error
    assert set(os.listdir(folder)) == before
    # a file that changed after it was indexed: the job fails with a message, the server keeps serving
    fid = file_id(lib, two)
    two.write_bytes(two.read_bytes() + b" ")
    lib.post("/run/lora-resize", data={"file": fid, "rank": "2", "output": "stale.safetensors"}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "failed" and "changed since it was indexed" in job.error
    assert not (folder / "stale.safetensors").exists()
    assert lib.get("/").status_code == 200 and lib.get(f"/jobs/{job.id}").status_code == 200


@pytest.mark.parametrize("op", ["lora-merge", "lora-resize"])
def test_cancelled_lora_jobs_leave_nothing(tmp_path, op):
    sample = build(tmp_path)
    folder = sample["lora"].parent
    a, b = big_lora(folder / "wide-a.safetensors", 60, 1), big_lora(folder / "wide-b.safetensors", 60, 2)
    from sdtk.library import open_library, scan_library

    conn = open_library(tmp_path / "lib.db")
    scan_library(conn, [str(sample["root"])])
    conn.close()
    with client_for(tmp_path, sample, progress_delay=0.05) as lib:
        before = set(os.listdir(folder))
        form = ({"lora_0": file_id(lib, a), "lora_1": file_id(lib, b), "output": "cancel.safetensors"} if op == "lora-merge"
                else {"file": file_id(lib, a), "rank": "2", "output": "cancel.safetensors"})
        lib.post(f"/run/{op}", data=form, headers=HX)
        job = last_job(lib)
        end = time.monotonic() + 60
        while not (job.state == "running" and job.done > 0):
            assert time.monotonic() < end and job.state in ("queued", "running"), (job.state, job.error)
            time.sleep(0.02)
        lib.post(f"/jobs/{job.id}/cancel", headers=HX)
        assert wait_job(lib, job.id).state == "cancelled"
        assert set(os.listdir(folder)) == before, set(os.listdir(folder)) - before
        assert not [p for p in os.listdir(folder) if ".sdtk-partial" in p]
