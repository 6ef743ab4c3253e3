"""What is wrong with a file: each check is a small pure function adding Problems.

Only names, shapes and dtypes are used, plus the 77 values of CLIP position_ids (a tiny tensor)."""
from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

if TYPE_CHECKING:
    import numpy as np

from sdtk.architectures import known_keys
from sdtk.architectures.layouts import is_optional
from sdtk.identify.model import Identity, Problem
from sdtk.tensors import LazyTensor

POSITION_IDS_SUFFIX = "text_model.embeddings.position_ids"
# NovelAI-era SD1 files: CLIP keys without `text_model.` (transformers < 4.x naming).
# Source: A1111 modules/sd_hijack_clip / sd_models.py (transformers key fix-up); ComfyUI
# comfy/utils.py clip_text_transformers_convert.
OLD_CLIP_PREFIXES = ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.encoder.",
                     "cond_stage_model.transformer.final_layer_norm.")
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "callbacks", "epoch", "global_step", "pytorch-lightning_version",
                       "loops", "hparams_name", "hyper_parameters", "state_dict_ema")
MAX_LISTED = 50


def _add(ident: Identity, code: str, severity: str, **details) -> None:
    ident.problems.append(Problem(code, severity, f"problem.{code}", details))


# struct formats of the dtypes whose few values `_small_values` reads without numpy (start-up)
_STRUCT_FORMAT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b",
                  "U64": "Q", "U32": "I", "U16": "H", "U8": "B", "BOOL": "?"}


def _small_values(t: LazyTensor) -> list:
    """A small tensor's values as Python numbers, flattened. Reads the bytes behind its file span
    with struct when it has one (so `inspect` needs no numpy), else through numpy."""
    fmt = _STRUCT_FORMAT.get(t.dtype.name)
    if t.span is not None and fmt is not None and t.span.length == t.nbytes:
        if t.verify is not None:
            t.verify()
        with open(t.span.path, "rb") as f:
            f.seek(t.span.offset)
            raw = f.read(t.span.length)
        if len(raw) != t.nbytes:
            raise ValueError(f"{t.name}: {len(raw)} of {t.nbytes} bytes in the file")
        return list(struct.unpack(f"<{t.numel}{fmt}", raw))
    import numpy as np

    flat = np.asarray(t.read()).reshape(-1)
    return [float(v) for v in flat] if t.dtype.is_float else [int(v) for v in flat.astype(np.int64)]


def check_position_ids(ident: Identity, tensors: Mapping[str, LazyTensor]) -> None:
    for key, t in tensors.items():
        if not key.endswith(POSITION_IDS_SUFFIX) or t.numel == 0 or t.numel > 4096:
            continue
        try:
            values = _small_values(t)
        except Exception as e:  # a damaged tensor is itself a finding, not a crash
            _add(ident, "clip_position_ids_unreadable", "warning", key=key, error=str(e))
            continue
        if t.dtype.is_float:
            as_f = [float(v) for v in values]
            damaged = [i for i, v in enumerate(as_f) if not math.isfinite(v) or math.floor(v) != i]
            _add(ident, "clip_position_ids_float", "error" if damaged else "warning", key=key, dtype=t.dtype.short,
                 damaged_positions=damaged, examples={str(i): as_f[i] for i in damaged[:5]})
        else:
            as_i = [int(v) for v in values]
            damaged = [i for i, v in enumerate(as_i) if v != i]
            if damaged:
                _add(ident, "clip_position_ids_shifted", "error", key=key, dtype=t.dtype.short, damaged_positions=damaged,
                     examples={str(i): as_i[i] for i in damaged[:5]})


def check_old_clip_keys(ident: Identity, keys) -> None:
    old = [k for k in keys if k.startswith(OLD_CLIP_PREFIXES)]
    if old:
        _add(ident, "clip_old_key_names", "warning", count=len(old), example=old[0])


def check_components(ident: Identity, expected: List[str]) -> None:
    missing = [c for c in expected if c not in ident.components]
    ident.missing_components = missing
    if missing and ident.kind == "checkpoint":
        ident.partial = True
        _add(ident, "missing_components", "warning", components=missing)


