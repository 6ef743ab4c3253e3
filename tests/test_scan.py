"""`sdtk scan` and the readers against the picklescan corpus and crafted payloads: every malicious
file is unsafe, the benign ones are readable, and no payload ever runs (marker files stay absent)."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers_readers import (CORPUS, TORCH_DATA, Asm, dotted_payload, exec_payload, frame_hidden_payload,
                             minimal_checkpoint_records, os_system_payload, torch_zip, torch_zip_records)
from sdtk.errors import SdtkError, UnsafeFileError, UnsupportedFormatError
from sdtk.formats import open_model
from sdtk.formats.safetensors import write_safetensors
from sdtk.scan import scan_file, scan_paths
from sdtk.tensors import from_array

# Every corpus file and its verdict. Default for the rest: unsafe (malicious*, GHSA-*, exploits).
NOT_UNSAFE = {
    "data/benign0_v0.pkl": "safe", "data/benign0_v3.pkl": "safe", "data/benign0_v4.pkl": "safe",
    "data/pytorch_model.bin": "safe", "data/new_pytorch_model.bin": "safe",
    "data2/int_array.npy": "safe", "data2/int_arrays.npz": "safe", "data2/int_arrays_compressed.npz": "safe",
    "data/bad_pytorch.pt": "unreadable",  # PNG bytes
    "data/not_a_pickle.bin": "unreadable",  # GLOBAL with invalid UTF-8: CPython fails before importing
    "data/malicious1.7z": "unreadable",  # a 7-Zip archive: neither torch.load nor sdtk opens it
}
CORPUS_FILES = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and p.parent != CORPUS)


def test_corpus_is_complete():
    assert len(CORPUS_FILES) == 109  # tests/data + tests/data2 of picklescan at COMMIT
    assert set(NOT_UNSAFE) <= set(CORPUS_FILES)


@pytest.mark.parametrize("rel", CORPUS_FILES)
def test_every_corpus_file_is_classified(rel):
    result = scan_file(CORPUS / rel)
    assert result.verdict == NOT_UNSAFE.get(rel, "unsafe"), (rel, result.reason)
    assert result.reason


@pytest.mark.parametrize("rel", [r for r, v in NOT_UNSAFE.items() if v == "unreadable"] +
                         [r for r in CORPUS_FILES if r not in NOT_UNSAFE])
def test_open_model_never_reads_a_malicious_corpus_file(rel):
    with pytest.raises(SdtkError):
        open_model(CORPUS / rel)


def test_benign_torch_corpus_files_are_readable():
    with open_model(CORPUS / "data/pytorch_model.bin") as cat:
        assert cat.format == "torch-legacy" and len(cat) == 38
        assert all(t.read().shape == t.shape for t in cat)
    with open_model(CORPUS / "data/new_pytorch_model.bin") as cat:
        assert cat.format == "torch-zip" and len(cat) == 1


@pytest.mark.parametrize("name", ["every_dtype.pt", "shared_views.pt", "lightning.ckpt", "embedding.pt", "nested.pth",
                                  "bigendian.pt", "legacy.pt", "legacy_embedding.pt"])
def test_torch_written_files_scan_safe(name):
    result = scan_file(TORCH_DATA / name)
    assert result.verdict == "safe", result.reason
    assert result.tensors == len(open_model(TORCH_DATA / name))


def test_scan_reasons_name_the_global():
    r = scan_file(CORPUS / "data/malicious2_v0.pkl")
    assert "posix.system" in r.reason and "posix.system" in r.globals
    r = scan_file(CORPUS / "data/malicious1_central_directory.zip")
    assert "name swap" in r.reason
    r = scan_file(CORPUS / "data/malicious6.pkl")  # payload in the 2nd stacked pickle
    assert "pickle #2" in r.reason and "requests.api.get" in r.reason


# ---------------------------------------------------------------------------------------------
# Crafted payloads: each would create a marker file if anything ran it.


def _legacy(main_pickle: bytes) -> bytes:
    magic = Asm().proto(2).raw(b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")).stop().bytes()
    proto = Asm().proto(2).raw(b"M\xe9\x03").stop().bytes()
    sys_info = Asm().proto(2).empty_dict().stop().bytes()
    keys = Asm().proto(2).raw(b"]").stop().bytes()
    return magic + proto + sys_info + main_pickle + keys


def _name_swapped_zip(benign: bytes, payload: bytes) -> bytes:
    """Local headers say data.pkl is benign; the central directory (what torch/miniz uses) maps
    the name data.pkl to the payload record."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), benign)
        z.writestr(zipfile.ZipInfo("archive/xata.pkl"), payload)
        z.writestr(zipfile.ZipInfo("archive/version"), b"3\n")
    raw = buf.getvalue()
    cd = raw.index(b"PK\x01\x02")
    head, central = raw[:cd], raw[cd:]
    central = central.replace(b"archive/data.pkl", b"archive/TEMP.pkl").replace(b"archive/xata.pkl", b"archive/data.pkl").replace(b"archive/TEMP.pkl", b"archive/xata.pkl")
    return head + central


