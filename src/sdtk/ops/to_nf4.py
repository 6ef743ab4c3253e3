"""`convert --to nf4` / `--to fp4`: the bitsandbytes 4-bit layout Forge loads (its FLUX NF4 files),
for every nn.Linear weight of the diffusion model; everything else is copied as it is.

Which weights (../shared/reference/quantized-formats.md §4.1; Forge `backend/operations_bnb.py`):
Forge builds the diffusion model with every nn.Linear replaced by ForgeLoader4Bit, so every Linear
weight is 4-bit; conv, norm, bias and embedding tensors keep their dtype. In the architectures
below every 2-D `*.weight` of the diffusion model is a Linear weight (none has an nn.Embedding):
FLUX.1 (dev, schnell and their finetunes), SD3/3.5 (MMDiT), SDXL and SD1/SD2 UNets (attention,
feed-forward, time/label embedding and, where linear, proj_in/proj_out Linears; convs stay).
Per Linear `L`: `L.weight` packed codes, `L.weight.absmax`, `L.weight.quant_map`, with
double quant `L.weight.nested_absmax` + `L.weight.nested_quant_map`, and
`L.weight.quant_state.bitsandbytes__nf4` (JSON), exactly as bitsandbytes' as_dict(packed=True).
Streams tensor by tensor (sdtk.quant.bnb4_quantize), atomic. Double quant needs the JSON's
nested_offset before the header is written, so it reads each Linear weight once more beforehand.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from sdtk.errors import SdtkError, UsageError
from sdtk.formats.safetensors import write_safetensors
from sdtk.quant import bnb4_quantize as bq
from sdtk.quant import nf4 as nf4_read
from sdtk.tensors import DTYPES, LazyTensor

SUPPORTED = ("flux", "sd3", "sdxl", "sd1")  # gguf_rules architecture names whose 2-D weights are all Linear
# the QuantState dtype bitsandbytes records (its `str(dtype).strip("torch.")`); fp8 values are exact in bf16
_STATE_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32",
                "F8_E4M3": "bfloat16", "F8_E5M2": "bfloat16"}
_AS_FLOAT = {"BF16": None, "F16": None, "F32": None, "F64": "F32", "F8_E4M3": "BF16", "F8_E5M2": "BF16"}


def linear_weight_filter(path, names: List[str]) -> Callable[[LazyTensor], bool]:
    """Which tensors are the diffusion model's Linear weights (raises for other architectures)."""
    from sdtk.ops import gguf_rules as rules

    prefix, mapping = rules.strip_prefix(names)
    try:
        arch = rules.detect_arch(mapping)
    except rules.ArchError:
        arch = None
    if arch is None or arch.name not in SUPPORTED:
        found = f"a {arch.name} model" if arch else "no FLUX.1, SD3, SDXL or SD1/SD2 diffusion model"
        raise SdtkError(path, f"cannot write NF4: {found}; sdtk lists the Linear weights of FLUX.1, SD3, SDXL and SD1/SD2 only")
    in_model = (lambda n: n.startswith(prefix)) if prefix in ("model.diffusion_model.", "model.") else (lambda n: True)
    return lambda t: in_model(t.name) and t.name.endswith(".weight") and len(t.shape) == 2


def _values(t: LazyTensor) -> np.ndarray:
    arr = np.asarray(t.read())
    if arr.dtype.name == "bfloat16":
        return (np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)


