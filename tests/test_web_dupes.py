"""Duplicates at another precision (sdtk.library.precision_dupes): an fp16 or bf16 file written by
`sdtk convert --dtype` from an fp32 one is found and checked on its values; a different model of
the same architecture and size is not called a duplicate; a full check reads every tensor."""
import re

import numpy as np
import pytest

from conftest import run_cli
from helpers_lora import write_tensors
from helpers_merge import tensors
from helpers_webapp import HX, build, client_for, file_id, last_job, wait_job
from sdtk.library.precision_dupes import SAMPLE, same_weights


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    base = tmp_path_factory.mktemp("precision")
    sample = build(base)
    fp32 = sample["sd_fp32"]
    for dtype in ("fp16", "bf16"):
        out = fp32.parent / f"gamma-{dtype}.safetensors"
        assert run_cli("convert", fp32, "--dtype", dtype, "-o", out).returncode == 0
        sample[dtype] = out
    with client_for(base, sample) as client:
        client.post("/run/index", headers=HX)
        assert wait_job(client, last_job(client).id).state == "done"
        client.sample = sample
        yield client


def section(page, title):
    start = page.index(f"<h2>{title}</h2>")
    return page[start:page.index("<h2>", start + 5)]


def test_casts_are_found_and_other_models_are_not(lib):
    part = section(lib.get("/dupes").text, "Same weights at another precision")
    assert "gamma-fp32.safetensors" in part and "gamma-fp16.safetensors" in part and "gamma-bf16.safetensors" in part
    assert "alpha-mix.safetensors" not in part and "beta-mix.safetensors" not in part  # same architecture and size, other values
    assert len(re.findall(rf"checked on {SAMPLE} of \d+ tensors", part)) == 2
    assert "Verify every tensor" in part and "Move to the trash" in part


def test_verify_job_reads_every_tensor(lib):
    a, b = file_id(lib, lib.sample["sd_fp32"]), file_id(lib, lib.sample["fp16"])
    lib.post("/run/verify", data={"model_a": a, "model_b": b}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done" and job.result["verdict"] == "same weights" and job.percent == 100
    lib.post("/run/verify", data={"model_a": a, "model_b": file_id(lib, lib.sample["sd_a"])}, headers=HX)
    job = wait_job(lib, last_job(lib).id)
    assert job.state == "done" and job.result["verdict"] == "different"


def test_a_change_outside_the_sample_is_found_by_the_full_check(lib, tmp_path):
    values = tensors(lib.sample["fp16"])
    keys = sorted(values)
    sampled = {keys[round(i * (len(keys) - 1) / (SAMPLE - 1))] for i in range(SAMPLE)}
    victim = next(k for k in keys if k not in sampled and values[k].dtype == np.float16 and values[k].size > 1)
    values[victim] = values[victim].copy()
    values[victim].flat[0] += np.float16(0.5)
    edited = write_tensors(tmp_path / "edited.safetensors", values)
    quick = same_weights(str(lib.sample["sd_fp32"]), str(edited))
    full = same_weights(str(lib.sample["sd_fp32"]), str(edited), sample=None)
    assert quick.same and quick.checked == SAMPLE  # the page's quick check says "checked on 6 of N": a sample
    assert not full.same and victim in full.reason
    assert not same_weights(str(lib.sample["fp16"]), str(lib.sample["bf16"])).same  # fp16 vs bf16: neither is a cast
