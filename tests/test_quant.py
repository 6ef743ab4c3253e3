"""ggml block quantization: sdtk's quantizers and dequantizers against gguf-py 0.19.0 (the oracle),
and the C extension against the numpy fallback (same bytes)."""
from __future__ import annotations

import ctypes
import os

import ml_dtypes
import numpy as np
import pytest

from sdtk.quant import quantize as qmod
from sdtk.quant.dequant import DECODERS, dequantize
from sdtk.quant.ggml_types import BY_ID, BY_NAME

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Relative RMS error of ggml's reference quantizers on N(0, 0.02) bf16 weights
# (../shared/reference/quantized-formats.md §9.2), with 10 % headroom for the sample.
REL_RMS = {"Q8_0": 0.0054, "Q6_K": 0.018, "Q5_K": 0.036, "Q5_1": 0.038, "Q5_0": 0.043, "Q4_K": 0.071,
           "Q4_1": 0.078, "Q4_0": 0.086, "Q3_K": 0.15, "Q2_K": 0.30}


def value_sets(n: int = 256 * 64, seed: int = 0):
    """Weight-like data of several kinds: bf16-rounded Gaussian, heavy tails, small integers, zero blocks, ties."""
    rng = np.random.default_rng(seed)
    gauss = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
    heavy = (rng.standard_t(3, n) * 0.01).astype(np.float32)
    ints = rng.integers(-8, 8, n).astype(np.float32)
    mixed = np.where(rng.random(n) < 0.3, 0, rng.standard_normal(n)).astype(np.float32)
    mixed[:512] = 0  # whole zero blocks and super-blocks
    mixed[512:768] = 1.0  # a constant super-block
    mixed[768:800] = np.arange(32, dtype=np.float32) - 15.5  # exact halves
    return {"gauss": gauss, "heavy": heavy, "ints": ints, "mixed": mixed}


def test_type_table_matches_gguf_py():
    for qt, (block, nbytes) in gguf.GGML_QUANT_SIZES.items():
        t = BY_ID[int(qt)]
        assert (t.name, t.block, t.nbytes) == (qt.name, block, nbytes)


@pytest.mark.parametrize("name", list(DECODERS))
def test_dequantize_is_bit_identical_to_gguf_py_on_any_bytes(name):
    t = BY_NAME[name]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(9, 4 * t.nbytes), dtype=np.uint8)  # every bit pattern, NaN/inf scales too
    with np.errstate(all="ignore"):
        want = gguf_dequantize(raw, gguf.GGMLQuantizationType[name])
    got = dequantize(raw.reshape(-1), t, want.size).reshape(want.shape)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quants_byte_identical_to_gguf_py(name):
    t = BY_NAME[name]
    for kind, x in value_sets().items():
        want = gguf_quantize(x.reshape(-1, 256), gguf.GGMLQuantizationType[name]).reshape(-1)
        assert np.array_equal(qmod.quantize(x, t), want), kind
        assert np.array_equal(qmod.quantize(x, t, use_c=False), want), kind


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_c_extension_and_numpy_fallback_give_the_same_bytes(name):
    if not qmod.have_c():
        pytest.skip("the C extension sdtk._quant is not built (python setup.py build_ext --inplace)")
    t = BY_NAME[name]
    for kind, x in value_sets(256 * 32, seed=3).items():
        assert np.array_equal(qmod.quantize(x, t), qmod.quantize(x, t, use_c=False)), kind


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_quantization_error_within_the_reference_figures(name):
    t = BY_NAME[name]
    x = value_sets(256 * 256, seed=5)["gauss"]
    q = qmod.quantize(x, t)
    back = gguf_dequantize(q.reshape(-1, t.nbytes), gguf.GGMLQuantizationType[name]).reshape(-1)
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rel < REL_RMS[name] * 1.1
    # and sdtk reads back the same values gguf-py does
    assert np.array_equal(dequantize(q, t, x.size), back)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_float_types_match_gguf_py(name):
    x = value_sets()["heavy"]
    x[:4] = [np.nan, np.inf, -np.inf, 1e30]
    want = gguf_quantize(x, gguf.GGMLQuantizationType[name])
    assert qmod.quantize(x, BY_NAME[name]).tobytes() == np.ascontiguousarray(want).tobytes()


def test_row_not_a_whole_number_of_blocks_is_refused():
    with pytest.raises(ValueError, match="whole number"):
        qmod.quantize(np.zeros(48, np.float32), BY_NAME["Q8_0"])


@pytest.mark.skipif(not os.environ.get("SDTK_GGML_REF_LIB"), reason="set SDTK_GGML_REF_LIB to a ggml-quants.c built with -ffp-contract=off (shared library) to compare K-quants with ggml itself")
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_byte_identical_to_ggml_reference_build(name):
    lib = ctypes.CDLL(os.environ["SDTK_GGML_REF_LIB"])
    fn = getattr(lib, f"quantize_row_{name.lower().replace('_k', '_K')}_ref")
    t = BY_NAME[name]
    for kind, x in value_sets(256 * 128, seed=11).items():
        out = np.zeros(x.size // t.block * t.nbytes, np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        assert np.array_equal(qmod.quantize(x, t), out), kind
        assert np.array_equal(qmod.quantize(x, t, use_c=False), out), kind