def _tar_with(payload: bytes, tmp) -> bytes:
    path = tmp / "payload.tar"
    with tarfile.open(path, "w") as tar:
        for member, data in (("sys_info", Asm().proto(2).empty_dict().stop().bytes()), ("pickle", payload),
                             ("storages", b"\x80\x02K\x00.\x80\x02]."), ("tensors", b"\x80\x02K\x00.")):
            src = tmp / member
            src.write_bytes(data)
            tar.add(src, arcname=member)
            src.unlink()
    data = path.read_bytes()
    path.unlink()
    return data


def _payload_files(tmp, marker):
    benign = Asm().proto(2).empty_dict().stop().bytes()
    sysp = os_system_payload(marker)
    inst = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    memo_trick = (b"Vos\np2\n0Vsystem\np3\n0" + b"g2\ng3\n\x93(Vtouch " + str(marker).encode() + b"\ntR.")
    return {
        "os_system.pkl": sysp,
        "exec.pkl": exec_payload(marker),
        "inst_protocol0.pkl": inst,
        "stack_global_memo.pkl": memo_trick,
        "dotted.pkl": dotted_payload(marker),
        "frame_trick.pkl": frame_hidden_payload(marker),
        "stacked.pkl": benign + sysp,
        "legacy_stacked.pt": _legacy(sysp),
        "tar_format.pt": _tar_with(sysp, tmp),
        "zip_payload.ckpt": None,
        "duplicate_data_pkl.ckpt": None,
        "cd_name_swap.ckpt": _name_swapped_zip(benign, sysp),
        "dotted_in_zip.ckpt": None,
        "frame_in_zip.ckpt": None,
    }


def _write_payloads(tmp, marker):
    files = {}
    benign = Asm().proto(2).empty_dict().stop().bytes()
    for name, data in _payload_files(tmp, marker).items():
        path = tmp / name
        if name == "zip_payload.ckpt":
            torch_zip(minimal_checkpoint_records(os_system_payload(marker)), path)
        elif name == "duplicate_data_pkl.ckpt":  # torch reads the last data.pkl, a scanner may read the first
            recs = minimal_checkpoint_records(benign)
            torch_zip(recs + [("archive/data.pkl", os_system_payload(marker))], path)
        elif name == "dotted_in_zip.ckpt":
            torch_zip(minimal_checkpoint_records(dotted_payload(marker)), path)
        elif name == "frame_in_zip.ckpt":
            torch_zip(minimal_checkpoint_records(frame_hidden_payload(marker)), path)
        else:
            path.write_bytes(data)
        files[name] = path
    return files


PAYLOAD_NAMES = [
    "os_system.pkl", "exec.pkl", "inst_protocol0.pkl", "stack_global_memo.pkl", "dotted.pkl", "frame_trick.pkl",
    "stacked.pkl", "legacy_stacked.pt", "tar_format.pt", "zip_payload.ckpt", "duplicate_data_pkl.ckpt",
    "cd_name_swap.ckpt", "dotted_in_zip.ckpt", "frame_in_zip.ckpt"]


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_payloads_never_run(tmp, name):
    marker = tmp / "MARKER"
    path = _write_payloads(tmp, marker)[name]
    result = scan_file(path)
    assert result.verdict == "unsafe", result.reason
    with pytest.raises((UnsafeFileError, UnsupportedFormatError)):
        open_model(path)
    assert not marker.exists()


