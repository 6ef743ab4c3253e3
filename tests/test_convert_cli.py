"""`sdtk convert` end to end: presets on full-size sparse files, container-only conversion,
metadata and lineage, naming, sidecars, --replace-input, batch folders, bad input, atomicity."""
from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli
from helpers_convert import files_in, metadata_of, read_all, sha256_of, write_layout
from sdtk.errors import OutputError
from sdtk.formats import open_model
from sdtk.ops.convert import ConvertOptions, convert_file, resolve_options
from sdtk.ops.model_facts import model_facts
from sdtk.samples import load_layout, write_sparse_safetensors

PUBLISHED_FP16_EMAONLY_BYTES = 2_132_650_708  # v1-5-pruned-emaonly fp16 safetensors (architectures.md)


@pytest.fixture(scope="module")
def sparse_sd15_full(tmp_path_factory):
    """The full-size sd15-full-ema layout (7.7 GB fp32), as a sparse zero-filled file."""
    folder = tmp_path_factory.mktemp("full")
    path = folder / "v1-5-pruned.safetensors"
    write_sparse_safetensors(path, load_layout("sd15-full-ema"))
    yield path
    for p in folder.iterdir():
        p.unlink()


def planned_size(conv, with_hashes: bool = True) -> int:
    """Bytes the writer produces for a planned output: header (with the final metadata) + tensors."""
    from sdtk.formats.safetensors import build_header
    from sdtk.ops.convert import _metadata_for

    from sdtk.ops.convert import choose_destinations

    out = conv.outputs[0]
    choose_destinations(conv, None, None, ConvertOptions())  # the name goes into modelspec.title
    meta = _metadata_for(Catalogue_of(conv), conv, out, ConvertOptions(),
                         {n: "0" * 64 for n in ("sha256", "autov3", "content_v2")} if with_hashes else {})
    return len(build_header(out.plan, meta)) + sum(t.nbytes for t in out.plan)


def plan_only(path, with_hashes: bool = True, **options):
    import contextlib

    from sdtk.ops.convert import plan_conversion

    with contextlib.ExitStack() as stack:
        cat = stack.enter_context(open_model(path))
        conv = plan_conversion(cat, resolve_options(ConvertOptions(**options)), stack)
        conv._cat = cat
        return conv, planned_size(conv, with_hashes)


def Catalogue_of(conv):
    return conv._cat


def test_for_generation_full_size_matches_published_size(sparse_sd15_full):
    """The full-size 7.7 GB layout: the planned output (exactly what the writer writes, see the next
    test) is within 0.1% of the published fp16 emaonly file. bench/bench_convert.py writes it."""
    conv, size = plan_only(sparse_sd15_full, preset="generation")
    assert abs(size - PUBLISHED_FP16_EMAONLY_BYTES) / PUBLISHED_FP16_EMAONLY_BYTES < 0.001, size
    plan = conv.outputs[0].plan
    assert len(plan) == 1143 and conv.weight_set == "ema"
    assert {t.dtype.short for t in plan} == {"fp16", "int64"}
    assert any("EMA weights" in n and "A1111" in n for n in conv.notes)  # the choice is explained


def test_for_training_full_size_keeps_all_1831_tensors(sparse_sd15_full):
    conv, size = plan_only(sparse_sd15_full, preset="training")
    plan = conv.outputs[0].plan
    assert len(plan) == 1831 and [t.name for t in plan] == [k for k, _, _ in load_layout("sd15-full-ema").tensors]
    assert size > 7_700_000_000


def test_written_size_is_the_planned_size_and_readable(tmp_path):
    """Scaled down, written for real: the file has the planned size, the reference safetensors
    library reads it, and it is re-identified (no EMA, fp16, SD1)."""
    from safetensors import safe_open

    src = write_layout(tmp_path / "v1-5-pruned.safetensors", "sd15-full-ema", scale=16)
    for preset, count in (("generation", 1143), ("training", 1831)):
        _, size = plan_only(src, with_hashes=False, preset=preset)
        r = run_cli("convert", src, "--for", preset, "--json", "--no-source-hash")
        assert r.returncode == 0, r.stderr
        out = Path(json.loads(r.stdout)["outputs"][0]["path"])
        assert out.stat().st_size == size
        with safe_open(str(out), "np") as f:
            assert len(list(f.keys())) == count
            assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
        with open_model(out) as cat:
            facts = model_facts(cat)
            assert facts.architecture == "stable-diffusion-v1" and facts.has_ema == (preset == "training")


