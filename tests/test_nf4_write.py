"""`convert --to nf4 / fp4`: bitsandbytes 4-bit in Forge's layout, written by sdtk in numpy, against
bitsandbytes 0.50.2 on the CPU (`quantize_4bit` + `QuantState.as_dict(packed=True)`, the oracle):
every quantized tensor and the quant-state JSON byte for byte; sdtk's reader gives back bnb's
`dequantize_4bit`; inspect names the file; the key set of a FLUX layout; refusals."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from helpers_convert import write_layout, write_tensors
from sdtk.formats import open_model
from sdtk.quant import bnb4_quantize as bq
from sdtk.quant.views import dequantize_catalogue
from sdtk.samples import load_layout

P = "model.diffusion_model."
# (shape, dtype): whole blocks; a partial final block; an odd count; fp16 and f32 sources
SHAPES = [((256, 320), "bfloat16"), ((33, 64), "bfloat16"), ((7, 9), "float16"), ((64, 96), "float32")]


def _bnb():
    torch = pytest.importorskip("torch", reason="torch (CI: 2.13.0) runs the bitsandbytes oracle")
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes 0.50.2 (CPU) is the NF4/FP4 oracle")
    # torch splits a mean of more than 32768 values over threads (its last bit then depends on the
    # thread count); the tensors here are smaller, one thread makes it certain
    torch.set_num_threads(1)
    return torch, F


def _weights(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if w.size > 256:
        w.reshape(-1)[:64] = 0  # an all-zero block (absmax 0)
        w.reshape(-1)[70] = 0.5  # an outlier
    return w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def _torch(torch, arr):
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def _bnb_dequantize(torch, F, q, state):
    """bnb's dequantize_4bit; for rows that are not whole blocks its pure-torch backend (flat blocks,
    as its CUDA kernel; its 0.50.2 native CPU kernel counts blocks per row there, see test_nf4.py)."""
    if state.shape[-1] % state.blocksize == 0:
        return F.dequantize_4bit(q, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile's copy (slow to build)
    return eager(q.view(torch.uint8).reshape(-1), absmax.float(), _get_4bit_code(state.quant_type, q.device),
                                    state.blocksize, state.shape, state.dtype)


def _oracle(torch, F, arr, quant_type, double, blocksize=64):
    q, state = F.quantize_4bit(_torch(torch, arr), blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
    return q, state, {k: v.numpy() for k, v in state.as_dict(packed=True).items()}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("blocksize", [64, 32, 256])
def test_quantizer_bytes_equal_bitsandbytes(quant_type, double, blocksize):
    torch, F = _bnb()
    for i, (shape, dtype) in enumerate(SHAPES):
        w = _weights(shape, dtype, i)
        _, state, want = _oracle(torch, F, w, quant_type, double, blocksize)
        packed, absmax = bq.quantize_4bit(np.asarray(w, np.float32), blocksize, quant_type)
        q, _ = F.quantize_4bit(_torch(torch, w), blocksize=blocksize, quant_type=quant_type)
        assert np.array_equal(packed, q.numpy()), (shape, dtype)
        offset = None
        if double:
            codes, nested, offset = bq.double_quant(absmax)
            assert np.array_equal(codes, want["absmax"]) and codes.dtype == want["absmax"].dtype
            assert np.array_equal(nested, want["nested_absmax"])
            assert np.array_equal(bq.DYNAMIC_CODE, want["nested_quant_map"])
        else:
            assert np.array_equal(absmax, want["absmax"]) and absmax.dtype == np.float32
        assert np.array_equal(bq.CODES[quant_type], want["quant_map"])
        spec = bq.state_json(quant_type, blocksize, {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}[dtype],
                             shape, None if offset is None else float(offset))
        assert spec == want[f"quant_state.bitsandbytes__{quant_type}"].tobytes(), (spec, shape)


def test_torch_mean_port_is_exact():
    torch, _ = _bnb()
    rng = np.random.default_rng(3)
    for n in [*range(1, 140), 1000, 4099, 32768, 100_003]:
        x = (rng.random(n, dtype=np.float32) * 0.1).astype(np.float32)
        assert bq.torch_mean_f32(x) == np.float32(torch.from_numpy(x).mean().item()), n


def _flux_like(tmp, dtype="bfloat16"):
    """A FLUX-layout checkpoint with the real key names (scaled down): diffusion model, VAE and
    text encoders, so the Linear/non-Linear split and the copied parts are all exercised."""
    layout = load_layout("flux1-dev-aio").with_dtype(dtype)
    return write_layout(tmp / "flux.safetensors", layout, scale=32)


@pytest.mark.parametrize("double", [False, True])
def test_convert_writes_what_bitsandbytes_writes_and_reads_back(tmp, cli, double):
    torch, F = _bnb()
    from safetensors.numpy import load_file

    src = _flux_like(tmp)
    out = tmp / "flux-nf4.safetensors"
    args = ["convert", src, "--to", "nf4", "-o", out, "--json"] + (["--nf4-double-quant"] if double else [])
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    with open_model(src) as orig:
        linears = [k for k, t in orig.tensors.items() if k.startswith(P) and k.endswith(".weight") and len(t.shape) == 2]
        assert len(linears) > 100
        for k in linears[:: max(1, len(linears) // 12)] + [P + "img_in.weight", P + "final_layer.linear.weight"]:
            w = np.asarray(orig.tensors[k].read())
            q, state, want = _oracle(torch, F, w, "nf4", double)
            assert np.array_equal(got[k], q.numpy()), k
            for key, value in want.items():
                assert got[f"{k}.{key}"].dtype == value.dtype and np.array_equal(got[f"{k}.{key}"], value), (k, key)
            extra = {x for x in got if x.startswith(k + ".")} - {f"{k}.{key}" for key in want}
            assert not extra, extra
        # everything else is copied as it is (norms, biases, VAE, text encoders)
        for k, t in orig.tensors.items():
            if k not in linears:
                assert np.array_equal(np.asarray(t.read()).view(np.uint8), np.asarray(got[k]).view(np.uint8)), k
    # round trip: sdtk's own NF4 reader gives bitsandbytes' dequantize_4bit
    with open_model(out) as cat, open_model(src) as orig:
        dequantize_catalogue(cat)
        assert set(cat.tensors) == set(orig.tensors)
        checked = 0
        for k in linears[:: max(1, len(linears) // 8)]:
            q, state, _ = _oracle(torch, F, np.asarray(orig.tensors[k].read()), "nf4", double)
            ref = _bnb_dequantize(torch, F, q, state)
            checked += 1
            mine = np.asarray(cat.tensors[k].read())
            assert cat.tensors[k].dtype.name == "BF16"
            assert np.array_equal(mine.view(np.uint16), ref.view(torch.uint16).numpy()), k
        assert checked >= 8


def test_fp4_and_blocksize(tmp, cli):
    torch, F = _bnb()
    from safetensors.numpy import load_file

    k = P + "double_blocks.0.img_attn.qkv.weight"
    w = _weights((96, 128), "bfloat16", 7)
    src = write_tensors(tmp / "m.safetensors", {k: w, P + "double_blocks.0.img_attn.proj.weight": _weights((128, 128), "bfloat16", 8),
                                                P + "double_blocks.0.img_attn.norm.key_norm.scale": _weights((128,), "bfloat16", 9)})
    out = tmp / "fp4.safetensors"
    r = cli("convert", src, "--to", "fp4", "--blocksize", "128", "-o", out)
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    q, _, want = _oracle(torch, F, w, "fp4", False, 128)
    assert np.array_equal(got[k], q.numpy())
    assert got[k + ".quant_state.bitsandbytes__fp4"].tobytes() == want["quant_state.bitsandbytes__fp4"].tobytes()
    assert json.loads(got[k + ".quant_state.bitsandbytes__fp4"].tobytes())["blocksize"] == 128


def test_flux_layout_gets_the_forge_key_set(tmp, cli):
    """No oracle needed: the key set follows from the layout (every 2-D weight of the diffusion
    model quantized with 3 companions; nothing else touched), and inspect names the file."""
    src = _flux_like(tmp)
    for double, companions in ((False, (".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4")),
                               (True, (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                       ".quant_state.bitsandbytes__nf4"))):
        out = tmp / f"o{int(double)}.safetensors"
        r = cli("convert", src, "--to", "nf4", "-o", out, *(["--nf4-double-quant"] if double else []))
        assert r.returncode == 0, r.stderr
        with open_model(src) as orig, open_model(out) as cat:
            linears = {k for k, t in orig.tensors.items() if k.startswith(P) and k.endswith(".weight") and len(t.shape) == 2}
            want = set(orig.tensors) | {k + c for k in linears for c in companions}
            assert set(cat.tensors) == want
            for k in linears:
                n = int(np.prod(orig.tensors[k].shape))
                assert cat.tensors[k].dtype.name == "U8" and cat.tensors[k].shape == ((n + 1) // 2, 1)
                assert cat.tensors[k + ".absmax"].dtype.name == ("U8" if double else "F32")
                spec = json.loads(np.asarray(cat.tensors[k + ".quant_state.bitsandbytes__nf4"].read()).tobytes())
                assert spec["shape"] == list(orig.tensors[k].shape) and spec["dtype"] == "bfloat16" and spec["blocksize"] == 64
            assert not any(k.startswith(("vae.", "text_encoders.")) and k.endswith(companions) for k in cat.tensors)
        r = cli("inspect", out, "--json")
        info = json.loads(r.stdout)["files"][0]
        assert info["architecture"] == "flux-1-dev" and info["kind"] == "checkpoint", r.stdout[:500]
        q = info["quantization"]
        assert q["format"] == "bitsandbytes-4bit" and q["main_type"] == "NF4" and q["loaders"] == ["Forge"]
        assert q["layout"] == ("Forge v1 (double quant)" if double else "Forge v2 (f32 absmax)")
        assert q["components"]["unet"]["types"]["NF4"] == len(linears)
        assert 4.1 < q["bits_per_weight"] < 5.0
        assert not info["extra_keys"], info["extra_keys"]
        text = cli("inspect", out).stdout
        assert "bitsandbytes NF4" in text and "Forge" in text
        # where to put it: Forge only (ComfyUI core cannot load bitsandbytes 4-bit weights)
        flat = " ".join(text.split())
        assert "Forge's models/Stable-diffusion" in flat and "models/checkpoints (ComfyUI)" not in flat, flat[-400:]


@pytest.mark.parametrize("lang", ["en", "ja", "zh", "ru"])
def test_quantization_section_speaks_the_report_language(tmp, lang):
    from rich.console import Console

    from sdtk.identify.core import identify_path
    from sdtk.ops.to_nf4 import convert_file_to_nf4
    from sdtk.report import render_identity
    from sdtk.report.messages import catalogue

    src = write_tensors(tmp / "m.safetensors", {P + "double_blocks.0.img_attn.qkv.weight": _weights((64, 128), "bfloat16", 1),
                                                P + "double_blocks.0.img_attn.proj.weight": _weights((128, 64), "bfloat16", 2)})
    out = tmp / "m-nf4.safetensors"
    convert_file_to_nf4(src, out, double_quant=True)
    ident = identify_path(out)
    assert [c["key"] for c in ident.quantization["caveat_keys"]] == ["quant.caveat.bnb4_loaders", "quant.caveat.double_quant"]
    console = Console(record=True, width=400)
    console.print(render_identity(ident, lang, verbose=True))
    text = console.export_text()
    words = catalogue(lang)
    assert words["quant.caveat.bnb4_loaders"] in text
    assert words["quant.caveat.double_quant"].format(n=2, total=2) in text
    assert "2 NF4" in text
    if lang != "en":
        assert "bits/weight," not in text and "custom node" not in text


def _one_line_refusal(r, tmp, *names):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for name in names:
        assert name in r.stderr, r.stderr


def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(tmp, cli):
    good = {P + "double_blocks.0.img_attn.qkv.weight": _weights((64, 64), "bfloat16", 1),
            P + "double_blocks.0.img_attn.proj.weight": _weights((64, 64), "bfloat16", 2)}
    # a Linear weight that is not a float tensor
    bad = write_tensors(tmp / "int.safetensors", {**good, P + "img_in.weight": np.ones((8, 8), np.int32)})
    r = cli("convert", bad, "--to", "nf4", "-o", tmp / "o.safetensors")
    _one_line_refusal(r, tmp, "img_in.weight", "int.safetensors")
    # a file that is already 4-bit
    src = write_tensors(tmp / "m.safetensors", good)
    first = tmp / "m-nf4.safetensors"
    assert cli("convert", src, "--to", "nf4").returncode == 0 and first.exists()
    r = cli("convert", first, "--to", "nf4", "-o", tmp / "again.safetensors")
    _one_line_refusal(r, tmp, "already", "m-nf4.safetensors")
    # the output exists: kept as it was
    before = first.read_bytes()
    r = cli("convert", src, "--to", "nf4")
    _one_line_refusal(r, tmp, "exists", "m-nf4.safetensors")
    assert first.read_bytes() == before
    # not an architecture whose Linear weights sdtk lists; bad options
    vae = write_layout(tmp / "vae.safetensors", "vae-sd-kl-f8", scale=8)
    _one_line_refusal(cli("convert", vae, "--to", "nf4", "-o", tmp / "v.safetensors"), tmp, "NF4")
    _one_line_refusal(cli("convert", src, "--to", "nf4", "--blocksize", "48", "-o", tmp / "b.safetensors"), tmp, "48")
    _one_line_refusal(cli("convert", src, "--to", "nf4", "--dtype", "fp16", "-o", tmp / "d.safetensors"), tmp, "--to nf4")
    _one_line_refusal(cli("convert", src, "--nf4-double-quant", "-o", tmp / "e.safetensors"), tmp, "--nf4-double-quant")
    _one_line_refusal(cli("convert", src, "--to", "nf4", "-o", tmp / "x.gguf"), tmp, ".safetensors")
    leftovers = sorted(p.name for p in tmp.iterdir())
    assert leftovers == sorted(["int.safetensors", "m.safetensors", "m-nf4.safetensors", "vae.safetensors"]), leftovers
