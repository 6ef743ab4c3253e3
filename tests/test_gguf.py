"""GGUF: the reader against gguf-py 0.19.0 (files it writes; its dequantizer), hostile and broken
headers, and `sdtk convert --to gguf` outputs checked with gguf.GGUFReader, gguf.quants and
ComfyUI-GGUF's own loader."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_convert import write_layout, write_tensors
from sdtk.errors import FormatError, SdtkError, UnsupportedFormatError
from sdtk.formats import open_model
from sdtk.formats.gguf import GGUFOutTensor, GGUFValue, gguf_header, read_gguf
from sdtk.ops import gguf_rules
from sdtk.quant.ggml_types import BY_NAME
from sdtk.samples import load_layout

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO.parent / "shared" / "clients"
QT = gguf.GGMLQuantizationType


def gguf_py_file(path: Path) -> Path:
    """A file written by gguf-py itself: every type sdtk decodes, a 5-D tensor, an orig_shape KV."""
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), arch="flux")
    w.add_quantization_version(2)
    w.add_array("comfy.gguf.orig_shape.conv.weight", [32, 4, 4, 4])
    w.add_array("tokens", ["a", "bb", "ccc"])
    base = (rng.standard_normal((16, 512), dtype=np.float32) * 0.02)
    w.add_tensor("f32", base)
    w.add_tensor("f16", base.astype(np.float16))
    for name in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        w.add_tensor(name.lower(), gguf_quantize(base, QT[name]), raw_dtype=QT[name])
    # K-quants: gguf-py cannot quantize them, so the blocks are random bytes with sane scales
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        b, s = gguf.GGML_QUANT_SIZES[QT[name]]
        raw = rng.integers(0, 256, size=(16, 512 // b * s), dtype=np.uint8)
        w.add_tensor(name.lower(), raw, raw_dtype=QT[name])
    w.add_tensor("five_d", rng.standard_normal((2, 3, 1, 4, 5), dtype=np.float32))
    w.add_tensor("conv.weight", gguf_quantize(base[:8].reshape(8, 512)[:, :256].copy().reshape(8, 256), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_gguf_py_files_bit_identically(tmp):
    path = gguf_py_file(tmp / "ref.gguf")
    reader = gguf.GGUFReader(str(path))
    with open_model(path) as cat:
        assert cat.format == "gguf" and cat.architecture == "flux" and cat.alignment == 32
        assert cat.kv["tokens"].value == ["a", "bb", "ccc"]
        assert [t.name for t in reader.tensors] == list(cat.tensors)
        for rt in reader.tensors:
            t = cat.tensors[rt.name]
            assert t.ggml_type.name == rt.tensor_type.name
            assert t.ne == tuple(int(d) for d in rt.shape)
            with np.errstate(all="ignore"):
                want = np.asarray(gguf_dequantize(rt.data, rt.tensor_type), dtype=np.float32)
            got = np.asarray(t.read(), dtype=np.float32)
            if rt.name == "conv.weight":
                assert got.shape == (32, 4, 4, 4)  # comfy.gguf.orig_shape
            elif rt.name == "five_d":
                assert got.shape == (2, 3, 1, 4, 5)
            else:
                assert got.shape == tuple(reversed(t.ne))
            same = (got.reshape(-1).view(np.uint32) == want.reshape(-1).view(np.uint32)) | (np.isnan(got.reshape(-1)) & np.isnan(want.reshape(-1)))
            assert same.all(), rt.name


def test_scan_and_inspect_accept_gguf(tmp, cli):
    path = gguf_py_file(tmp / "ref.gguf")
    r = cli("scan", path)
    assert r.returncode == 0 and r.stdout.startswith("safe"), r.stdout + r.stderr
    r = cli("inspect", path)
    assert r.returncode in (0, 1), r.stderr
    assert "gguf" in r.stdout


# ---- broken and hostile files ----------------------------------------------------------------


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def handmade(kv: bytes = b"", n_kv: int = 0, infos=(), data: bytes = b"", version: int = 3, n_tensors=None, align: int = 32) -> bytes:
    """GGUF bytes assembled field by field (infos: (name, ne, type id, offset))."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors, n_kv) + kv
    for name, ne, tid, off in infos:
        out += _string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", tid, off)
    out += b"\x00" * ((-len(out)) % align)
    return out + data


GOOD = handmade(infos=[("a", (32, 2), 8, 0)], data=b"\x00" * 68)