def test_full_size_generation_output_is_reidentified(tmp_path):
    """Full-size fp16 training layout (sparse) -> --for generation: the output (written for real,
    2.1 GB) is re-identified by `identify` as an SD1 checkpoint, fp16, without EMA."""
    from sdtk.identify import identify_path

    src = tmp_path / "v1-5-full-fp16.safetensors"
    write_sparse_safetensors(src, load_layout("sd15-full-ema").with_dtype("float16"))
    try:
        r = run_cli("convert", src, "--for", "generation", "--json", "--no-source-hash")
        assert r.returncode == 0, r.stderr
        out = Path(json.loads(r.stdout)["outputs"][0]["path"])
        ident = identify_path(out)
        assert (ident.kind, ident.architecture, ident.has_ema, ident.precision) == (
            "checkpoint", "stable-diffusion-v1", False, "fp16")
        assert ident.tensor_count == 1143
        assert abs(out.stat().st_size - PUBLISHED_FP16_EMAONLY_BYTES) / PUBLISHED_FP16_EMAONLY_BYTES < 0.001
    finally:
        for p in tmp_path.iterdir():
            p.unlink()


def test_full_size_extracted_parts_are_reidentified(tmp_path):
    """Parts extracted from a full-size SD1 file are recognised by `identify` as what they are."""
    from sdtk.identify import identify_path

    src = tmp_path / "sd15-fp16.safetensors"
    write_sparse_safetensors(src, load_layout("sd15-emaonly").with_dtype("float16"))
    try:
        conv, _ = convert_file(src, resolve_options(ConvertOptions(extract=["vae", "text-encoders"], source_hashes=False)))
        kinds = {o.part: identify_path(o.dest) for o in conv.outputs}
        assert (kinds["vae"].kind, kinds["vae"].architecture) == ("vae", "sd-vae-kl-f8")
        assert (kinds["clip-l"].kind, kinds["clip-l"].architecture) == ("text-encoder", "clip-l")
        assert metadata_of(conv.outputs[0].dest)["modelspec.architecture"] == "stable-diffusion-v1/vae"
    finally:
        for p in tmp_path.iterdir():
            p.unlink()


def test_container_only_is_bit_identical_and_keeps_metadata(tmp_path):
    src = write_layout(tmp_path / "in.safetensors", "sd15-emaonly", scale=16,
                       metadata={"ss_sd_model_name": "base", "modelspec.title": "Mine"})
    r = run_cli("convert", src, tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    got, want = read_all(tmp_path / "out.safetensors"), read_all(src)
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)
    meta = metadata_of(tmp_path / "out.safetensors")
    assert meta["ss_sd_model_name"] == "base" and meta["modelspec.title"] == "Mine"  # kept, not overwritten
    lineage = json.loads(meta["sdtk.lineage"])
    assert lineage[-1]["source"] == "in.safetensors"
    assert lineage[-1]["source_sha256"] == sha256_of(src)  # patched in after the background hash
    from sdtk.hashing.content import content_hash_v2

    with open_model(src) as cat, open_model(tmp_path / "out.safetensors") as out:
        assert lineage[-1]["source_content_v2"] == content_hash_v2(cat) == content_hash_v2(out)  # same weights
    assert lineage[-1]["operations"] == []