def nf4_plan(tensors: List[LazyTensor], is_linear: Callable[[LazyTensor], bool], path=None, quant_type: str = "nf4",
             blocksize: int = 64, double_quant: bool = False) -> Tuple[List[LazyTensor], int]:
    """The bitsandbytes layout for every tensor `is_linear` accepts. Returns (plan, n quantized).
    Raises SdtkError for a Linear weight that is not a float tensor."""
    plan: List[LazyTensor] = []
    n = 0
    code = bq.CODES[quant_type]
    for t in tensors:
        if not is_linear(t):
            plan.append(t)
            continue
        if not t.dtype.is_float:
            raise SdtkError(path, f"cannot write {quant_type.upper()}: Linear weight {t.name} is {t.dtype.short}, not a float tensor")
        shape = tuple(int(s) for s in t.shape)
        count = int(np.prod(shape))
        blocks = -(-count // blocksize)
        offset = None
        if double_quant:  # the JSON holds mean(absmax): one read now, to size the header
            _, am = bq.quantize_4bit(_values(t), blocksize, quant_type)
            offset = bq.torch_mean_f32(am)
        spec = bq.state_json(quant_type, blocksize, _STATE_DTYPE[t.dtype.name], shape,
                             None if offset is None else float(offset))
        state: Dict[str, np.ndarray] = {}

        def weight(t=t, state=state, offset=offset):
            packed, am = bq.quantize_4bit(_values(t), blocksize, quant_type)
            if offset is not None:
                codes, nested, off = bq.double_quant(am)
                if off != offset:  # the file changed while being read
                    raise SdtkError(path, f"{t.name} changed while it was converted")
                state["absmax"], state["nested"] = codes, nested
            else:
                state["absmax"] = am
            return packed

        def take(key, state=state):
            return state.pop(key)

        plan.append(LazyTensor(t.name, DTYPES["U8"], (-(-count // 2), 1), weight))
        plan.append(LazyTensor(t.name + ".absmax", DTYPES["U8" if double_quant else "F32"], (blocks,),
                               lambda take=take: take("absmax")))
        plan.append(LazyTensor(t.name + ".quant_map", DTYPES["F32"], (16,), lambda code=code: code.copy()))
        if double_quant:
            plan.append(LazyTensor(t.name + ".nested_absmax", DTYPES["F32"], (-(-blocks // bq.NESTED_BLOCKSIZE),),
                                   lambda take=take: take("nested")))
            plan.append(LazyTensor(t.name + ".nested_quant_map", DTYPES["F32"], (256,), lambda: bq.DYNAMIC_CODE.copy()))
        plan.append(LazyTensor(f"{t.name}.quant_state.bitsandbytes__{quant_type}", DTYPES["U8"], (len(spec),),
                               lambda spec=spec: np.frombuffer(spec, dtype=np.uint8).copy()))
        n += 1
    return plan, n


def default_name(source: Path, quant_type: str, double_quant: bool, folder: Optional[Path] = None) -> Path:
    return (folder or source.parent) / f"{source.stem}-{quant_type}{'-dq' if double_quant else ''}.safetensors"


def convert_file_to_nf4(source: Path, output: Optional[Path] = None, out_folder: Optional[Path] = None,
                        overwrite: bool = False, progress=None, quant_type: str = "nf4", blocksize: int = 64,
                        double_quant: bool = False) -> dict:
    """The `sdtk convert IN --to nf4` pipeline; returns the JSON summary convert prints."""
    from sdtk.formats import open_model
    from sdtk.quant.views import dequantize_catalogue

    if blocksize not in bq.BLOCKSIZES:
        raise UsageError(None, f"--blocksize {blocksize}: bitsandbytes takes {', '.join(map(str, bq.BLOCKSIZES))}")
    with open_model(source) as cat:
        if nf4_read.detect(cat.tensors):
            raise UsageError(source, "is already bitsandbytes 4-bit (NF4/FP4)")
        dequantize_catalogue(cat)  # a GGUF or fp8-scaled input: its values
        dest = output if (output is not None and not output.is_dir()) else default_name(
            source, quant_type, double_quant, output if (output is not None and output.is_dir()) else out_folder)
        if dest.suffix.lower() != ".safetensors":
            raise UsageError(dest, f"an {quant_type.upper()} output is a .safetensors file")
        if dest.exists() and not overwrite:
            raise UsageError(dest, "exists (--overwrite replaces it)")
        is_linear = linear_weight_filter(cat.path, list(cat.tensors))
        plan, n = nf4_plan(list(cat.tensors.values()), is_linear, cat.path, quant_type, blocksize, double_quant)
        if progress is not None:
            progress.start(dest, sum(t.nbytes for t in plan))
        try:
            written = write_safetensors(dest, plan, dict(cat.metadata), inputs=[cat.path], overwrite=overwrite,
                                        on_tensor=(lambda t, done: progress.advance(done)) if progress else None)
        finally:
            if progress is not None:
                progress.done()
    form = "double-quantized absmax (Forge v1 style)" if double_quant else "f32 absmax (Forge v2 style)"
    return {
        "input": str(source), "architecture": None, "prediction_type": None, "weight_set": None,
        "operations": [f"{quant_type} ({n} Linear weights as bitsandbytes 4-bit, blocks of {blocksize}, {form})"],
        "outputs": [{"part": "model", "path": str(dest), "tensors": len(plan), "bytes": written, "sidecar": None}],
        "dropped": [], "dropped_training_state": [], "overflow": {}, "sidecar": None,
        "notes": ["convs, norms, biases and the text encoders/VAE keep their dtype; Forge loads this file, "
                  "ComfyUI core does not (it needs a bitsandbytes NF4 custom node)"],
        "source_hashes": "skipped", "input_replaced": False,
    }
