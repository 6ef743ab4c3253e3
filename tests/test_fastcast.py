"""The C cast paths (sdtk._fastcast via sdtk.fastcast: F16C fp16, fp8, bf16) give numpy's and
ml_dtypes' exact bits and overflow counts, and the numpy fallback is taken when off or missing."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from sdtk import fastcast
from sdtk.ops.cast import cast_array
from sdtk.tensors import dtype as dtype_named

HAVE_EXT = fastcast._ext is not None
HAVE_FAST = HAVE_EXT and fastcast._ext.has_f16c()
FP8 = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def test_extension_is_built_where_ci_requires_it():
    # .ci/run sets SDTK_REQUIRE_FASTCAST=1: there, a failed (optional) build must not go unnoticed.
    if os.environ.get("SDTK_REQUIRE_FASTCAST") == "1":
        assert fastcast._ext is not None, "sdtk._fastcast was not built"
        assert fastcast.status() in ("F16C", "numpy (this CPU has no F16C)")


def _edge_float32_bits() -> np.ndarray:
    """Every sign/exponent/top-7-mantissa-bit prefix combined with the low-bit patterns that
    decide fp16 rounding (ties, just below, just above), plus random bit patterns: every class
    of value (zero, fp16 subnormal results, normal, overflow to inf, inf, quiet and signalling
    NaN with payloads)."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
                    0xFFFF, 0x5A5A, 0xE001], dtype=np.uint32)
    rng = np.random.default_rng(7)
    return np.concatenate([(high[:, None] | low[None, :]).reshape(-1),
                           rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)])


@pytest.mark.skipif(not HAVE_FAST, reason="needs the built extension on an F16C CPU")
def test_f32_to_f16_equals_numpy_bit_for_bit_with_overflow_count():
    f = _edge_float32_bits().view(np.float32)
    with np.errstate(all="ignore"):
        expected = f.astype(np.float16)
    out = np.empty_like(expected)
    overflow = fastcast.cast_into(f, out)
    assert np.array_equal(out.view(np.uint16), expected.view(np.uint16))
    assert overflow == int(np.count_nonzero(np.isinf(expected) & np.isfinite(f))) > 0


