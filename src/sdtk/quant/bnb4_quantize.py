"""bitsandbytes 4-bit quantization (NF4 / FP4, plain and double-quantized) in numpy, byte-identical
to bitsandbytes 0.50.2 `quantize_4bit` on the CPU and its `QuantState.as_dict(packed=True)`.

Rules (../shared/reference/quantized-formats.md §4.3; bnb `backends/default/ops.py` quantize_4bit,
`functional.py` quantize_4bit / quantize_blockwise / QuantState.as_dict, `utils.py` pack_dict_to_tensor):
- 4-bit: the row-major flattened values in f32, blocks of `blocksize`; absmax per block (a trailing
  partial block has its own); scaled = clamp(x * f32(1 / max(absmax, 1e-38)), -1, 1) for whole blocks,
  clamp(x / max(absmax, 1e-38), -1, 1) for the partial one (bnb writes the two differently);
  an odd count gets one 0.0 appended; code = bucketize against the midpoints of the sorted table
  (ties to the lower bucket), mapped back through the sort order (FP4); packed high nibble first.
- double quant ("compress_statistics"): offset = mean(absmax) as torch computes it on the CPU (its
  cascade sum, see `torch_sum_f32`), then bnb's CPU kernel `quantize_blockwise` of (absmax - offset)
  with the 8-bit "dynamic" map, blocks of 256 (a 65536-entry lookup table, see `quantize_blockwise`).
"""
from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

import numpy as np

_F32 = np.float32


def _table(hex_be: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_be), dtype=">u4").astype("<u4").view(np.float32).copy()


# bnb functional.get_4bit_type("nf4") / ("fp4") as f32 (reference §4.2), bit patterns big-endian
NF4_CODE = _table("bf800000bf3239b1bf066b30beca32a0be91a24dbe3d353fbdba7871000000003da2faff3e24cae33e7c04dd"
                  "3ead033a3ee1a4b83f1007ab3f3913b33f800000")
FP4_CODE = _table("000000003baaaaab3f2aaaab3f8000003eaaaaab3f0000003e2aaaab3e80000000000000bbaaaaabbf2aaaab"
                  "bf800000beaaaaabbf000000be2aaaabbe800000")
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# bnb functional.create_dynamic_map() (signed, 7 exponent bits, 8 bits): the nested_quant_map
DYNAMIC_CODE = _table("bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999abf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999abd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8abb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70bb8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b2420638378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c0395813c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae1483d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb33343df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d33343e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d00003f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f4833333f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f7366663f7700003f7a999a3f7e33333f800000")
NESTED_BLOCKSIZE = 256  # bnb quantize_4bit: quantize_blockwise(absmax - offset, blocksize=256)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb quantize_4bit's valid blocksizes
TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: a smaller reduction is never split over threads


def _bounds(quant_type: str) -> Tuple[np.ndarray, np.ndarray]:
    """bnb _get_4bit_quantize_bounds: midpoints of the sorted code (f32), and the sort order
    (torch.argsort; its +0.0/0.0 tie at FP4 codes 0 and 8 comes out in index order, as a stable sort)."""
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable")
    s = code[order]
    return ((s[:-1] + s[1:]) / _F32(2)).astype(_F32), order.astype(np.uint8)


CHUNK = 1 << 18  # values handled at a time (a multiple of every blocksize): cache-sized temporaries


