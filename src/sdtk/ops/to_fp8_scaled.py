"""`convert --to fp8-scaled`: ComfyUI's current per-layer scaled-fp8 form (sdtk.quant.fp8_scaled)
for the diffusion model's Linear weights; everything else is copied as it is. Streams, atomic."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdtk.errors import UsageError
from sdtk.formats.safetensors import write_safetensors
from sdtk.ops.cast import cast_array
from sdtk.ops.gguf_rules import strip_prefix
from sdtk.quant.fp8_scaled import E4M3_MAX, FORMAT_JSON, detect, keep_high_precision
from sdtk.tensors import DTYPES, LazyTensor


def convert_file_to_fp8_scaled(source: Path, output: Optional[Path] = None, out_folder: Optional[Path] = None,
                               overwrite: bool = False, progress=None) -> dict:
    from sdtk.formats import open_model
    from sdtk.quant.views import dequantize_catalogue

    with open_model(source) as cat:
        if detect(cat.tensors):
            raise UsageError(source, "is already fp8-scaled")
        dequantize_catalogue(cat)  # an NF4 or GGUF input: its values
        dest = output if (output is not None and not output.is_dir()) else (
            (output if output is not None else (out_folder or source.parent)) / f"{source.stem}-fp8-scaled.safetensors")
        if dest.suffix.lower() != ".safetensors":
            raise UsageError(dest, "an fp8-scaled output is a .safetensors file")
        prefix, _ = strip_prefix(list(cat.tensors))
        in_model = (lambda name: name.startswith(prefix)) if prefix in ("model.diffusion_model.", "model.") else (lambda name: True)
        plan, n = scaled_plan(list(cat.tensors.values()), in_model)
        if progress is not None:
            progress.start(dest, sum(t.nbytes for t in plan))
        try:
            written = write_safetensors(dest, plan, dict(cat.metadata), inputs=[cat.path], overwrite=overwrite,
                                        on_tensor=(lambda t, done: progress.advance(done)) if progress else None)
        finally:
            if progress is not None:
                progress.done()
    return {
        "input": str(source), "architecture": None, "prediction_type": None, "weight_set": None,
        "operations": [f"fp8-scaled ({n} Linear weights as float8_e4m3fn + weight_scale + comfy_quant)"],
        "outputs": [{"part": "model", "path": str(dest), "tensors": len(plan), "bytes": written, "sidecar": None}],
        "dropped": [], "dropped_training_state": [], "overflow": {}, "sidecar": None,
        "notes": ["norms, biases, embedders and the input/final layers keep their precision"],
        "source_hashes": "skipped", "input_replaced": False,
    }


def scaled_plan(tensors: List[LazyTensor], is_model_weight) -> Tuple[List[LazyTensor], int]:
    """The current ComfyUI form for every 2-D float Linear weight `is_model_weight(name)` accepts:
    weight (fp8 e4m3fn), weight_scale (f32 scalar), comfy_quant (uint8 JSON). Returns (plan, n)."""
    plan: List[LazyTensor] = []
    n = 0
    for t in tensors:
        if not (t.dtype.is_float and is_model_weight(t.name)) or keep_high_precision(t.name, t.shape):
            plan.append(t)
            continue
        layer = t.name[: -len(".weight")]
        state: Dict[str, np.ndarray] = {}

        def compute(t=t, state=state):
            if "q" not in state:
                w = np.asarray(t.read(), dtype=np.float32)
                amax = float(np.max(np.abs(w))) if w.size else 0.0
                scale = np.float32(amax / E4M3_MAX) if amax > 0 else np.float32(1.0)
                q, _ = cast_array(w / scale, DTYPES["F8_E4M3"])
                state["q"], state["s"] = q, np.array(scale, dtype=np.float32)
            return state

        def weight(compute=compute, state=state):
            q = compute()["q"]
            state.pop("q")  # the scale (written next) stays; the weight is not kept
            return q

        plan.append(LazyTensor(t.name, DTYPES["F8_E4M3"], tuple(t.shape), weight))
        plan.append(LazyTensor(layer + ".weight_scale", DTYPES["F32"], (), lambda state=state: state["s"]))
        plan.append(LazyTensor(layer + ".comfy_quant", DTYPES["U8"], (len(FORMAT_JSON),),
                               lambda: np.frombuffer(FORMAT_JSON, dtype=np.uint8).copy()))
        n += 1
    return plan, n