def check_known_keys(ident: Identity, table: Dict[str, list]) -> None:
    """Missing keys of each present component against the known layout; unknown extra keys."""
    from sdtk.architectures.layouts import prefix_order, split_key_ordered

    ordered = prefix_order(table)
    for name, comp in ident.components.items():
        if name in ("markers", "leftovers", "other", "model_sampling"):
            continue
        known = known_keys(ident.architecture, name)
        if known is None:
            continue
        have = set()
        for key in comp.keys:
            _, prefix = split_key_ordered(key, ordered)
            if name == "unet" and not prefix and comp.prefix:
                prefix = comp.prefix
            have.add(key[len(prefix):])
        missing = sorted(k for k in known - have if not is_optional(k))
        extra = sorted(have - known)
        if name == "ddpm_buffers":
            missing = []  # savers keep any subset of the schedule buffers
        if missing:
            ident.missing_keys[name] = missing[:MAX_LISTED]
            _add(ident, "missing_keys", "warning", component=name, count=len(missing), examples=missing[:5])
        if extra:
            ident.extra_keys[name] = extra[:MAX_LISTED]
            _add(ident, "extra_keys", "info", component=name, count=len(extra), examples=extra[:5])
    other = ident.components.get("other")
    if other is not None:
        ident.extra_keys["other"] = other.keys[:MAX_LISTED]
        _add(ident, "unknown_keys", "info", count=len(other.keys), examples=other.keys[:5], bytes=other.bytes)


def check_leftovers(ident: Identity, extras: Mapping) -> None:
    left = ident.components.get("leftovers")
    if left is not None:
        prefixes = sorted({k.split(".", 1)[0] if "." in k else k for k in left.keys})
        _add(ident, "training_leftovers", "warning", count=len(left.keys), bytes=left.bytes, prefixes=prefixes[:10])
    state = sorted({k.split(".", 1)[0] for k in extras} & set(TRAINING_STATE_KEYS))
    ident.training_state = state
    if state:
        _add(ident, "training_state", "info", keys=state)


# The config A1111 needs beside a model it cannot configure from the weights (family, prediction)
# -> packaged config sdtk writes (sdtk.ops.sidecar). A1111 modules/sd_models_config.py: a yaml
# beside the file wins; without one SD1 is epsilon, SDXL is epsilon (1.10 does not read the
# v_pred marker), SD2 is decided by one UNet forward pass (is_using_v_parameterization_for_sd2).
A1111_CONFIGS = {("sd1", "v"): "v1-inference-v.yaml", ("sd2", "v"): "v2-inference-v.yaml",
                 ("sd2", None): "v2-inference-v.yaml", ("sdxl", "v"): "sd_xl_v.yaml"}


def check_sd2_config(ident: Identity, config) -> None:
    """Models A1111 would configure wrongly (or only by guessing) without a `<model>.yaml`:
    SD 2.x v or undetermined (A1111 guesses by running the UNet once), SD 1.x v-prediction,
    SDXL v-prediction (A1111 1.10 ignores the v_pred marker that Forge and ComfyUI read)."""
    if config is None or config.usable or ident.kind != "checkpoint":
        return  # A1111 loads full checkpoints only: a yaml beside a bare UNet/DiT helps no program
    family = ident.family
    pred = ident.prediction_type if ident.prediction_type in ("v", "epsilon") else None
    if family == "sd2" and pred == "epsilon":
        return
    yaml_name = A1111_CONFIGS.get((family, pred))
    if yaml_name is None:
        return
    has_marker = ident.prediction_source == "marker"
    severity = "info" if (family == "sdxl" and has_marker) else "warning"
    _add(ident, "needs_config_yaml", severity, title=ident.title, prediction=pred or "unknown", family=family,
         config=yaml_name, why_key=f"why.needs_config_yaml.{family}{'' if pred else '_unknown'}")


def _config_name(config) -> Optional[str]:
    if config is None or not config.exists:
        return None
    return config.path.replace("\\", "/").rsplit("/", 1)[-1]


def check_config_beside(ident: Identity, config) -> None:
    """The `<model>.yaml` beside the file: unreadable, or describing other weights."""
    name = _config_name(config)
    if name is None:
        return
    if config.error:
        _add(ident, "config_unreadable", "warning", config=name, error=config.error)
        return
    if config.family and ident.family and config.family != ident.family:
        _add(ident, "config_mismatch", "warning", config=name, context_dim=config.context_dim,
             config_family=config.family, family=ident.family)


# What ComfyUI's SD2 model class decides (comfy/supported_models.py SD20.model_type): inpainting
# UNets (in_channels != 4) are always EPS; else the statistic of one norm bias (prediction.sd2_statistic).
SD2_FIRST_CONV = "input_blocks.0.0.weight"