def test_lineage_autov3_and_chain(tmp_path):
    import hashlib

    src = write_layout(tmp_path / "a.safetensors", "sd15-emaonly", scale=16)
    first, _ = convert_file(src, resolve_options(ConvertOptions(dtype="fp16")), out_folder=tmp_path)
    mid = first.outputs[0].dest
    second, _ = convert_file(mid, resolve_options(ConvertOptions(dtype="bf16")), out_folder=tmp_path)
    meta = metadata_of(second.outputs[0].dest)
    chain = json.loads(meta["sdtk.lineage"])
    assert [step["source"] for step in chain] == ["a.safetensors", mid.name]
    assert chain[1]["operations"] == ["cast bf16 (1142 tensors)"]
    data = mid.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert chain[1]["source_autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()
    # the SD1 family default (epsilon, medium confidence) is a guess: lineage says so, ModelSpec does not
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and "modelspec.prediction_type" not in meta
    assert chain[1]["facts"] == {"architecture": "stable-diffusion-v1", "prediction_type": "epsilon",
                                 "confidence": "medium", "source": "family-default"}


def test_default_names_never_collide_and_never_overwrite(tmp_path):
    src = write_layout(tmp_path / "model.safetensors", "sd15-emaonly", scale=16)
    fp16 = resolve_options(ConvertOptions(dtype="fp16", source_hashes=False))
    for _ in range(2):
        convert_file(src, fp16)
    assert files_in(tmp_path) == ["model-fp16-2.safetensors", "model-fp16.safetensors", "model.safetensors"]
    # container-only of a .safetensors never targets the input itself
    convert_file(src, resolve_options(ConvertOptions(source_hashes=False)))
    assert "model-converted.safetensors" in files_in(tmp_path)
    # an explicit existing output is refused without --overwrite, replaced with it
    target = tmp_path / "model-fp16.safetensors"
    before = sha256_of(target)
    r = run_cli("convert", src, "-o", target, "--dtype", "bf16")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert sha256_of(target) == before
    convert_file(src, resolve_options(ConvertOptions(dtype="bf16", overwrite=True, source_hashes=False)), output=target)
    assert sha256_of(target) != before
    # the input itself is never an output
    with pytest.raises(OutputError, match="input"):
        convert_file(src, resolve_options(ConvertOptions(overwrite=True)), output=src)


def test_sd2_768_v_gets_yaml_sidecar_and_modelspec(tmp_path):
    src = write_layout(tmp_path / "v2-1_768-ema-pruned.safetensors", "sd21-768-v", scale=8)
    r = run_cli("convert", src, "--dtype", "fp16", "--prediction-type", "v", "--json", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    out = Path(summary["outputs"][0]["path"])
    sidecar = Path(summary["outputs"][0]["sidecar"])
    assert sidecar == out.with_suffix(".yaml") and sidecar.exists()
    config = yaml.safe_load(sidecar.read_text())
    assert config["model"]["params"]["parameterization"] == "v"
    assert config["model"]["params"]["unet_config"]["params"]["context_dim"] == 1024
    meta = metadata_of(out)
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    # without the statement, nothing is guessed for these scaled random weights: no yaml, and the
    # summary says how to state it
    r = run_cli("convert", src, "--dtype", "bf16", "--json", "--no-source-hash")
    summary = json.loads(r.stdout)
    assert summary["outputs"][0]["sidecar"] is None and summary["prediction_type"] is None
    assert "--prediction-type v" in summary["sidecar"]


def test_sdxl_vpred_gets_the_a1111_yaml_and_keeps_markers(tmp_path):
    """A1111 1.10 does not read the v_pred marker: the output gets sd_xl_v.yaml as <name>.yaml."""
    src = write_layout(tmp_path / "noob.safetensors", "sdxl-vpred-ztsnr", scale=16)
    r = run_cli("convert", src, "--for", "generation", "--json", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    out = Path(summary["outputs"][0]["path"])
    sidecar = Path(summary["outputs"][0]["sidecar"])
    assert sidecar == out.with_suffix(".yaml")
    config = yaml.safe_load(sidecar.read_text())
    scaling = config["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"]
    assert scaling.endswith("VScaling") and config["model"]["params"]["network_config"]["params"]["context_dim"] == 2048
    assert "v_pred marker" in summary["sidecar"] and "Zero Terminal SNR" in summary["sidecar"]
    with open_model(out) as cat:
        assert "v_pred" in cat and "ztsnr" in cat
        assert model_facts(cat).prediction_type == "v"
    assert metadata_of(out)["modelspec.prediction_type"] == "v"
    r = run_cli("convert", src, "--dtype", "bf16", "--no-sidecar", "--json", "--no-source-hash")
    summary = json.loads(r.stdout)
    assert summary["outputs"][0]["sidecar"] is None and summary["sidecar"].startswith("not written (--no-sidecar)")
    assert not Path(summary["outputs"][0]["path"]).with_suffix(".yaml").exists()


def test_sdxl_stated_v_prediction_adds_the_marker(tmp_path):
    src = write_layout(tmp_path / "vpred-no-marker.safetensors", "sdxl-base", scale=16)
    conv, summary = convert_file(src, resolve_options(ConvertOptions(prediction_type="v", source_hashes=False)))
    out = conv.outputs[0].dest
    with open_model(out) as cat:
        assert "v_pred" in cat and cat["v_pred"].shape == (0,) and len(cat) == 2516
        assert model_facts(cat).prediction_type == "v"
    assert metadata_of(out)["modelspec.prediction_type"] == "v"
    assert summary["outputs"][0]["sidecar"] == str(out.with_suffix(".yaml")) and "sd_xl_v.yaml" in summary["sidecar"]


def test_replace_input_after_verification(tmp_path):
    src = write_layout(tmp_path / "old.safetensors", "sd15-emaonly", scale=16)
    want = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in read_all(src).items()}
    r = run_cli("convert", src, "--dtype", "fp16", "--replace-input", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    assert files_in(tmp_path) == ["old.safetensors"]
    got = read_all(src)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_replace_input_keeps_input_when_verification_fails(tmp_path, monkeypatch):
    import sdtk.ops.convert as convert_mod

    src = write_layout(tmp_path / "old.safetensors", "sd15-emaonly", scale=16)
    before = sha256_of(src)

    def broken_verify(dest, plan):
        raise OutputError(dest, "verification failed: simulated")

    monkeypatch.setattr(convert_mod, "verify_output", broken_verify)
    with pytest.raises(OutputError):
        convert_file(src, resolve_options(ConvertOptions(dtype="fp16", replace_input=True)))
    assert files_in(tmp_path) == ["old.safetensors"] and sha256_of(src) == before


@pytest.mark.torch
def test_torch_saved_ckpt_converts_bit_identical_and_with_casts(tmp_path):
    """A checkpoint written by torch.save: container-only output equals torch's tensors bit for bit;
    --dtype bf16 equals torch's own cast; training state is left out and reported."""
    from conftest import torch_or_skip

    torch = torch_or_skip()
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half(),
        "first_stage_model.decoder.conv_in.weight": torch.randn(16, 4, 3, 3, generator=g).bfloat16(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model.diffusion_model.transposed": torch.randn(6, 5, generator=g).t(),  # non-contiguous storage view
    }
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 3}, src)
    r = run_cli("convert", src, tmp_path / "same.safetensors", "--json", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dropped_training_state"] == ["epoch", "global_step"]
    from safetensors.torch import load_file

    same = load_file(str(tmp_path / "same.safetensors"))
    assert set(same) == set(sd)
    for k, v in sd.items():
        assert same[k].dtype == v.dtype and torch.equal(same[k], v.contiguous()), k
    r = run_cli("convert", src, "-o", tmp_path / "bf16.safetensors", "--dtype", "bf16", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    cast = load_file(str(tmp_path / "bf16.safetensors"))
    for k, v in sd.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert cast[k].dtype == want.dtype and torch.equal(cast[k], want.contiguous()), k


def test_ckpt_replace_input_removes_ckpt_only_after_success(tmp_path):
    import numpy as np

    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.tensors import from_array

    src = tmp_path / "model.ckpt"
    bias = np.arange(4, dtype=np.float32)
    write_torch_zip(src, [from_array("model.diffusion_model.out.2.bias", bias)], wrap="state_dict")
    r = run_cli("convert", src, "--replace-input", "--no-source-hash")
    assert r.returncode == 0, r.stderr
    assert files_in(tmp_path) == ["model.safetensors"]
    from sdtk import open_model

    with open_model(tmp_path / "model.safetensors") as cat:
        assert cat["model.diffusion_model.out.2.bias"].read().tolist() == bias.tolist()


@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_failure_mid_write_leaves_nothing_and_input_intact(tmp_path, monkeypatch, failure):
    import sdtk.ops.cast as cast_mod

    src = write_layout(tmp_path / "in.safetensors", "sd15-emaonly", scale=16)
    before = sha256_of(src)
    calls = {"n": 0}
    real = cast_mod.cast_array

    def failing_cast(arr, dst):
        calls["n"] += 1
        if calls["n"] == 300:
            if failure == "disk-full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise KeyboardInterrupt
        return real(arr, dst)

    monkeypatch.setattr(cast_mod, "cast_array", failing_cast)
    expected = OutputError if failure == "disk-full" else KeyboardInterrupt
    with pytest.raises(expected) as info:
        convert_file(src, resolve_options(ConvertOptions(preset="generation")))
    if failure == "disk-full":
        assert "disk full" in str(info.value)
    assert calls["n"] >= 300  # the failure happened mid-write (prefetch may have computed a few more)
    assert files_in(tmp_path) == ["in.safetensors"] and sha256_of(src) == before


def test_ctrl_c_in_cli_exits_130_and_leaves_nothing(tmp_path, sparse_sd15_full):
    """SIGINT while the CLI writes a full-size output: exit 130, no partial file, input intact."""
    import signal
    import subprocess
    import sys
    import time

    big = sparse_sd15_full
    size_before = big.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "sdtk", "convert", str(big), "--dtype", "fp16", "-o",
                             str(tmp_path / "out.safetensors"), "--no-source-hash"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".sdtk-partial") for p in tmp_path.iterdir()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in err
    assert files_in(tmp_path) == [] and big.stat().st_size == size_before


def test_hostile_pickle_refused_before_any_output(tmp_path):
    evil = tmp_path / "evil.ckpt"
    payload = b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hiq\x00\x85q\x01Rq\x02."
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    r = run_cli("convert", evil, "--for", "generation")
    assert r.returncode == 2
    assert "evil.ckpt" in r.stderr and "Traceback" not in r.stderr
    assert files_in(tmp_path) == ["evil.ckpt"]


def test_batch_folder_converts_each_file_and_reports_failures(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    write_layout(folder / "a.safetensors", "sd15-emaonly", scale=16)
    write_layout(folder / "b.safetensors", "sdxl-base", scale=32)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("convert", folder, "-o", out, "--dtype", "fp16", "--json", "--no-source-hash")
    assert r.returncode == 2  # one file refused
    summary = json.loads(r.stdout)
    assert len(summary["converted"]) == 2 and len(summary["failed"]) == 1
    assert "broken.safetensors" in summary["failed"][0]["error"]
    assert files_in(out) == ["a-fp16.safetensors", "b-fp16.safetensors"]
    for p in out.iterdir():
        read_all(p)


def test_progress_bars_follow_the_bytes_written(tmp_path):
    """The progress display (shown on a terminal) is driven with every byte count, per file and batch."""
    from sdtk.cli.convert import _ProgressDisplay

    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    seen = []
    with _ProgressDisplay(True, batch_total=1) as progress:
        real_advance = progress.advance
        progress.advance = lambda done: (seen.append(done), real_advance(done))
        conv, _ = convert_file(src, resolve_options(ConvertOptions(dtype="fp16", source_hashes=False)), progress=progress)
        progress.next_file()
        assert progress.bars.tasks[0].completed == 1  # the batch bar
    assert len(seen) == 1143 and seen == sorted(seen)
    assert seen[-1] == conv.outputs[0].bytes_written == conv.outputs[0].dest.stat().st_size


def test_conflicting_options_exit_2(tmp_path):
    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    r = run_cli("convert", src, "--for", "training", "--ema", "drop")
    assert r.returncode == 2 and "conflicts" in r.stderr and "Traceback" not in r.stderr
    assert files_in(tmp_path) == ["m.safetensors"]


def test_missing_input_one_line(tmp_path):
    r = run_cli("convert", tmp_path / "nope.ckpt")
    assert r.returncode == 2 and "nope.ckpt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_json_summary_schema(tmp_path):
    src = write_layout(tmp_path / "m.safetensors", "sd15-full-ema", scale=16)
    r = run_cli("convert", src, "--for", "generation", "--json", "--no-source-hash")
    summary = json.loads(r.stdout)
    assert set(summary) == {"input", "architecture", "prediction_type", "weight_set", "operations", "outputs",
                            "dropped", "dropped_training_state", "overflow", "sidecar", "notes", "source_hashes",
                            "input_replaced"}
    assert summary["source_hashes"] == "skipped"
    assert summary["operations"][0].startswith("ema use")
    assert set(summary["outputs"][0]) == {"part", "path", "tensors", "bytes", "sidecar"}
    assert summary["outputs"][0]["bytes"] == Path(summary["outputs"][0]["path"]).stat().st_size


def _data_section_sha256(path: Path) -> str:
    import hashlib
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


def test_output_records_its_own_tensor_hash_and_drops_stale_ones(tmp_path):
    """With --hash-output, modelspec.hash_sha256 is "0x" + sha256 of the output's tensor bytes (what `sdtk hash` shows as
    AutoV3); the input's own hash_sha256 / sshs_model_hash (of the input's bytes) are replaced and
    kohya's sshs_legacy_hash, which cannot be recomputed, is removed."""
    stale = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
             "modelspec.hash_sha256": "0x" + "ab" * 32, "sshs_model_hash": "cd" * 32, "sshs_legacy_hash": "12345678",
             "ss_output_name": "kept"}
    src = write_layout(tmp_path / "m.safetensors", "sd15-full-ema", scale=16, metadata=stale)
    r = run_cli("convert", src, "--for", "generation", "--json", "--no-source-hash", "--hash-output")
    assert r.returncode == 0, r.stderr
    out = Path(json.loads(r.stdout)["outputs"][0]["path"])
    meta = metadata_of(out)
    data_hash = _data_section_sha256(out)
    assert meta["modelspec.hash_sha256"] == "0x" + data_hash != stale["modelspec.hash_sha256"]
    assert meta["sshs_model_hash"] == data_hash
    assert "sshs_legacy_hash" not in meta and meta["ss_output_name"] == "kept"
    shown = run_cli("hash", out, "--style", "a1111", "--json")
    assert json.loads(shown.stdout)[0]["AutoV3"] == data_hash

    # by default (and with --no-source-hash) no hash of the output is recorded, and the stale ones
    # are not carried over
    r = run_cli("convert", src, "--for", "generation", "--json", "--no-source-hash", "-o", tmp_path / "nohash.safetensors")
    assert r.returncode == 0, r.stderr
    meta = metadata_of(tmp_path / "nohash.safetensors")
    assert not {"modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash"} & set(meta)
    assert "source_sha256" not in json.loads(meta["sdtk.lineage"])[-1]


def test_data_section_hasher_follows_the_writer(tmp_path):
    """The read-back hasher sees exactly the bytes written, across spans copied file to file and
    tensors written from memory, for a file without metadata too."""
    from sdtk.formats.data_hash import DataSectionHasher
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.tensors import from_array

    src = write_layout(tmp_path / "a.safetensors", "sd15-full-ema", scale=16)
    with open_model(src) as cat:
        plan = list(cat.tensors.values())[:50] + [from_array("extra", np.arange(7, dtype=np.int64))]
        hasher = DataSectionHasher()
        write_safetensors(tmp_path / "b.safetensors", plan, {}, data_hasher=hasher)
    assert hasher.hexdigest == _data_section_sha256(tmp_path / "b.safetensors")


def test_summary_says_where_the_source_hashes_came_from(tmp_path):
    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    env = {"SDTK_HASH_CACHE": str(tmp_path / "cache.sqlite3")}
    seen = []
    for i, extra in enumerate([[], [], ["--no-source-hash"]]):
        r = run_cli("convert", src, "--dtype", "fp16", "--json", "-o", tmp_path / f"out{i}.safetensors", *extra, env=env)
        assert r.returncode == 0, r.stderr
        seen.append(json.loads(r.stdout)["source_hashes"])
    assert seen == ["computed", "cache", "skipped"]
    # the two conversions recorded the same source hashes
    lineages = [json.loads(metadata_of(tmp_path / f"out{i}.safetensors")["sdtk.lineage"])[-1] for i in (0, 1)]
    assert lineages[0]["source_sha256"] == lineages[1]["source_sha256"] == sha256_of(src)


def test_source_hashing_reports_progress_to_the_display(tmp_path, monkeypatch):
    """The first conversion of a file also reads it for the lineage hashes; the display hears of
    it (a bar on a terminal) up to the last byte, and not at all when the cache knows the file."""
    from sdtk.ops.convert import Progress

    monkeypatch.setenv("SDTK_HASH_CACHE", str(tmp_path / "cache.sqlite3"))
    src = write_layout(tmp_path / "m.safetensors", "sd15-emaonly", scale=16)
    for attempt, expect_calls in ((0, True), (1, False)):
        calls = []
        progress = Progress(hashing=lambda source, done, total: calls.append((source, done, total)))
        convert_file(src, resolve_options(ConvertOptions(dtype="fp16")), output=tmp_path / f"o{attempt}.safetensors",
                     progress=progress)
        assert bool(calls) == expect_calls
        if expect_calls:
            assert calls[-1] == (src, src.stat().st_size, src.stat().st_size)
