"""Textual-inversion embeddings: read any layout, convert `.pt`/`.bin` to safetensors, merge.

Layouts (what A1111 `textual_inversion.py::create_embedding_from_data` and ComfyUI
`sd1_clip.py::load_embed` accept):
- A1111 `.pt`: `string_to_param` {token: [n, width]} (exactly one term), `string_to_token`,
  `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name`; read by sdtk's restricted pickle reader.
- SDXL: `clip_l` [n, 768] + `clip_g` [n, 1280] (A1111, kohya sdxl_train_textual_inversion.py).
- kohya: `emb_params` [n, width] (sd-scripts train_textual_inversion.py save_weights).
- diffusers concepts (`learned_embeds.bin`): {token: [width] or [n, width]}, one term.
Written: `emb_params` (one text encoder) or `clip_l` + `clip_g` (SDXL), the layouts both A1111
and ComfyUI load from safetensors; the A1111 fields are kept as text metadata.
Merge: vectors concatenated per text encoder (one token standing for the inputs' tokens in order,
the effect of textual_inversion's merge_embeddings.py on a prompt), or averaged (same counts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from sdtk.version import __version__
from sdtk.errors import SdtkError, UsageError
from sdtk.formats import open_model

# text-encoder width -> (name, base). Sources: CLIP ViT-L/14 hidden 768 (SD1), OpenCLIP ViT-H 1024
# (SD2), OpenCLIP ViT-bigG 1280 (SDXL's second encoder; its embeddings come paired with clip_l).
ENCODERS = {768: ("CLIP-L", "stable-diffusion-v1"), 1024: ("OpenCLIP-H", "stable-diffusion-v2"),
            1280: ("OpenCLIP-bigG", "stable-diffusion-xl-v1-base")}
PAIR = ("clip_l", "clip_g")  # SDXL: (key, width) 768 and 1280
PAIR_WIDTHS = {"clip_l": 768, "clip_g": 1280}
PROMPT_CHUNK = 75  # tokens per CLIP prompt chunk (77 minus start/end), A1111 prompt_parser / sd_hijack_clip
TEXT_FIELDS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")


@dataclass
class Embedding:
    path: str
    layout: str  # a1111, sdxl, kohya, diffusers
    vectors: Dict[str, "object"]  # "emb_params" -> [n, w] or "clip_l"/"clip_g" -> [n, w] (float arrays)
    token: Optional[str] = None
    fields: Dict[str, str] = field(default_factory=dict)  # name, step, sd_checkpoint(_name)
    dtype: str = "float32"

    @property
    def paired(self) -> bool:
        return "clip_l" in self.vectors

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> Dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.vectors.items()}


def read_embedding(path: str) -> Embedding:
    """Any embedding layout above, its vectors read (never executed); SdtkError when it is not one."""
    import numpy as np

    with open_model(path) as cat:
        tensors, extras = cat.tensors, cat.extras
        keys = list(tensors)
        params = [k for k in keys if k.startswith("string_to_param.")]
        if params:
            if len(params) != 1:
                raise SdtkError(path, f"the embedding holds {len(params)} terms ({', '.join(k.split('.', 1)[1] for k in params)}); "
                                      "A1111 loads only files with one")
            layout, token, picked = "a1111", params[0].split(".", 1)[1], {"emb_params": tensors[params[0]]}
        elif "clip_l" in tensors and "clip_g" in tensors:
            layout, token, picked = "sdxl", None, {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
        elif "emb_params" in tensors:
            layout, token, picked = "kohya", None, {"emb_params": tensors["emb_params"]}
        elif len(tensors) == 1:
            layout, token = "diffusers", keys[0]
            picked = {"emb_params": tensors[keys[0]]}
        else:
            raise SdtkError(path, "not a textual-inversion embedding (no string_to_param, clip_l/clip_g, emb_params or single token tensor)")
        vectors = {}
        dtypes = set()
        for key, t in picked.items():
            if not t.dtype.is_float:
                raise SdtkError(path, f"embedding tensor {t.name} is {t.dtype.short}, not floating point")
            arr = np.asarray(t.read())
            if arr.ndim == 1:
                arr = arr.reshape(1, -1)
            if arr.ndim != 2:
                raise SdtkError(path, f"embedding tensor {t.name} has shape {list(t.shape)}; expected [vectors, width]")
            width = arr.shape[1]
            if key in PAIR_WIDTHS and width != PAIR_WIDTHS[key]:
                raise SdtkError(path, f"{key} has width {width}; SDXL needs {PAIR_WIDTHS[key]}")
            if key == "emb_params" and width not in ENCODERS:
                raise SdtkError(path, f"embedding width {width} is none of {sorted(ENCODERS)} (CLIP-L, OpenCLIP-H, OpenCLIP-bigG)")
            if not np.isfinite(arr.astype(np.float32)).all():
                raise SdtkError(path, f"embedding tensor {t.name} holds NaN or inf values")
            vectors[key] = arr
            dtypes.add(t.dtype.short)
        if "clip_l" in vectors and vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise SdtkError(path, f"clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g {vectors['clip_g'].shape[0]}: not an SDXL pair")
        fields = {}
        source = dict(extras)
        source.update({k: v for k, v in cat.metadata.items() if k in TEXT_FIELDS})
        for name in TEXT_FIELDS:
            if isinstance(source.get(name), (str, int, float)) and not isinstance(source.get(name), bool):
                fields[name] = str(source[name])
        dtype = dtypes.pop() if len(dtypes) == 1 else "fp32"
    return Embedding(os.fspath(path), layout, vectors, token, fields, dtype)


def _numpy_dtype(short: str):
    from sdtk.tensors import dtype as sdtk_dtype

    return sdtk_dtype(short).numpy


class _Step:
    def __init__(self, operation: str, inputs: List[str]):
        self.operation, self.inputs = operation, inputs

    def as_dict(self) -> dict:
        return {"tool": f"sdtk {__version__}", "operations": [self.operation],
                "sources": [os.path.basename(p) for p in self.inputs]}


def _write(emb_vectors: Dict[str, "object"], dest: str, fields: Dict[str, str], inputs: Sequence[str], operation: str,
           overwrite: bool) -> int:
    from sdtk.formats.safetensors import write_safetensors
    from sdtk.ops.lineage import LINEAGE_KEY, lineage_value
    from sdtk.tensors import from_array

    meta = dict(fields)
    meta[LINEAGE_KEY] = lineage_value(None, _Step(operation, list(inputs)))
    plan = [from_array(k, v) for k, v in emb_vectors.items()]
    return write_safetensors(dest, plan, meta, inputs=list(inputs), overwrite=overwrite)


def _check_dest(dest: str, inputs: Sequence[str], overwrite: bool) -> None:
    from sdtk.fileio import check_output_path

    if not str(dest).endswith(".safetensors"):
        raise UsageError(dest, "the output must be a .safetensors file")
    check_output_path(dest, list(inputs), overwrite)


@dataclass
class EmbeddingResult:
    output: str
    layout: str  # emb_params or clip_l+clip_g
    vectors: int
    widths: Dict[str, int]
    bytes: int
    inputs: List[dict]

    def as_dict(self) -> dict:
        return {"output": self.output, "layout": self.layout, "vectors": self.vectors, "widths": self.widths,
                "bytes": self.bytes, "inputs": self.inputs, "fits_one_prompt_chunk": self.vectors <= PROMPT_CHUNK}


def convert_embedding(src: str, dest: str, overwrite: bool = False) -> EmbeddingResult:
    """`.pt` / `.bin` (or any layout) -> safetensors, the vectors bit for bit, the fields as metadata."""
    import numpy as np

    _check_dest(dest, [src], overwrite)
    emb = read_embedding(src)
    fields = dict(emb.fields)
    if emb.token:
        fields["token"] = emb.token
    vectors = {k: np.ascontiguousarray(v) for k, v in emb.vectors.items()}
    n = _write(vectors, dest, fields, [src], f"embedding convert {os.path.basename(src)} ({emb.layout})", overwrite)
    return EmbeddingResult(os.fspath(dest), "+".join(vectors), emb.count, emb.widths, n,
                           [{"file": src, "layout": emb.layout, "vectors": emb.count}])


def merge_embeddings(sources: Sequence[str], dest: str, mode: str = "concat", overwrite: bool = False) -> EmbeddingResult:
    """Concatenate (or average) the vectors of embeddings made for the same text encoder(s)."""
    import numpy as np

    if mode not in ("concat", "average"):
        raise UsageError(None, "the merge mode must be concat or average")
    if len(sources) < 2:
        raise UsageError(None, "embedding merge takes two or more embeddings")
    _check_dest(dest, sources, overwrite)
    embs = [read_embedding(s) for s in sources]
    first = embs[0]
    for e in embs[1:]:
        if e.widths != first.widths:
            raise SdtkError(e.path, f"made for other text encoders ({_describe(e)}) than {os.path.basename(first.path)} ({_describe(first)})")
    if mode == "average" and len({e.count for e in embs}) != 1:
        raise UsageError(None, "--average needs the same number of vectors in every input "
                               f"(got {', '.join(str(e.count) for e in embs)}); concatenate instead")
    dtypes = {e.dtype for e in embs}
    out_dtype = _numpy_dtype(dtypes.pop()) if len(dtypes) == 1 else np.dtype(np.float32)
    merged = {}
    for key in first.vectors:
        if mode == "concat":
            merged[key] = np.concatenate([np.asarray(e.vectors[key]).astype(out_dtype, copy=False) for e in embs], axis=0)
        else:
            acc = np.zeros(first.vectors[key].shape, dtype=np.float32)
            for e in embs:
                acc += np.asarray(e.vectors[key], dtype=np.float32)
            merged[key] = (acc / np.float32(len(embs))).astype(out_dtype)
    stem = os.path.splitext(os.path.basename(dest))[0]
    fields = {"name": stem, "merged_from": ", ".join(os.path.basename(e.path) for e in embs)}
    n = _write(merged, dest, fields, sources, f"embedding merge ({mode}) " + " + ".join(os.path.basename(s) for s in sources), overwrite)
    count = int(next(iter(merged.values())).shape[0])
    return EmbeddingResult(os.fspath(dest), "+".join(merged), count, {k: int(v.shape[1]) for k, v in merged.items()}, n,
                           [{"file": e.path, "layout": e.layout, "vectors": e.count} for e in embs])


def _describe(e: Embedding) -> str:
    return " + ".join(f"{ENCODERS[w][0]} {w}" for w in e.widths.values())


def fit_with_base(widths: Dict[str, int], base_family: Optional[str], base_encoders: Dict[str, Optional[str]]) -> Optional[str]:
    """Why an embedding does not fit a base (None: it fits). Rules of A1111's loader
    (sd_hijack EmbeddingDatabase: an embedding whose width is not the model's is skipped; SDXL takes
    only clip_l + clip_g pairs): SD1 768, SD2 1024, SDXL the pair."""
    paired = "clip_l" in widths
    width = None if paired else next(iter(widths.values()), None)
    if base_family == "sdxl":
        return None if paired else f"an SD{'1' if width == 768 else '2' if width == 1024 else '?'} embedding ({width}): SDXL needs a clip_l + clip_g pair"
    if base_family in ("sd1", "sd2"):
        need = 768 if base_family == "sd1" else 1024
        if paired:
            return f"an SDXL embedding (clip_l + clip_g): this model's text encoder takes {need}-wide vectors"
        return None if width == need else f"{width}-wide vectors: this model's text encoder takes {need}"
    encoders = ", ".join(v for v in base_encoders.values() if v) or "none found"
    return f"textual inversion is checked for SD1, SD2 and SDXL only (this model's text encoders: {encoders})"
