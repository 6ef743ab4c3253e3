"""What the library stores about a model file, from its header (via `sdtk.identify`), never its weights.

`describe_for_library(catalogue)` is the one place that turns an identification into library
columns; bump DESCRIBE_VERSION when it changes so the next scan re-describes every file (from the
header only: hashes stay cached).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

DESCRIBE_VERSION = 3  # 1: metadata only (before identify); 2: sdtk.identify; 3: prediction confidence and evidence
PREDICTION_COLUMNS = ("prediction", "prediction_confidence", "prediction_source", "zero_terminal_snr")

# kohya `ss_base_model_version` -> base model name as Civitai spells it (kohya sd-scripts
# library/sdxl_train_util.py, train_network.py; Civitai baseModel values)
KOHYA_BASE_MODELS = {
    "sd_v1": "SD 1.5", "sd_v2": "SD 2.1", "sd_v2_v": "SD 2.1 768", "sdxl_base_v1-0": "SDXL 1.0",
    "sd3": "SD 3", "flux1": "Flux.1 D",
}


def _trained_words_from_metadata(metadata: Dict[str, str]) -> List[str]:
    words = []
    phrase = metadata.get("modelspec.trigger_phrase")  # ModelSpec
    if phrase:
        words += [w.strip() for w in phrase.split(",") if w.strip()]
    return words


def prediction_columns(info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The library's prediction columns from a description's `info` (what identify said: the type,
    its confidence and the evidence that decided; sdtk.identify.prediction). Used by scan and by
    `library import` of batch results, which carry the same `info`."""
    identity = (info or {}).get("identity") or {}
    if "prediction_confidence" not in identity:  # described by an sdtk that did not record it
        return {}
    return {"prediction": identity.get("prediction"), "prediction_confidence": identity.get("prediction_confidence"),
            "prediction_source": identity.get("prediction_source"),
            "zero_terminal_snr": int(bool(identity.get("zero_terminal_snr")))}


def describe_for_library(catalogue, config_text: Optional[str] = None, has_config: Optional[bool] = None) -> Dict[str, Any]:
    """Library columns for an open catalogue: format, tensor_count, parameters, dtypes, precision,
    architecture, kind, ema, prediction (+ _confidence, _source, zero_terminal_snr), base_model, title,
    trained_words, and `info` (metadata summary, the prediction evidence)."""
    from sdtk.identify import identify

    meta = catalogue.metadata or {}
    desc: Dict[str, Any] = {
        "format": catalogue.format,
        "tensor_count": len(catalogue.tensors),
        "parameters": catalogue.parameter_count,
    }
    info: Dict[str, Any] = {}
    try:
        ident = identify(catalogue, config_text=config_text, has_config=has_config)
    except Exception as e:  # identification is best effort; the file is still indexed and hashed
        info["identify_error"] = f"{type(e).__name__}: {e}"
        ident = None
    if ident is not None:
        desc.update({
            "dtypes": json.dumps(ident.dtypes, sort_keys=True),
            "precision": ident.precision,
            "architecture": ident.architecture,
            "kind": ident.kind,
            "ema": int(bool(ident.has_ema)),
        })
        info["identity"] = {k: v for k, v in {
            "title": ident.title, "family": ident.family, "variant": ident.variant, "implementation": ident.implementation,
            "prediction": ident.prediction_type, "prediction_confidence": ident.prediction_confidence,
            "prediction_source": ident.prediction_source, "zero_terminal_snr": ident.zero_terminal_snr or None,
            "prediction_evidence": list(ident.prediction_evidence) or None, "partial": ident.partial or None,
            "problems": [p.code for p in ident.problems if p.counts] or None,
        }.items() if v is not None}
        desc.update(prediction_columns(info))
        if ident.metadata:
            info["metadata"] = ident.metadata
    base = meta.get("ss_base_model_version")
    desc["base_model"] = KOHYA_BASE_MODELS.get(base, base) if base else None
    desc["title"] = meta.get("modelspec.title") or meta.get("ss_output_name")  # the file's own name for itself
    desc["trained_words"] = _trained_words_from_metadata(meta)
    desc["info"] = info
    return desc
