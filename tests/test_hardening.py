"""Issue 16: scan never calls an executing file safe; nothing hangs, crashes or leaks markup.

Every hostile file is built here (tests/hostile_files.py). Each executing one is first shown to
run its payload (a marker file in tmp, nothing else) under the loader it targets, in a child
process: torch.load(weights_only=False) when torch is installed, np.load(allow_pickle=True).
Then: scan calls it unsafe, every reader and command refuses it, nothing runs, nothing is written.
"""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hostile_files import (HOSTILE, MARKUP_AND_ESCAPES, dag_key_pickle, forging_global_pickle, tar_legacy_polyglot,
                           tar_pickle_polyglot, tar_safetensors_polyglot, text_lines_pickle, write_hostile)
from helpers_readers import TORCH_DATA, os_system_payload
from sdtk.errors import FormatError, OutputError, SdtkError, UnsafeFileError
from sdtk.formats import detect_format, open_model
from sdtk.formats.picklevm import PickleVM
from sdtk.formats.safetensors import write_safetensors
from sdtk.scan import scan_file
from sdtk.tensors import DTYPES, LazyTensor, geometry_problem, may_overlap
from sdtk.untrusted import for_markup, for_terminal, json_text, line_field

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
EXECUTING = sorted(n for n, (_, _, loader) in HOSTILE.items() if loader)