def _comfyui_sd2_choice(evidence, unet_tensors: Mapping[str, LazyTensor]):
    from sdtk.identify.prediction import sd2_statistic

    first = unet_tensors.get(SD2_FIRST_CONV)
    if first is not None and len(first.shape) == 4 and first.shape[1] != 4:
        return "epsilon", "an inpainting UNet: always epsilon"
    stat = next((e for e in evidence if e.method == "comfyui-statistic"), None) or sd2_statistic(unet_tensors, _small_values)
    return (stat.type, stat.detail) if stat is not None else (None, None)


def _a1111_sd2_choice(evidence, config_name: Optional[str]):
    """A1111 takes the yaml beside the file first, else runs its forward check (only known with --deep)."""
    yaml = next((e for e in evidence if e.source == "config"), None)
    if yaml is not None:
        return yaml.type, f"{config_name} beside the file"
    forward = next((e for e in evidence if e.method == "a1111-forward"), None)
    return (forward.type, forward.detail) if forward is not None else (None, None)


def check_programs_agree_sd2(ident: Identity, evidence, unet_tensors: Mapping[str, LazyTensor], config) -> bool:
    """SD 2.x: A1111 and ComfyUI decide the prediction type by different rules (neither reads the
    v_pred marker for SD2). When what each will do is known and they differ, say so: one of them
    will sample the model wrongly unless set by hand. True when the problem was added."""
    if ident.family != "sd2":
        return False
    a1111, a1111_how = _a1111_sd2_choice(evidence, _config_name(config))
    if a1111 is None:
        return False
    comfyui, comfyui_how = _comfyui_sd2_choice(evidence, unet_tensors)
    if comfyui is None or comfyui == a1111:
        return False
    _add(ident, "programs_disagree", "warning", a1111=a1111, a1111_how=a1111_how, comfyui=comfyui,
         comfyui_how=comfyui_how, winner=ident.prediction_type or "unknown", winner_source=ident.prediction_source or "none")
    return True


def check_prediction_conflicts(ident: Identity, conflicts, config, programs_reported: bool = False) -> None:
    """Evidence that says another prediction type than the stronger evidence that decided
    (reported; the stronger evidence wins). The two programs' SD2 rules, when already reported
    as disagreeing, are not repeated."""
    name = _config_name(config)
    for lost in conflicts:
        if programs_reported and lost.method in ("comfyui-statistic", "a1111-forward"):
            continue
        _add(ident, "prediction_conflict", "warning", winner=ident.prediction_type, winner_source=ident.prediction_source,
             loser=lost.type, loser_source=lost.source, detail=lost.detail,
             config=name if lost.source == "config" or ident.prediction_source == "config" else None)


def check_sdxl_vae_fp16(ident: Identity) -> None:
    vae = ident.components.get("vae")
    if ident.family in ("sdxl", "sdxl-refiner") and vae is not None and set(vae.dtypes) == {"fp16"}:
        _add(ident, "sdxl_vae_fp16", "info")


def check_unidentified(ident: Identity) -> None:
    if ident.kind == "unknown":
        _add(ident, "unidentified", "warning", tensors=ident.tensor_count, parameters=ident.parameters)


def check_non_finite(ident: Identity, tensors: Mapping[str, LazyTensor], chunk_elems: int = 1 << 24) -> None:
    """--deep: every float tensor scanned for inf/NaN, in chunks (peak memory ~ one chunk)."""
    import numpy as np

    bad: Dict[str, int] = {}
    for key, t in tensors.items():
        if not t.dtype.is_float or t.numel == 0:
            continue
        flat = np.asarray(t.read()).reshape(-1)
        count = 0
        for start in range(0, flat.size, chunk_elems):
            part = flat[start:start + chunk_elems]
            if part.dtype.kind != "f":  # bf16 / fp8 (ml_dtypes): compare in fp32
                part = part.astype(np.float32)
            count += int(part.size - np.count_nonzero(np.isfinite(part)))
        if count:
            bad[key] = count
    if bad:
        _add(ident, "non_finite_values", "error", tensors=len(bad), values=sum(bad.values()),
             examples=sorted(bad, key=bad.get, reverse=True)[:5])


def check_modelspec(ident: Identity, metadata: Mapping[str, str]) -> None:
    """`modelspec.architecture` naming another family than the tensors show (metadata copied
    from another model). Only families are compared: ModelSpec spellings of variants differ."""
    from sdtk.architectures import family_of

    claimed = (metadata.get("modelspec.architecture") or "").strip()
    if not claimed or ident.kind == "unknown" or ident.family is None:
        return
    claimed_family = family_of(claimed)
    if claimed_family != "unknown" and claimed_family != ident.family:
        _add(ident, "modelspec_mismatch", "warning", claimed=claimed, detected=ident.architecture)