@pytest.mark.skipif(not HAVE_FAST, reason="needs the built extension on an F16C CPU")
def test_f16_to_f32_every_half_value_equals_numpy():
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    got = fastcast.astype(h, np.float32)
    assert np.array_equal(got.view(np.uint32), h.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("length", [0, 1, 7, 8, 15, 16, 17, 4095, 4096, 4097, 100_003])
def test_odd_lengths_and_shapes(length):
    rng = np.random.default_rng(length)
    a = (rng.standard_normal(length) * 3e4).astype(np.float32)  # some values overflow fp16
    with np.errstate(all="ignore"):
        expected = a.astype(np.float16)
    assert np.array_equal(fastcast.astype(a, np.float16).view(np.uint16), expected.view(np.uint16))
    out = np.empty(length, np.float16)
    fastcast.assign(out, a)
    assert np.array_equal(out.view(np.uint16), expected.view(np.uint16))


def test_non_contiguous_and_big_endian_inputs_fall_back_to_numpy():
    a = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    assert fastcast.cast_into(a[:, ::2], np.empty((64, 32), np.float16)) is None
    assert np.array_equal(fastcast.astype(a[:, ::2], np.float16), a[:, ::2].astype(np.float16))
    big = a.astype(">f4")
    assert fastcast.cast_into(big, np.empty(a.shape, np.float16)) is None
    assert np.array_equal(fastcast.astype(big, np.float16), a.astype(np.float16))


def test_switch_off_gives_numpy_path_and_same_results(monkeypatch):
    a = (np.random.default_rng(2).standard_normal(3 << 20) * 2e4).astype(np.float32)
    fast, fast_overflow = cast_array(a, dtype_named("F16"))
    monkeypatch.setenv("SDTK_FASTCAST", "off")
    assert fastcast.status().startswith("numpy")
    assert fastcast.cast_into(a, np.empty(a.shape, np.float16)) is None
    slow, slow_overflow = cast_array(a, dtype_named("F16"))
    assert np.array_equal(fast.view(np.uint16), slow.view(np.uint16))
    assert fast_overflow == slow_overflow > 0


def test_version_reports_the_cast_path():
    from conftest import run_cli

    r = run_cli("--version")
    assert r.returncode == 0
    assert f"fp16 casts: {fastcast.status()}" in r.stdout


def _fp8_edge_bits() -> np.ndarray:
    """As _edge_float32_bits, with the low-bit patterns that decide fp8 rounding (bit 20/21 ties)."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x3FFF, 0x4000, 0x4001, 0x7FFF, 0x8000, 0x8001, 0xBFFF, 0xC000, 0xFFFF, 0x1FFF,
                    0x2000, 0x2001, 0xE001], dtype=np.uint32)
    rng = np.random.default_rng(11)
    return np.concatenate([(high[:, None] | low[None, :]).reshape(-1),
                           rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)])


@pytest.mark.skipif(not HAVE_EXT, reason="needs the built extension")
@pytest.mark.parametrize("name", sorted(FP8))
def test_f32_to_fp8_equals_ml_dtypes_bit_for_bit(name):
    f = _fp8_edge_bits().view(np.float32)
    with np.errstate(all="ignore"):
        expected = f.astype(FP8[name])
    out = np.empty(f.shape, FP8[name])
    overflow = fastcast.cast_into(f, out)
    assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))
    became_non_finite = ~np.isfinite(expected.astype(np.float32)) & np.isfinite(f)
    assert overflow == int(np.count_nonzero(became_non_finite)) > 0


@pytest.mark.skipif(not HAVE_EXT, reason="needs the built extension")
def test_saturating_e4m3fn_equals_clip_then_cast_as_torch_does():
    f = _fp8_edge_bits().view(np.float32)
    with np.errstate(all="ignore"):
        expected = np.clip(f, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    out = np.empty(f.shape, ml_dtypes.float8_e4m3fn)
    clipped = fastcast.cast_into(f, out, saturate=True)
    assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))
    assert clipped == int(np.count_nonzero(np.isfinite(f) & (np.abs(f) > 448)))


@pytest.mark.skipif(not HAVE_FAST, reason="needs the built extension on an F16C CPU")
@pytest.mark.parametrize("src, dst", [(s, d) for s in ("bfloat16", "float16")
                                      for d in ("float32", "float16", "bfloat16", "e4m3fn", "e5m2") if s != d])
def test_every_16_bit_value_to_each_target_equals_the_reference(src, dst):
    """Exhaustive: all 65,536 bit patterns of a 16-bit source (widened exactly, then rounded)."""
    src_dt = ml_dtypes.bfloat16 if src == "bfloat16" else np.float16
    dst_dt = FP8.get(dst) or (ml_dtypes.bfloat16 if dst == "bfloat16" else np.dtype(dst))
    a = np.arange(1 << 16, dtype=np.uint16).view(src_dt)
    with np.errstate(all="ignore"):
        expected = a.astype(dst_dt)
    got = fastcast.astype(a, dst_dt)
    width = np.dtype(dst_dt).itemsize
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32}[width]
    if not (np.dtype(dst_dt) == np.float32 or fastcast._kernel(np.dtype(src_dt), np.dtype(dst_dt)) is not None):
        pytest.fail(f"no fast path for {src} -> {dst}")
    assert np.array_equal(got.view(view), expected.view(view))


@pytest.mark.parametrize("target", ["F8_E4M3", "F8_E5M2", "F16", "BF16"])
@pytest.mark.parametrize("source", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_cast_array_fast_and_fallback_agree(monkeypatch, target, source):
    a = (np.random.default_rng(5).standard_normal(3 << 19) * 600).astype(np.float32).astype(source)
    fast, fast_n = cast_array(a, dtype_named(target))
    monkeypatch.setenv("SDTK_FASTCAST", "off")
    slow, slow_n = cast_array(a, dtype_named(target))
    assert np.array_equal(fast.view(np.uint8), slow.view(np.uint8)) and fast_n == slow_n


@pytest.mark.skipif(not HAVE_FAST, reason="needs the built extension on an F16C CPU")
@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.7123456789, 1.5, -0.25])
def test_fused_fp16_weighted_sum_equals_the_unfused_float32_steps(alpha):
    """A merge's weighted sum of two fp16 tensors in one C pass gives the bits of widening,
    `(1 - alpha) * A + alpha * B` in float32 (numpy, NEP 50 scalars) and the fp16 cast; every
    16-bit pattern of A meets random and special B values."""
    a = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    rng = np.random.default_rng(11)
    b = (rng.standard_normal(a.size) * 100).astype(np.float16)
    b[::97] = np.float16(65504)
    b[5::101] = np.float16(np.inf)
    b[7::89] = np.uint16(0x7C01).view(np.float16)  # signalling NaN
    b[3::83] = np.uint16(0xFE55).view(np.float16)  # negative quiet NaN with a payload
    out = np.empty_like(a)
    overflow = fastcast.weighted_sum_f16(a, b, out, 1 - alpha, alpha)
    with np.errstate(all="ignore"):
        wide = (1 - alpha) * a.astype(np.float32) + alpha * b.astype(np.float32)
        want = wide.astype(np.float16)
    # exact bits, NaN payloads included, wherever at most one input is NaN; where both are, which
    # payload survives is the compiler's choice (in numpy's loops too): a NaN is all that is asked
    both = np.isnan(a) & np.isnan(b)
    assert both.sum() > 0
    assert np.array_equal(out.view(np.uint16)[~both], want.view(np.uint16)[~both])
    assert np.isnan(out[both]).all()
    tail = slice(5, 5 + 13)  # a length that is not a multiple of 16 (the scalar tail)
    out13 = np.empty(13, np.float16)
    fastcast.weighted_sum_f16(a[tail].copy(), b[tail].copy(), out13, 1 - alpha, alpha)
    assert np.array_equal(out13.view(np.uint16)[~both[tail]], want[tail].view(np.uint16)[~both[tail]])
    assert overflow == int(np.count_nonzero(np.isfinite(wide) & ~np.isfinite(want)))


def test_cast_finite_max_table_equals_ml_dtypes():
    """ops.cast decides overflow from a table (no ml_dtypes import): every entry equals ml_dtypes/numpy."""
    import ml_dtypes

    from sdtk.ops.cast import FINITE_MAX
    from sdtk.tensors import dtype

    for name, value in FINITE_MAX.items():
        assert value == float(ml_dtypes.finfo(dtype(name).numpy).max), name