RUNNERS = {
    "torch": "import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n",
    "numpy": ("import sys, numpy as np\ntry:\n    z = np.load(sys.argv[1], allow_pickle=True)\n"
              "    [z[k] for k in z.files] if hasattr(z, 'files') else None\nexcept Exception:\n    pass\n"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The hostile files, built once for the module (tests only read them)."""
    tmp = tmp_path_factory.mktemp("hostile")
    folder = tmp / "hostile"
    folder.mkdir()
    marker = tmp / "MARKER"
    return write_hostile(folder, marker), marker


@pytest.mark.parametrize("name", EXECUTING)
def test_the_payload_really_runs_under_its_loader(tmp, name):
    """Control: the loader the file targets does run it (so 'unsafe' below is the right answer)."""
    build, _, loader = HOSTILE[name]
    if loader == "torch":
        pytest.importorskip("torch")
    marker = tmp / "MARKER"
    path = tmp / name
    path.write_bytes(build(marker))
    subprocess.run([sys.executable, "-c", RUNNERS[loader], str(path)], cwd=tmp, timeout=300, capture_output=True)
    assert marker.exists(), f"{loader} did not run the payload of {name}"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_scan_verdict_and_nothing_runs(corpus, name):
    files, marker = corpus
    start = time.perf_counter()
    result = scan_file(files[name])
    assert time.perf_counter() - start < 60
    assert result.verdict == HOSTILE[name][1], result.reason
    assert result.reason and "\n" not in result.reason.replace("\n", "") and not marker.exists()


@pytest.mark.parametrize("name", sorted(n for n, (_, v, _) in HOSTILE.items() if v != "safe"))
def test_every_reader_refuses(corpus, name):
    files, marker = corpus
    expected = UnsafeFileError if HOSTILE[name][1] == "unsafe" else SdtkError
    with pytest.raises(expected):
        open_model(files[name])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Read what torch reads: the polyglots are what they claim under the other reading too


def test_polyglots_are_valid_files_of_the_other_format(tmp):
    marker = tmp / "MARKER"
    plain = tmp / "p.pkl"
    plain.write_bytes(tar_pickle_polyglot(marker))
    assert pickle.loads(plain.read_bytes()) == {}
    legacy = tmp / "l.pt"
    legacy.write_bytes(tar_legacy_polyglot(marker))
    st = tmp / "s.bin"
    st.write_bytes(tar_safetensors_polyglot(marker))
    assert [detect_format(p, as_torch_loads=False) for p in (plain, legacy, st)] == ["pickle", "torch-legacy", "safetensors"]
    assert {detect_format(p) for p in (plain, legacy, st)} == {"torch-tar"}
    from sdtk.formats.safetensors import read_safetensors
    from sdtk.formats.torchlegacy import read_torch_legacy

    with read_torch_legacy(legacy) as cat:  # what sdtk read before: a clean, empty checkpoint
        assert len(cat) == 0
    with read_safetensors(st) as cat:
        assert list(cat.tensors) == ["x"]
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(st), "np") as f:  # the reference library reads it too
        assert list(f.keys()) == ["x"]
    assert not marker.exists()


def test_tar_verdict_names_the_payload_and_the_format(corpus):
    files, _ = corpus
    for name in ("tar_pickle_polyglot.pkl", "tar_legacy_polyglot.pt", "tar_safetensors_polyglot.bin"):
        r = scan_file(files[name])
        assert r.format == "torch-tar" and "os.system" in r.reason and "storages" in r.reason
        assert any("tar archive" in f.message for f in r.findings)


def test_trailing_bytes_count(tmp):
    """After a legacy checkpoint or a pickle: a hidden payload is unsafe, other bytes not 'safe'."""
    marker = tmp / "MARKER"
    legacy = (TORCH_DATA / "legacy.pt").read_bytes()
    (tmp / "payload.pt").write_bytes(legacy + os_system_payload(marker))
    (tmp / "junk.pt").write_bytes(legacy + b"\x00garbage")
    (tmp / "junk.pkl").write_bytes(b"\x80\x02}." + b"\x00garbage")
    assert scan_file(tmp / "payload.pt").verdict == "unsafe"
    with pytest.raises(UnsafeFileError):
        open_model(tmp / "payload.pt")
    assert scan_file(tmp / "junk.pt").verdict == "unreadable"
    assert scan_file(tmp / "junk.pkl").verdict == "unreadable"
    assert not marker.exists()


def test_zip_names_are_looked_up_as_torch_does(tmp):
    """A checkpoint whose records differ in case from torch's names is read like torch reads it."""
    from helpers_readers import torch_zip, torch_zip_records

    records = [(n.replace("data.pkl", "DATA.PKL").replace("/version", "/VERSION"), d)
               for n, d in torch_zip_records(TORCH_DATA / "every_dtype.pt")]
    path = torch_zip(records, tmp / "upper.pt")
    with open_model(path) as cat, open_model(TORCH_DATA / "every_dtype.pt") as ref:
        assert list(cat.tensors) == list(ref.tensors)
    assert scan_file(path).verdict == "safe"


def test_one_eocd_in_a_comment_free_archive_is_fine_and_random_signatures_in_data_are_not_eocds(tmp):
    from helpers_readers import minimal_checkpoint_records, torch_zip

    pkl = (TORCH_DATA / "every_dtype.pt")
    records = minimal_checkpoint_records(b"\x80\x02}.", storages=[("0", b"PK\x05\x06" + bytes(60))])
    torch_zip(records, tmp / "sig_in_data.ckpt")
    assert scan_file(tmp / "sig_in_data.ckpt").verdict == "safe"
    assert scan_file(pkl).verdict == "safe"


def test_numpy_object_dtypes_by_numpys_own_rule(tmp):
    from hostile_files import npy_bytes

    plain = tmp / "plain.npy"
    np.save(plain, np.arange(6, dtype="<f4"))
    structured = tmp / "structured.npy"
    np.save(structured, np.zeros(3, dtype=[("a", "<f4"), ("b", "<i8")]))
    assert scan_file(plain).verdict == "safe" and scan_file(structured).verdict == "safe"
    obj = tmp / "obj.npy"
    np.save(obj, np.array([1, "x"], dtype=object), allow_pickle=True)
    assert scan_file(obj).verdict == "unsafe"
    bad = tmp / "bad.npy"
    bad.write_bytes(npy_bytes("'not a dtype'", b""))
    assert scan_file(bad).verdict == "unreadable"


# ---------------------------------------------------------------------------------------------
# Bounded work


def test_memo_tuple_dag_as_dict_key_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(FormatError, match="dict key"):
        PickleVM(dag_key_pickle(200)).run(0)
    assert time.perf_counter() - start < 5
    assert len(dag_key_pickle(60)) < 700


class _CountingBuffer:
    """A buffer without `find` (like a memoryview) that counts the bytes sliced out of it."""

    def __init__(self, data: bytes):
        self.data, self.copied = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        if isinstance(key, slice):
            chunk = self.data[key]
            self.copied += len(chunk)
            return chunk
        return self.data[key]


def test_text_opcodes_never_copy_the_rest_of_the_data():
    data = text_lines_pickle(512 << 10)
    buf = _CountingBuffer(data)
    value, end = PickleVM(buf).run(0)
    assert end == len(data) and len(value) == (512 << 10) // 5
    assert buf.copied < 32 * len(data)  # was ~len(data)^2 / 10 (the rest of the data per line)


def test_text_opcodes_on_mmap_scale_linearly(tmp):
    times = {}
    for mb in (1, 4):
        path = tmp / f"lines{mb}.pkl"
        path.write_bytes(text_lines_pickle(mb << 18))
        start = time.perf_counter()
        assert scan_file(path).verdict == "safe"
        times[mb] = time.perf_counter() - start
    assert times[4] < 10 * times[1] + 1, times  # quadratic would be 16x


def test_deflate_bomb_is_refused_before_inflating(corpus):
    files, _ = corpus
    start = time.perf_counter()
    r = scan_file(files["deflate_bomb.ckpt"])
    assert "deflate bomb" in r.reason
    with pytest.raises(SdtkError, match="deflate bomb"):
        open_model(files["deflate_bomb.ckpt"])
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------------
# Bounded geometry


def test_geometry_rules():
    assert geometry_problem((0, 1 << 70), 4)
    assert geometry_problem((0, 1 << 62, 8), 4)
    assert geometry_problem((1 << 61,), 2)
    assert geometry_problem((77, 768), 4) is None and geometry_problem((0, 1 << 40), 4) is None
    assert may_overlap((3, 4), (0, 1)) and may_overlap((2, 2), (1, 1))
    assert not may_overlap((6, 8), (1, 6)) and not may_overlap((1, 77), (0, 1)) and not may_overlap((4, 3), (1, 8))


def test_writer_never_writes_a_shape_readers_refuse(tmp):
    t = LazyTensor("w", DTYPES["F32"], (0, 1 << 62, 8), loader=lambda: np.zeros(0, np.float32))
    with pytest.raises(OutputError):
        write_safetensors(tmp / "out.safetensors", [t])
    assert list(tmp.iterdir()) == []


def test_small_broadcast_views_are_read_and_reported():
    with open_model(TORCH_DATA / "shared_views.pt") as cat:
        assert cat.tensors["expanded"].read().shape == (3, 4)
        assert any("overlapping or broadcast" in n and "expanded" in n for n in cat.notes)


def test_outputs_are_re_readable(tmp, cli):
    safetensors = pytest.importorskip("safetensors")
    import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors' numpy backend needs (sdtk imports it lazily)

    out = tmp / "views.safetensors"
    proc = cli("convert", TORCH_DATA / "shared_views.pt", out)
    assert proc.returncode == 0, proc.stderr
    with safetensors.safe_open(str(out), "np") as f, open_model(TORCH_DATA / "shared_views.pt") as cat:
        for key in f.keys():
            np.testing.assert_array_equal(f.get_tensor(key), cat.tensors[key].read())


# ---------------------------------------------------------------------------------------------
# No tracebacks; exit codes; nothing written; inputs untouched (every command, every file)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_commands_refuse_in_one_line_and_write_nothing(corpus, cli):
    files, marker = corpus
    folder = next(iter(files.values())).parent
    before = {n: _digest(p) for n, p in files.items()}
    proc = cli("scan", folder, "--json")
    report = json.loads(proc.stdout)
    verdicts = {os.path.basename(f["path"]): f["verdict"] for f in report["files"]}
    assert verdicts == {n: v for n, (_, v, _) in HOSTILE.items()}
    assert proc.returncode == 1
    refused = [n for n, (_, v, _) in HOSTILE.items() if v != "safe"]
    proc = cli("inspect", *(files[n] for n in refused))  # one line per file, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    out = folder.parent / "out"
    out.mkdir(exist_ok=True)
    for name in refused:
        proc = cli("convert", files[name], out / "x.safetensors")
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(files[name]) in proc.stderr
    assert list(out.iterdir()) == [] and {n: _digest(p) for n, p in files.items()} == before
    assert not marker.exists()


def test_library_scan_refuses_what_scan_refuses(corpus, cli, tmp):
    """Indexed with the reason it was refused, never described as a model."""
    files, marker = corpus
    folder = next(iter(files.values())).parent
    proc = cli("library", "scan", folder, "--db", tmp / "lib.sqlite3", "--json")
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 1), proc.stderr
    proc = cli("library", "list", "--db", tmp / "lib.sqlite3", "--json")
    records = {os.path.basename(r["path"]): r for r in json.loads(proc.stdout)}
    refused = {n for n, (_, v, _) in HOSTILE.items() if v != "safe" and n.rsplit(".", 1)[-1] in ("ckpt", "pt", "bin", "pkl", "safetensors")}
    assert refused and refused <= set(records)
    for name in refused:
        r = records[name]
        assert r["problem"] and not r["tensor_count"] and not r["architecture"], (name, r)
        if HOSTILE[name][1] == "unsafe":
            assert "refused" in r["problem"] or "not allowed" in r["problem"] or "unsafe" in r["problem"] or "differ" in r["problem"], r
    assert not marker.exists()


def _wait_for_library(pid: int, fragment: str, timeout: float = 120) -> bool:
    """Until the process has mapped a shared library whose path contains `fragment`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if fragment in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.002)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see start-up progress")
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp):
    """SIGINT while the CLI is still importing its dependencies (numpy's C core is being loaded:
    after Python's own start-up, before any handler of ours is installed). `convert` is used: it
    imports numpy at start-up, while header-only commands such as inspect no longer do."""
    env = dict(os.environ, PYTHONPATH=SRC)
    (tmp / "a.safetensors").write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-m", "sdtk", "convert", str(tmp / "a.safetensors")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for_library(proc.pid, "_multiarray_umath")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and err.count(b"\n") <= 1, err
    assert proc.returncode == 130 and b"interrupted" in err, (proc.returncode, err)


def test_too_long_output_name_still_converts(tmp, cli):
    out = tmp / ("m" * (255 - len(".safetensors")) + ".safetensors")
    proc = cli("convert", TORCH_DATA / "embedding.pt", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and sorted(p.name for p in tmp.iterdir()) == [out.name]


def test_the_safetensors_library_refuses_what_we_refuse(corpus):
    safetensors = pytest.importorskip("safetensors")
    files, _ = corpus
    for name in ("lone_surrogate.safetensors", "nested_json.safetensors", "shape_0_2e62x8.safetensors"):
        with pytest.raises(Exception):
            with safetensors.safe_open(str(files[name]), "np") as f:
                [f.get_tensor(k) for k in f.keys()]


# ---------------------------------------------------------------------------------------------
# Untrusted text stays text


def test_escaping_helpers():
    assert for_terminal("a\x1b]0;t\x07b\u202e\ud800") == "a\\x1b]0;t\\x07b\\u202e\\ud800"
    assert for_terminal("line1\nline2", keep_newlines=True) == "line1\nline2"
    assert for_markup("[bold red]x[/x]") == "\\[bold red]x\\[/x]"
    assert line_field("a\tb\nc\\d") == "a\\tb\\nc\\\\d"
    assert json.loads(json_text(json.dumps({"k": "\x9b\ud800"}, ensure_ascii=False))) == {"k": "\x9b\ud800"}


def _terminal_env():
    return {"TTY_COMPATIBLE": "1", "COLUMNS": "200"}


def test_markup_and_escapes_in_metadata_and_names_reach_the_terminal_as_text(corpus, cli, tmp):
    files, _ = corpus
    proc = cli("inspect", files["markup_metadata.safetensors"], "--verbose", env=_terminal_env())
    assert proc.returncode in (0, 1), proc.stderr
    weird = tmp / "[bold red]x[blink]\x1b[2J.pkl"
    weird.write_bytes(os_system_payload(tmp / "MARKER"))
    for args in (("scan", weird), ("convert", weird, tmp / "o.safetensors"), ("inspect", weird), ("hash", weird)):
        proc = cli(*args, env=_terminal_env())
        both = proc.stdout + proc.stderr
        assert "Traceback" not in both and "MarkupError" not in both, (args, both)
        assert "\x1b[2J" not in both and "\x1b]0;" not in both and "\x07" not in both, (args, both)
        assert "[blink]" in both, (args, both)  # shown, not applied
    assert not (tmp / "MARKER").exists()


def test_scan_lines_fields_cannot_forge_records(tmp, cli):
    (tmp / "evil.pkl").write_bytes(forging_global_pickle())
    (tmp / "tab\tand\nnewline.pkl").write_bytes(b"\x80\x02}.")
    proc = cli("scan", tmp, "--lines")
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == 3 for line in lines), proc.stdout
    assert {line.split("\t")[0] for line in lines} == {"unsafe", "safe"}
    assert any("tab\\tand\\nnewline.pkl" in line for line in lines)


def test_json_output_survives_undecodable_names(tmp):
    name = os.fsdecode(b"caf\xff.pkl")
    (tmp / name).write_bytes(b"\x80\x02}.")
    proc = subprocess.run([sys.executable, "-m", "sdtk", "scan", str(tmp), "--json"], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=SRC), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert os.path.basename(report["files"][0]["path"]) == name
