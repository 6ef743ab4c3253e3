"""The choices city96's GGUF tools make, as tables and pure functions, so files written by sdtk
load where his do (ComfyUI-GGUF, Forge, stable-diffusion.cpp with --diffusion-model).

Sources: city96/ComfyUI-GGUF `tools/convert.py` (main 795e4515: architecture detection, prefix
stripping, F32/F16/BF16 stage, the SD1/SDXL reshape with `comfy.gguf.orig_shape.*`) and
`tools/lcpp.patch` (the patched llama-quantize: per-architecture never-quantize lists, 2-D only,
ftype base types and bumps, the F16 fallback for rows not a multiple of 256); the `auto_convert`
branch (4dfc025) for qwen_image and the FLUX.2 filters. Restated in
../shared/reference/quantized-formats.md §1.4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors with at most this many elements stay F32
REARRANGE_THRESHOLD = 512  # convert.py: shape_fix only for tensors with at least this many elements
MAX_NAME_LENGTH = 127  # convert.py MAX_TENSOR_NAME_LENGTH (ggml patched to GGML_MAX_NAME 128)
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture
    detect: Tuple[Tuple[str, ...], ...]  # any group whose keys all exist
    banned: Tuple[str, ...] = ()  # diffusers-layout keys: refused
    hiprec: Tuple[str, ...] = ()  # substrings kept F32 (nn.Parameters read directly)
    ignore: Tuple[str, ...] = ()  # substrings of keys dropped
    shape_fix: bool = False
    keep: Tuple[str, ...] = ()  # substrings never quantized (lcpp.patch)
    keep_exact: Tuple[str, ...] = ()  # exact names never quantized


_FLUX_KEEP = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
              # FLUX.2 (auto_convert)
              "single_stream_modulation.", "double_stream_modulation_")
_SD_KEEP = ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.", "conv_out.")

# First match wins (convert.py arch_list order; qwen_image from auto_convert placed first because
# on `main` a Qwen-Image state dict would hit flux's diffusers probe key).
ARCHS: Tuple[Arch, ...] = (
    Arch("qwen_image", (("time_text_embed.timestep_embedder.linear_2.weight", "transformer_blocks.0.attn.norm_added_q.weight",
                         "transformer_blocks.0.img_mlp.net.0.proj.weight"),),
         keep=("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")),
    Arch("flux", (("transformer_blocks.0.attn.norm_added_k.weight",), ("double_blocks.0.img_attn.proj.weight",)),
         banned=("transformer_blocks.0.attn.norm_added_k.weight",), keep=_FLUX_KEEP),
    Arch("sd3", (("transformer_blocks.0.attn.add_q_proj.weight",), ("joint_blocks.0.x_block.attn.qkv.weight",)),
         banned=("transformer_blocks.0.attn.add_q_proj.weight",),
         keep=("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder."),
         keep_exact=("proj_out.weight", "pos_embed")),
    Arch("aura", (("double_layers.3.modX.1.weight",), ("joint_transformer_blocks.3.ff_context.out_projection.weight",)),
         banned=("joint_transformer_blocks.3.ff_context.out_projection.weight",),
         keep=("t_embedder.", "init_x_linear."),
         keep_exact=("modF.1.weight", "cond_seq_linear.weight", "final_linear.weight", "positional_encoding", "register_tokens")),
    Arch("hidream", (("caption_projection.0.linear.weight", "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight"),),
         hiprec=(".ff_i.gate.weight", "img_emb.emb_pos"),
         keep=("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", ".ff_i.gate.weight", "caption_projection.")),
    Arch("cosmos", (("blocks.0.mlp.layer1.weight", "blocks.0.adaln_modulation_cross_attn.1.weight"),),
         hiprec=("pos_embedder",), ignore=("_extra_state", "accum_"),
         keep=("p_embedder.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "pos_embedder.", "final_layer.")),
    Arch("ltxv", (("adaln_single.emb.timestep_embedder.linear_2.weight", "transformer_blocks.27.scale_shift_table",
                   "caption_projection.linear_2.weight"),),
         hiprec=("scale_shift_table",),
         keep=("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.", "scale_shift_table")),
    Arch("hyvid", (("double_blocks.0.img_attn_proj.weight", "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"),),
         keep=_FLUX_KEEP[:6]),
    Arch("wan", (("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),),
         hiprec=(".modulation",),
         keep=("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.", "head.")),
    Arch("sdxl", (("down_blocks.0.downsamplers.0.conv.weight", "add_embedding.linear_1.weight"),
                  ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
                   "output_blocks.5.2.conv.weight"),
                  ("label_emb.0.0.weight",)),
         shape_fix=True, keep=_SD_KEEP, keep_exact=("input_blocks.0.0.weight", "out.2.weight")),
    Arch("sd1", (("down_blocks.0.downsamplers.0.conv.weight",),
                 ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
                  "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight")),
         shape_fix=True, keep=_SD_KEEP, keep_exact=("input_blocks.0.0.weight", "out.2.weight")),
    Arch("lumina2", (("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"),),
         hiprec=("x_pad_token", "cap_pad_token"),
         keep=("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner.",
               "x_pad_token", "cap_pad_token")),
)
BY_ARCH = {a.name: a for a in ARCHS}

# What the --quant names mean (llama.cpp llama_ftype -> default ggml type; F16/BF16/Q8_0 etc. as named)
QUANT_BASE = {
    "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K",
    "F16": "F16", "BF16": "BF16",
}
QUANT_CHOICES = tuple(QUANT_BASE)
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# lcpp.patch img_tensor_get_type: name patterns and the bumps per ftype
_V_PATTERNS = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight", "_attn.v_proj.weight")
_QKV_PATTERNS = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
_FFN_PATTERNS = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight", ".adaln_modulation_mlp.2.weight",
                 ".feed_forward.w2.weight", ".img_mlp.net.2.weight", ".txt_mlp.net.2.weight")
_QKV_BUMP = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}
_FFN_BUMP = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "Q4_K_S": "Q5_K", "Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K", "Q4_0": "Q4_1", "Q5_0": "Q5_1"}


class ArchError(ValueError):
    pass


def strip_prefix(names: Sequence[str]) -> Tuple[Optional[str], Dict[str, str]]:
    """convert.py strip_prefix: `model.diffusion_model.` or `model.` if any key has it (keys
    without it are dropped), else `net.` if every key has it. Returns (prefix, {new: old})."""
    prefix = next((p for p in ("model.diffusion_model.", "model.") if any(n.startswith(p) for n in names)), None)
    if prefix is None and names and all(n.startswith("net.") for n in names):
        prefix = "net."
    if prefix is None:
        return None, {n: n for n in names}
    return prefix, {n[len(prefix):]: n for n in names if n.startswith(prefix)}


def detect_arch(names: Iterable[str]) -> Arch:
    keys = set(names)
    for arch in ARCHS:
        for group in arch.detect:
            if all(k in keys for k in group):
                if any(k in keys for k in arch.banned):
                    raise ArchError(f"{arch.name} in the diffusers layout; GGUF files use the original layout "
                                    "(convert it to the ComfyUI/original names first)")
                return arch
    raise ArchError("no diffusion model architecture the GGUF tools know (flux, sd1, sdxl, sd3, aura, hidream, "
                    "cosmos, ltxv, hyvid, wan, lumina2, qwen_image)")


def stage_type(arch: Arch, name: str, shape: Tuple[int, ...], source_dtype: str, target: str) -> str:
    """The F32/F16/BF16 type convert.py gives a tensor (source dtype: sdtk dtype name).
    `target` F16 or BF16 overrides the 16-bit type (city96 keeps BF16 sources BF16, else F16)."""
    kind = "BF16" if source_dtype == "BF16" else "F16"
    if target in ("F16", "BF16"):
        kind = target
    if source_dtype in ("F32", "BF16", "F64"):
        n = 1
        for d in shape:
            n *= d
        if len(shape) == 1 or n <= QUANTIZATION_THRESHOLD or any(h in name for h in arch.hiprec):
            return "F32"
    return kind


def reshape_for_quant(arch: Arch, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """convert.py shape_fix (SD1/SDXL): a tensor whose last dim is not a multiple of 256 but whose
    size is becomes [n/256, 256], so 3x3 convs can be quantized. None: leave the shape."""
    n = 1
    for d in shape:
        n *= d
    if arch.shape_fix and len(shape) > 1 and n >= REARRANGE_THRESHOLD and n % 256 == 0 and shape[-1] % 256 != 0:
        return (n // 256, 256)
    return None


def ggml_n_dims(ne: Tuple[int, ...]) -> int:
    """ggml_n_dims: index of the last dim that is not 1, plus one (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] != 1:
            return i + 1
    return 1


