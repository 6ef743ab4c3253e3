"""bitsandbytes 4-bit (NF4/FP4, plain and double-quantized) read by sdtk in numpy, against
bitsandbytes 0.50.2's own `dequantize_4bit` on the CPU (the oracle)."""
from __future__ import annotations

import numpy as np
import pytest

from sdtk.errors import FormatError
from sdtk.formats import open_model
from sdtk.quant.views import dequantize_catalogue

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def bnb_dequantize(q, state):
    """bitsandbytes' own dequantization. Its 0.50.2 native CPU kernel counts blocks per row when a
    row is not a whole number of blocks (here 96 values, blocks of 64) and then disagrees with its
    CUDA kernel, which Forge's files come from; its pure-torch backend (`default`) has the flat
    blocks of CUDA, so that one is the oracle for such shapes."""
    if state.shape[-1] % state.blocksize == 0:
        return F.dequantize_4bit(q, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), absmax.float(), _get_4bit_code(state.quant_type, q.device),
                                    state.blocksize, state.shape, state.dtype)


def _save_4bit(path, quant_type: str, double: bool, shape=(256, 320), blocksize=64, drop=()):
    """A Forge-style file: every quantized Linear as `L.weight` + `L.weight.<quant state keys>`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2 * (quant_type == "fp4") + double)
    sd, want = {}, {}
    for i, shp in enumerate((shape, (64, 96), (33, 64))):  # the last: a partial final block
        w = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
        q, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
        name = f"model.diffusion_model.blocks.{i}.attn.qkv.weight"
        sd[name] = q
        for k, v in state.as_dict(packed=True).items():
            sd[f"{name}.{k}"] = v
        want[name] = bnb_dequantize(q, state)
    sd["model.diffusion_model.blocks.0.norm.weight"] = torch.ones(320, dtype=torch.bfloat16)
    for k in drop:
        sd.pop(k)
    save_file(sd, str(path))
    return want


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_dequantize_is_bit_identical_to_bitsandbytes(tmp, quant_type, double):
    path = tmp / "m.safetensors"
    want = _save_4bit(path, quant_type, double)
    with open_model(path) as cat:
        dequantize_catalogue(cat)
        assert not any(".absmax" in k or "quant_state" in k or "quant_map" in k for k in cat.tensors)
        for name, ref in want.items():
            t = cat.tensors[name]
            assert t.dtype.name == "BF16" and t.shape == tuple(ref.shape)
            got = np.asarray(t.read()).view(np.uint16)
            want_bits = ref.view(torch.uint16).numpy()
            if quant_type == "fp4":  # code 8 is -0.0 in bitsandbytes' CUDA kernel (and sdtk), +0.0 in some of its CPU paths
                got = np.where(got == 0x8000, 0, got)
            assert np.array_equal(got, want_bits), name


def test_diff_reads_nf4_values(tmp, cli):
    path = tmp / "m.safetensors"
    _save_4bit(path, "nf4", True)
    r = cli("diff", path, path, "--json")
    assert r.returncode in (0, 2), r.stderr
    assert "Traceback" not in r.stderr


def test_missing_quant_state_is_refused_in_one_line(tmp):
    path = tmp / "m.safetensors"
    _save_4bit(path, "nf4", False, drop=("model.diffusion_model.blocks.1.attn.qkv.weight.quant_state.bitsandbytes__nf4",))
    with open_model(path) as cat, pytest.raises(FormatError, match="missing its quant state"):
        dequantize_catalogue(cat)
    _save_4bit(path, "nf4", True, drop=("model.diffusion_model.blocks.0.attn.qkv.weight.nested_absmax",))
    with open_model(path) as cat, pytest.raises(FormatError, match="nested_absmax"):
        dequantize_catalogue(cat)
