"""`sdtk lora apply` stopped mid-write (issue 11, Bad input): a full disk (a real, too small tmpfs
when the tests run as root, as CI does; an injected ENOSPC everywhere) and Ctrl-C on a full-size
base. Each time: a one-line message naming the output, the documented exit code (2; 130 for
Ctrl-C), no file left behind, the inputs byte for byte as they were."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_convert import sha256_of as _sha
from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, tensors

SRC = str(Path(__file__).resolve().parent.parent / "src")
UNET = "model.diffusion_model."


def _every_attention_lora(shapes, rng, rank=4):
    """kohya names (diffusers layout) for every SD1 UNet attention/ff/proj weight: most of the
    UNet is baked, so the write lasts long enough to be interrupted."""
    from sdtk.architectures.lora_keys import sd_unet_to_diffusers, under

    mods = {k[len(UNET):-len(".weight")]: s for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".weight")}
    names = sd_unet_to_diffusers(mods)  # the whole UNet's modules: the block numbering depends on all of them
    out = {}
    for ldm, shape in mods.items():
        if len(shape) == 2 and any(w in ldm for w in ("attn1.", "attn2.", "ff.net", "proj_in", "proj_out")):
            out.update(lora_family("lora_unet_" + under(names.get(ldm, ldm)), "lora", shape, rng, rank=rank))
    return out


@pytest.fixture
def small_pair(tmp):
    base = make_model(tmp, "base", "sd15-emaonly", scale=8, dtype="float16")
    lora = write_tensors(tmp / "style.safetensors",
                         _every_attention_lora({k: v.shape for k, v in tensors(base).items()}, np.random.default_rng(3)))
    return base, lora


def test_disk_full_mid_write_leaves_nothing_and_the_inputs_untouched(tmp, small_pair, monkeypatch):
    """ENOSPC after half the tensors were written (in process: any user, any file system)."""
    import sdtk.formats.safetensors as st
    from sdtk.adapters.matching import LoraInput
    from sdtk.errors import OutputError
    from sdtk.ops.lora.bake import bake

    base, lora = small_pair
    before = {p.name: _sha(p) for p in tmp.iterdir()}
    real = st._write_tensors
    seen = {}

    def disk_full_half_way(out, plan, dest, *args):
        seen["written"] = real(out, plan[:len(plan) // 2], dest, *args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "_write_tensors", disk_full_half_way)
    with pytest.raises(OutputError, match="disk full while writing; nothing was written") as info:
        bake(str(base), [LoraInput(str(lora), 0.8)], str(tmp / "baked.safetensors"))
    assert "baked.safetensors" in str(info.value) and seen["written"] > 1 << 20  # it failed mid-write
    assert {p.name: _sha(p) for p in tmp.iterdir()} == before


def test_real_full_disk_from_the_cli(tmp, small_pair):
    """A tmpfs of half the output's size, mounted in a mount namespace of the test's own."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a tmpfs of its own needs root and unshare (CI runs as root); the in-process ENOSPC test runs everywhere")
    base, lora = small_pair
    before = {p.name: _sha(p) for p in tmp.iterdir()}
    small = tmp / "small-disk"
    small.mkdir()
    size_kb = base.stat().st_size // 2048
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "$1" || exit 99; '
              f'"$2" -m sdtk lora apply "$3" "$4":0.8 -o "$1/baked.safetensors"; rc=$?; '
              f'echo "left: [$(ls -A "$1")]"; exit $rc')
    env = dict(os.environ, PYTHONPATH=SRC, COLUMNS="200")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(small), sys.executable, str(base), str(lora)],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 99:
        pytest.skip(f"this machine refuses a tmpfs mount in a new namespace: {r.stderr.strip()[:200]}")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "baked.safetensors" in lines[0] and "disk full" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "left: []" in r.stdout  # no partial file on the full disk
    assert {p.name: _sha(p) for p in tmp.iterdir() if p.is_file()} == before


def test_ctrl_c_mid_write_of_a_full_size_bake(tmp):
    """SIGINT while a full-size SD1.5 fp16 (2.1 GB, sparse on disk) is being baked: exit 130, one
    line, nothing left, the base unchanged (size and header)."""
    from sdtk.samples import load_layout, write_sparse_safetensors

    lay = load_layout("sd15-emaonly").with_dtype("float16")
    base = tmp / "v1-5-fp16.safetensors"
    write_sparse_safetensors(base, lay)
    shapes = {k: tuple(s) for k, s, _ in lay.tensors}
    lora = write_tensors(tmp / "style.safetensors", _every_attention_lora(shapes, np.random.default_rng(4), rank=2))
    with open(base, "rb") as f:
        size, head = base.stat().st_size, f.read(1 << 16)
    lora_sha = _sha(lora)
    out = tmp / "baked.safetensors"
    env = dict(os.environ, PYTHONPATH=SRC, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "sdtk", "lora", "apply", str(base), f"{lora}:0.8", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(p.name.endswith(".sdtk-partial") for p in tmp.iterdir()):
        time.sleep(0.01)
    assert proc.poll() is None, "the bake ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "interrupted; nothing was written" in lines[0], err
    assert sorted(p.name for p in tmp.iterdir()) == sorted([base.name, lora.name])
    with open(base, "rb") as f:
        assert base.stat().st_size == size and f.read(1 << 16) == head and _sha(lora) == lora_sha