@dataclass
class QuantState:
    """Counters llama-quantize keeps while walking the tensors (for the first-N bumps)."""

    i_attention_wv: int = 0


def quant_type(arch: Arch, name: str, ne: Tuple[int, ...], quant: str, state: QuantState) -> Optional[str]:
    """The ggml type the patched llama-quantize gives a tensor for `--quant quant`, or None to
    keep the stage type. `ne` in ggml order (after any reshape)."""
    if quant in ("F16", "BF16"):
        return None
    ok = name.endswith("weight") and ggml_n_dims(ne) >= 2 and "_norm.weight" not in name
    ok = ok and not any(k in name for k in arch.keep) and name not in arch.keep_exact
    ok = ok and ggml_n_dims(ne) == 2  # image models: only 2-D tensors
    if not ok:
        return None
    new = QUANT_BASE[quant]
    if any(p in name for p in _V_PATTERNS):
        if quant == "Q2_K":
            new = "Q3_K"
        elif quant == "Q3_K_M":
            new = "Q5_K" if state.i_attention_wv < 2 else "Q4_K"
        elif quant in ("Q4_K_M", "Q5_K_M"):
            new = "Q6_K"
        elif quant == "Q4_K_S" and state.i_attention_wv < 4:
            new = "Q5_K"
        state.i_attention_wv += 1
    elif any(p in name for p in _QKV_PATTERNS):
        new = _QKV_BUMP.get(quant, new)
    elif any(p in name for p in _FFN_PATTERNS) or ("experts." in name and ".w2.weight" in name):
        new = _FFN_BUMP.get(quant, new)
    if arch.name == "qwen_image" and (name.startswith("transformer_blocks.0.") or name.startswith("transformer_blocks.59.")):
        new = {"Q2_K": "Q4_K", "Q3_K_S": "Q4_K", "Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(quant, new)
    block = 256 if new in K_TYPES else 32
    if ne[0] % block:
        return "F16"  # the patch's fallback (not Q5_0 as stock llama.cpp)
    return new