@pytest.mark.parametrize("blob, message", [
    (GOOD[:-10], "a': Q8_0 [32, 2] needs bytes 0..68"),
    (GOOD[:40], "truncated or corrupt GGUF"),
    (b"GGUF\x01\x00\x00\x00" + b"\x00" * 16, "version 1"),
    (b"GGUF\x00\x00\x00\x03" + b"\x00" * 16, "big-endian"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40), "KV pairs"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "tensors"),
    (handmade(kv=_string("x") + struct.pack("<IIQ", 9, 6, 1 << 50), n_kv=1), "array of 1125899906842624 FLOAT32 items cannot fit"),
    (handmade(kv=_string("x") + struct.pack("<I", 99), n_kv=1), "unknown value type 99"),
    (handmade(kv=(_string("k") + struct.pack("<I", 4) + struct.pack("<I", 1)) * 2, n_kv=2), "'k' appears twice"),
    (handmade(infos=[("a", (32,), 8, 0), ("a", (32,), 8, 64)], data=b"\x00" * 128), "'a' appears twice"),
    (handmade(infos=[("a", (32, 2), 99, 0)], data=b"\x00" * 68), "unknown ggml type id 99"),
    (handmade(infos=[("a", (33,), 8, 0)], data=b"\x00" * 68), "not a multiple of the Q8_0 block size"),
    (handmade(infos=[("a", (32,), 8, 8)], data=b"\x00" * 68), "not a multiple of the alignment 32"),
    (handmade(infos=[("a", (32, 2), 8, 1 << 40)], data=b"\x00" * 68), "out of range"),
    (handmade(infos=[("a", (1 << 40, 1 << 40, 1 << 40), 0, 0)], data=b"\x00" * 68), "needs bytes"),
    (handmade(infos=[("a", tuple([2] * 40), 0, 0)], data=b"\x00" * 68), "40 dimensions"),
    (handmade(infos=[("a", (32, 2), 8, 0), ("b", (32,), 8, 64)], data=b"\x00" * 128), "overlap"),
    (handmade(kv=_string("general.alignment") + struct.pack("<II", 4, 48), n_kv=1, infos=[("a", (32,), 8, 0)], data=b"\x00" * 64, align=48),
     "bad alignment 48"),
    (handmade(kv=_string("general.alignment") + struct.pack("<I", 10) + struct.pack("<Q", 32), n_kv=1), "must be UINT32"),
])
def test_broken_gguf_is_refused_in_one_line(tmp, cli, blob, message):
    path = tmp / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(SdtkError) as err:
        with open_model(path):
            pass
    assert message in str(err.value)
    r = cli("inspect", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(path) in r.stderr


def test_unknown_to_sdtk_but_known_ggml_type_is_listed_and_refused_on_read(tmp):
    path = tmp / "iq.gguf"
    path.write_bytes(handmade(infos=[("a", (256,), 20, 0)], data=b"\x00" * 160))  # IQ4_NL: 8 blocks of 18 bytes
    with open_model(path) as cat:
        assert cat.tensors["a"].ggml_type.name == "IQ4_NL"
        with pytest.raises(UnsupportedFormatError, match="IQ4_NL"):
            cat.tensors["a"].read()


def test_good_handmade_file_reads(tmp):
    path = tmp / "good.gguf"
    path.write_bytes(GOOD)
    with read_gguf(path) as cat:
        assert cat.tensors["a"].shape == (2, 32) and not cat.tensors["a"].read().any()


# ---- writing: sdtk convert --to gguf ------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-src")
    # FLUX at 1/16 scale keeps rows of 192 and 768 (multiples of 32) for the legacy types; SD1.5
    # at 1/4 keeps 3x3 convs of 80*80*9 = 225*256 elements for the reshape rule.
    flux = write_layout(d / "flux.safetensors", "flux1-dev", scale=16)
    sd15 = write_layout(d / "sd15.safetensors", load_layout("sd15-emaonly").with_dtype("float16"), scale=4)
    # full-width FLUX rows so K-quants apply (3072 = 12 x 256): a few real tensors at real shape
    rng = np.random.default_rng(3)
    kq = {
        "model.diffusion_model.double_blocks.0.img_attn.proj.weight": rng.standard_normal((3072, 3072), dtype=np.float32) * 0.02,
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": rng.standard_normal((1536, 3072), dtype=np.float32) * 0.02,
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": np.ones(128, np.float32),
        "model.diffusion_model.img_in.weight": rng.standard_normal((3072, 64), dtype=np.float32) * 0.02,
        "model.diffusion_model.single_blocks.0.linear2.weight": rng.standard_normal((256, 3072 + 64), dtype=np.float32) * 0.02,
    }
    import ml_dtypes

    kq = {k: v.astype(ml_dtypes.bfloat16) for k, v in kq.items()}
    kflux = write_tensors(d / "kflux.safetensors", kq)
    return {"flux": flux, "sd15": sd15, "kflux": kflux, "dir": d}


def _convert(cli, src: Path, quant: str, out: Path):
    r = cli("convert", src, "--to", "gguf", "--quant", quant, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_quant_tensors_byte_identical_to_gguf_py(sources, tmp, cli, quant):
    out = tmp / f"flux-{quant}.gguf"
    summary = _convert(cli, sources["flux"], quant, out)
    assert summary["architecture"] == "flux"
    reader = gguf.GGUFReader(str(out))
    assert str(reader.fields["general.architecture"].parts[-1], "utf-8") == "flux"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType[f"MOSTLY_{quant}"]
    with open_model(sources["flux"]) as src:
        counted = 0
        for rt in reader.tensors:
            assert not rt.name.startswith("model.diffusion_model.")
            t = src.tensors["model.diffusion_model." + rt.name]
            values = np.asarray(t.read(), dtype=np.float32)
            if rt.tensor_type.name == quant:
                want = gguf_quantize(values, rt.tensor_type)
                assert np.array_equal(np.asarray(rt.data).reshape(-1), want.reshape(-1)), rt.name
                counted += 1
            elif values.ndim == 1 or values.size <= 1024:
                assert rt.tensor_type == QT.F32  # city96: 1-D and tiny tensors of a bf16 source stay F32
            elif any(k in rt.name for k in gguf_rules.BY_ARCH["flux"].keep):
                assert rt.tensor_type == QT.BF16  # never-quantized embedders and final layer keep the source type
            else:  # the ffn/down bumps of Q4_0/Q5_0
                assert rt.tensor_type.name == {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[quant]
        assert counted > 200


def test_k_quants_follow_city96_rules_and_stay_within_error(sources, tmp, cli):
    for quant, main, qkv in (("Q4_K_S", "Q4_K", "Q4_K"), ("Q4_K_M", "Q4_K", "Q5_K"), ("Q5_K_M", "Q5_K", "Q6_K"),
                             ("Q6_K", "Q6_K", "Q6_K"), ("Q3_K_S", "Q3_K", "Q3_K"), ("Q2_K", "Q2_K", "Q2_K")):
        out = tmp / f"k-{quant}.gguf"
        summary = _convert(cli, sources["kflux"], quant, out)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types["double_blocks.0.img_attn.proj.weight"] == main
        assert types["double_blocks.0.img_attn.qkv.weight"] == qkv  # the fused-qkv bump
        assert types["img_in.weight"] == "BF16"  # flux keep list
        assert types["single_blocks.0.linear2.weight"] == "F16"  # 3136 % 256 != 0: the F16 fallback
        assert types["double_blocks.0.img_attn.norm.key_norm.scale"] == "F32"
        assert summary["outputs"][0]["ggml_types"][main] >= 1
        with open_model(out) as cat, open_model(sources["kflux"]) as src:
            got = cat.tensors["double_blocks.0.img_attn.proj.weight"].read()
            want = np.asarray(src.tensors["model.diffusion_model.double_blocks.0.img_attn.proj.weight"].read(), np.float32)
            rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
            limit = {"Q6_K": 0.018, "Q5_K": 0.036, "Q4_K": 0.071, "Q3_K": 0.15, "Q2_K": 0.30}[main]
            assert rel < limit * 1.1, (quant, rel)


def test_sd15_conv_reshape_and_orig_shape(sources, tmp, cli):
    out = tmp / "sd15-Q8_0.gguf"
    summary = _convert(cli, sources["sd15"], "Q8_0", out)
    assert summary["architecture"] == "sd1" and summary["dropped"]  # VAE and CLIP left out
    reader = gguf.GGUFReader(str(out))
    conv = "input_blocks.1.0.in_layers.2.weight"  # 3x3 conv [80, 80, 3, 3] at this scale
    field = reader.fields[f"comfy.gguf.orig_shape.{conv}"]
    assert [int(field.parts[i][0]) for i in field.data] == [80, 80, 3, 3]
    rt = next(t for t in reader.tensors if t.name == conv)
    assert rt.tensor_type == QT.Q8_0 and [int(d) for d in rt.shape] == [256, 80 * 80 * 9 // 256]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["input_blocks.0.0.weight"] == "F16" and types["out.2.weight"] == "F16"  # keep list, F16 source
    assert types["time_embed.0.weight"] == "F16"
    with open_model(out) as cat, open_model(sources["sd15"]) as src:
        got = cat.tensors[conv].read()
        assert got.shape == (80, 80, 3, 3)
        want = np.asarray(src.tensors["model.diffusion_model." + conv].read(), np.float32)
        assert np.array_equal(got.reshape(-1), gguf_dequantize(gguf_quantize(want.reshape(-1, 256), QT.Q8_0), QT.Q8_0).reshape(-1))


def test_gguf_to_safetensors_to_gguf_reproduces_the_bytes(sources, tmp, cli):
    first = tmp / "a.gguf"
    _convert(cli, sources["sd15"], "Q8_0", first)
    back = tmp / "a.safetensors"
    r = cli("convert", first, "-o", back, "--no-source-hash")
    assert r.returncode == 0, r.stderr
    again = tmp / "b.gguf"
    _convert(cli, back, "Q8_0", again)
    assert first.read_bytes() == again.read_bytes()


def test_convert_to_gguf_refusals(sources, tmp, cli):
    r = cli("convert", sources["flux"], "--to", "gguf", "-o", tmp / "x.gguf")
    assert r.returncode == 2 and "--quant" in r.stderr
    r = cli("convert", sources["flux"], "--to", "gguf", "--quant", "IQ4_XS", "-o", tmp / "x.gguf")
    assert r.returncode == 2 and "IQ4_XS" in r.stderr
    r = cli("convert", sources["flux"], "--to", "gguf", "--quant", "Q8_0", "--dtype", "fp16", "-o", tmp / "x.gguf")
    assert r.returncode == 2
    vae = write_layout(tmp / "vae.safetensors", "vae-sd-kl-f8", scale=8)
    r = cli("convert", vae, "--to", "gguf", "--quant", "Q8_0", "-o", tmp / "x.gguf")
    assert r.returncode == 2 and "architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp.glob("*.gguf")) and not list(tmp.glob(".*partial"))


def test_header_writer_refuses_bad_plans():
    t = GGUFOutTensor("a", (33,), BY_NAME["Q8_0"], lambda: b"")
    with pytest.raises(ValueError, match="block size"):
        gguf_header({}, [t])
    with pytest.raises(ValueError, match="twice"):
        gguf_header({"k": GGUFValue("UINT32", 1)}, [GGUFOutTensor("b", (32,), BY_NAME["F32"], None)] * 2)


@pytest.mark.skipif(not (CLIENTS / "ComfyUI-GGUF").is_dir(), reason="needs ../shared/clients (ComfyUI, ComfyUI-GGUF snapshots); absent in a user's clone")
def test_outputs_load_in_comfyui_gguf(sources, tmp, cli):
    pytest.importorskip("torch")
    files = []
    for src, quant in (("sd15", "Q4_0"), ("kflux", "Q4_K_M"), ("kflux", "Q2_K")):
        out = tmp / f"{src}-{quant}.gguf"
        _convert(cli, sources[src], quant, out)
        files.append(out)
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "comfyui_gguf_check.py"), str(CLIENTS), str(REPO / "src"),
                        *map(str, files)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for f in files:
        res = results[str(f)]
        assert res["arch"] in ("sd1", "flux") and res["shape_mismatch"] is None, res
        # ComfyUI-GGUF's torch kernels round through f16 in places: agreement to f16 precision
        assert res["worst_rel"] < 2e-3, res


def test_inspect_reports_the_quantization(sources, tmp, cli):
    out = tmp / "k-Q4_K_M.gguf"
    _convert(cli, sources["kflux"], "Q4_K_M", out)
    r = cli("inspect", out, "--json")
    assert r.returncode in (0, 1), r.stderr
    q = json.loads(r.stdout)["files"][0]["quantization"]
    assert q["file_type"] == "Q4_K_M" and q["architecture"] == "flux" and q["main_type"] == "Q4_K"
    reader = gguf.GGUFReader(str(out))
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    assert q["bytes"] == stored and q["bf16_bytes"] == 2 * params
    assert q["bits_per_weight"] == round(stored * 8 / params, 3)
    comp = next(iter(q["components"].values()))
    assert comp["types"] == dict(sorted(__import__("collections").Counter(t.tensor_type.name for t in reader.tensors).items()))
    # img_in (keep list, BF16) and linear2 (F16 fallback) are the high-precision weights
    assert comp["high_precision_weights"] == 2
    assert "AUTOMATIC1111" in q["not_loaders"] and any("ComfyUI-GGUF" in x for x in q["loaders"])
    text = cli("inspect", out).stdout
    assert "Quantization" in text and "bits/weight" in text and "GGUF Q4_K_M" in text


def test_inspect_flags_the_sd_reshape_for_stable_diffusion_cpp(sources, tmp, cli):
    out = tmp / "sd15-Q8_0.gguf"
    _convert(cli, sources["sd15"], "Q8_0", out)
    q = json.loads(cli("inspect", out, "--json").stdout)["files"][0]["quantization"]
    assert not any("stable-diffusion.cpp" in x for x in q["loaders"])
    assert any("orig_shape" in c for c in q["caveats"])