def _codes(scaled: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """torch.bucketize(right=False): the number of bounds below each value (15 compares beat a
    binary search by ~3x in numpy)."""
    q = np.zeros(scaled.shape, dtype=np.uint8)
    for b in bounds:
        q += scaled > b
    return q


def quantize_4bit(values: np.ndarray, blocksize: int = 64, quant_type: str = "nf4") -> Tuple[np.ndarray, np.ndarray]:
    """Values (any float array; flattened row-major) -> (packed uint8 [ceil(n/2), 1], absmax f32 [blocks])."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize}: bitsandbytes takes {', '.join(map(str, BLOCKSIZES))}")
    x = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    n = x.size
    full = n - n % blocksize
    bounds, order = _bounds(quant_type)
    codes = np.empty(n + (n & 1), dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=_F32)
    for start in range(0, full, CHUNK):
        whole = x[start:min(start + CHUNK, full)].reshape(-1, blocksize)
        am = np.abs(whole).max(axis=1)
        absmax[start // blocksize:start // blocksize + am.size] = am
        inv = (_F32(1) / np.maximum(am, _F32(1e-38))).astype(_F32)
        scaled = whole * inv[:, None]
        np.clip(scaled, -1, 1, out=scaled)
        codes[start:start + scaled.size] = _codes(scaled.reshape(-1), bounds)
    if full < n:
        am = _F32(np.abs(x[full:]).max())
        absmax[-1] = am
        codes[full:n] = _codes(np.clip(x[full:] / max(am, _F32(1e-38)), -1, 1), bounds)
    if n & 1:
        codes[n] = _codes(np.zeros(1, _F32), bounds)[0]
    if quant_type != "nf4":
        codes = order[codes]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def torch_sum_f32(x: np.ndarray, lanes: int = 8) -> np.float32:
    """torch's CPU sum of a contiguous 1-D f32 tensor on one thread (ATen SumKernel.cpp cascade_sum:
    vectorized_inner_sum -> row_sum (4-way ILP) -> multi_row_sum (4 levels); `lanes` floats per
    vector: 8, what torch 2.13 uses here on AVX2 and AVX512 CPUs alike, measured). Exact in f32, operation for operation."""
    x = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    n = x.size
    if n < lanes:  # fewer values than a vector: the scalar row_sum, i.e. one-float "vectors"
        lanes = 1
    nvec = n // lanes
    size = nvec // 4  # rows of 4 vectors (ilp_factor 4)
    level_power = max(4, (1 if size <= 2 else int(size - 1).bit_length()) // 4)  # utils::CeilLog2
    step = 1 << level_power
    mask = step - 1
    rows = x[: size * 4 * lanes].reshape(size, 4, lanes)
    acc = np.zeros((4, 4, lanes), dtype=_F32)
    chunks = size // step
    if chunks:
        c = rows[: chunks * step].reshape(chunks, step, 4, lanes)
        part = c[:, 0].copy()
        for j in range(1, step):
            part += c[:, j]
        i = 0
        for k in range(chunks):
            acc[0] += part[k]  # acc[0] is 0 at the start of each chunk
            i += step
            for j in range(1, 4):
                acc[j] += acc[j - 1]
                acc[j - 1] = 0
                if i & (mask << (j * level_power)):
                    break
    for r in range(chunks * step, size):
        acc[0] += rows[r]
    for j in range(1, 4):
        acc[0] += acc[j]
    partial = acc[0]  # [4 ilp, lanes]
    for v in range(size * 4, nvec):  # vectors left over from the ILP rows
        partial[0] += x[v * lanes:(v + 1) * lanes]
    for k in range(1, 4):
        partial[0] += partial[k]
    total = _F32(0)
    for v in x[nvec * lanes:]:  # scalars after the last whole vector
        total = _F32(total + v)
    for v in partial[0]:
        total = _F32(total + v)
    return total


def torch_mean_f32(x: np.ndarray, lanes: int = 8) -> np.float32:
    """torch.mean on the CPU: sum (above), then divided by the count in f32."""
    return _F32(torch_sum_f32(x, lanes) / _F32(x.size))


LUT_SIZE = 65536  # bnb cpu_ops.cpp kLUTSize


def _lut(code: np.ndarray) -> np.ndarray:
    """bnb build_quantize_lut: for each of 65536 points of [-1, 1] (v_i = -1 + 2i/65535 in f32) the
    number of code midpoints (0.5 * (c[k] + c[k+1]), f32) below it."""
    c = code.astype(_F32)
    mid = (_F32(0.5) * (c[:-1] + c[1:])).astype(_F32)
    i = np.arange(LUT_SIZE)
    val = (_F32(-1) + (_F32(2) * i.astype(_F32)) / _F32(LUT_SIZE - 1)).astype(_F32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


_DYNAMIC_LUT = _lut(DYNAMIC_CODE)


def quantize_blockwise(values: np.ndarray, blocksize: int = NESTED_BLOCKSIZE) -> Tuple[np.ndarray, np.ndarray]:
    """bnb 0.50's CPU kernel cquantize_blockwise_cpu_fp32 with the dynamic map (cpu_ops.cpp
    quantize_cpu_impl): per block absmax; v = x * f32(1 / absmax); the code is
    lut[trunc(((clamp(v, -1, 1) + 1) * 0.5) * 65535 + 0.5)] (all f32); an all-zero block gives code 0.
    Returns (uint8 codes, absmax f32 per block)."""
    x = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    pad = np.zeros(nb * blocksize, dtype=_F32)
    pad[:n] = x
    blocks = pad.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(_F32)
    zero = absmax == 0
    inv = (_F32(1) / np.where(zero, _F32(1), absmax)).astype(_F32)
    v = np.clip(blocks * inv[:, None], _F32(-1), _F32(1))
    t = ((v + _F32(1)) * _F32(0.5)) * _F32(LUT_SIZE - 1) + _F32(0.5)
    codes = _DYNAMIC_LUT[t.astype(np.int64)]
    codes[zero] = 0
    return codes.reshape(-1)[:n], absmax


def double_quant(absmax: np.ndarray, lanes: int = 8) -> Tuple[np.ndarray, np.ndarray, np.float32]:
    """absmax (f32) -> (uint8 codes, nested_absmax f32, offset)."""
    offset = torch_mean_f32(absmax, lanes)
    codes, nested = quantize_blockwise((absmax - offset).astype(_F32))
    return codes, nested, offset


def state_json(quant_type: str, blocksize: int, dtype: str, shape: Sequence[int],
               nested_offset: Optional[float] = None) -> bytes:
    """The `quant_state.bitsandbytes__<type>` bytes: json.dumps of as_dict's non-tensor items in order."""
    d = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": [int(s) for s in shape]}
    if nested_offset is not None:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": float(nested_offset)})
    return json.dumps(d).encode("utf-8")