def test_payloads_never_run_through_the_cli(tmp, cli):
    marker = tmp / "MARKER"
    _write_payloads(tmp, marker)
    proc = cli("scan", tmp, "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert {f["verdict"] for f in report["files"]} == {"unsafe"}
    assert len(report["files"]) == len(PAYLOAD_NAMES)
    for name in ("zip_payload.ckpt", "legacy_stacked.pt", "frame_trick.pkl"):  # one per reader
        proc = cli("convert", tmp / name, tmp / (name + ".safetensors"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os_system.pkl", "exec.pkl", "inst_protocol0.pkl", "stack_global_memo.pkl",
                                  "dotted.pkl", "frame_trick.pkl", "stacked.pkl"])
def test_the_plain_pickle_payloads_are_real(tmp, name):
    """Control: CPython's own unpickler does run these payloads (so 'no marker' above means something)."""
    marker = tmp / "MARKER"
    path = _write_payloads(tmp, marker)[name]
    code = "import pickle,sys\nf=open(sys.argv[1],'rb')\ntry:\n    while True: pickle.load(f)\nexcept Exception: pass\n"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp, timeout=60, capture_output=True)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# The command


def _safetensors(path):
    write_safetensors(path, [from_array("w", np.arange(6, dtype=np.float32).reshape(2, 3))])
    return path


def test_cli_exit_codes_and_json_schema(tmp, cli):
    good = tmp / "good"
    good.mkdir()
    _safetensors(good / "a.safetensors")
    (good / "b.ckpt").write_bytes((TORCH_DATA / "lightning.ckpt").read_bytes())
    (good / "sub").mkdir()
    (good / "sub" / "c.pt").write_bytes((TORCH_DATA / "legacy.pt").read_bytes())
    (good / "notes.txt").write_text("not scanned: not a model extension")
    proc = cli("scan", good, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_code"] == 0
    assert [os.path.basename(f["path"]) for f in report["files"]] == ["a.safetensors", "b.ckpt", "c.pt"]
    for entry in report["files"]:
        assert set(entry) == {"path", "verdict", "reason", "format", "findings", "tensors", "globals"}
        assert entry["verdict"] == "safe" and entry["findings"] == []
    assert report["files"][1]["tensors"] == 5 and "torch._utils._rebuild_tensor_v2" in report["files"][1]["globals"]

    bad = tmp / "trunc.safetensors"
    bad.write_bytes((good / "a.safetensors").read_bytes()[:-3])
    proc = cli("scan", good, bad)
    assert proc.returncode == 2
    assert "unreadable\t" + str(bad) in proc.stdout

    evil = tmp / "evil.pkl"
    evil.write_bytes(os_system_payload(tmp / "MARKER"))
    proc = cli("scan", good, bad, evil)
    assert proc.returncode == 1
    assert "unsafe\t" + str(evil) + "\t" in proc.stdout and "os.system" in proc.stdout


def test_cli_missing_path_is_one_line(tmp, cli):
    proc = cli("scan", tmp / "nope.ckpt")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.ckpt" in proc.stderr and "Traceback" not in proc.stderr


def test_scan_reads_no_tensor_values_but_checks_every_crc(tmp):
    records = torch_zip_records(TORCH_DATA / "shared_views.pt")
    path = torch_zip(records, tmp / "flipped.pt")
    raw = bytearray(path.read_bytes())
    data0 = [d for n, d in records if n.endswith("/data/0")][0]
    raw[raw.find(data0) + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    result = scan_file(path)
    assert result.verdict == "unreadable" and "CRC" in result.reason


def test_scan_paths_recurses_sorted(tmp):
    (tmp / "b").mkdir()
    _safetensors(tmp / "b" / "z.safetensors")
    _safetensors(tmp / "a.safetensors")
    assert [os.path.basename(r.path) for r in scan_paths([tmp])] == ["a.safetensors", "z.safetensors"]
