"""safetensors metadata summarised: ModelSpec, kohya training (ss_*), merge recipes, lineage.
Sources: Stability-AI/ModelSpec README; kohya-ss/sd-scripts train_network.py (ss_*); A1111
extras.py (sd_merge_recipe, sd_merge_models); sd-mecha (mecha_recipe)."""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping

from sdtk.identify.adapters import summarise_ss_metadata

MERGE_KEYS = ("sd_merge_recipe", "sd_merge_models", "mecha_recipe", "merge_recipe")
LINEAGE_PREFIXES = ("sdtk.",)  # what sdtk's own writers record (source files, operations)
_LONG = 200


def _short(value: str) -> str:
    return value if len(value) <= _LONG else value[:_LONG] + f"... ({len(value)} chars)"


def summarise_metadata(metadata: Mapping[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    spec = {k[len("modelspec."):]: _short(v) for k, v in metadata.items() if k.startswith("modelspec.") and k != "modelspec.thumbnail"}
    if "modelspec.thumbnail" in metadata:
        spec["thumbnail"] = f"(image, {len(metadata['modelspec.thumbnail'])} chars)"
    if spec:
        out["modelspec"] = spec
    if any(k.startswith("ss_") for k in metadata):
        out["training"] = summarise_ss_metadata(metadata)
    merge: Dict[str, Any] = {}
    for key in MERGE_KEYS:
        if key in metadata:
            raw = metadata[key]
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if key == "sd_merge_models" and isinstance(parsed, dict):
                merge[key] = [m.get("name", h) if isinstance(m, dict) else h for h, m in parsed.items()]
            elif key == "sd_merge_recipe" and isinstance(parsed, dict):
                merge[key] = {k: parsed[k] for k in ("type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash",
                                                     "interp_method", "multiplier", "save_as_half", "bake_in_vae") if k in parsed}
            else:
                merge[key] = _short(raw)
    if merge:
        out["merge"] = merge
    lineage = {k: _short(v) for k, v in metadata.items() if k.startswith(LINEAGE_PREFIXES)}
    if lineage:
        out["lineage"] = lineage
    known = set(MERGE_KEYS)
    other = sorted(k for k in metadata if not (k.startswith(("modelspec.", "ss_", "sshs_") + LINEAGE_PREFIXES) or k in known))
    if other:
        out["other_keys"] = other[:50]
    hashes = {k: metadata[k] for k in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256") if k in metadata}
    if hashes:
        out["hashes"] = hashes
    return out
