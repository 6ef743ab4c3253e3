"""Files beside a model that say what it is: Civitai records, manager summaries, A1111 user notes,
previews, configs, VAEs. Read only (never written), size-limited, a bad sidecar never stops a scan.

| sidecar of X.safetensors           | source                                   |
|------------------------------------|------------------------------------------|
| X.civitai.info                     | Civitai Helper (Civitai model-version record) |
| X.api_info.json                    | Civitai Browser+ (same record)           |
| X.cm-info.json                     | Stability Matrix (PascalCase summary)    |
| X.metadata.json                    | ComfyUI-Lora-Manager                     |
| X.json                             | A1111 extra networks user metadata       |
| X.png/.jpg/.jpeg/.webp/.gif, X.preview.* | A1111 extra networks, Civitai Helper |
| X.yaml                             | A1111 model config                       |
| X.vae.pt/.vae.safetensors/.vae.ckpt | A1111 per-model VAE                     |
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

MAX_SIDECAR_BYTES = 16 * 1024 * 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")

# suffix after the model's stem -> sidecar role (order: most specific first)
SIDECAR_SUFFIXES: List[Tuple[str, str]] = [
    (".civitai.info", "civitai"),  # Civitai Helper
    (".api_info.json", "civitai"),  # Civitai Browser+
    (".cm-info.json", "cm-info"),  # Stability Matrix
    (".metadata.json", "manager"),  # ComfyUI-Lora-Manager
    (".vae.pt", "vae"), (".vae.safetensors", "vae"), (".vae.ckpt", "vae"),  # A1111 sd_vae.py
    (".yaml", "config"),  # A1111 sd_models_config.py
    (".json", "user"),  # A1111 ui_extra_networks_user_metadata.py
] + [(".preview" + ext, "preview") for ext in IMAGE_EXTENSIONS] + [(ext, "preview") for ext in IMAGE_EXTENSIONS]


def model_stem(model_name: str) -> str:
    return os.path.splitext(model_name)[0]


def find_sidecars(model_name: str, folder_names: Iterable[str]) -> Dict[str, List[str]]:
    """{role: [file names]} of the sidecars of `model_name` among the names in its folder."""
    stem = model_stem(model_name)
    found: Dict[str, List[str]] = {}
    for name in folder_names:
        if name == model_name or not name.startswith(stem + "."):
            continue
        rest = name[len(stem):]
        for suffix, role in SIDECAR_SUFFIXES:
            if rest.lower() == suffix:
                found.setdefault(role, []).append(name)
                break
    return found


def sidecar_signature(folder: str, sidecars: Dict[str, List[str]]) -> str:
    """A text that changes when any sidecar appears, vanishes or changes (name, size, mtime_ns)."""
    parts = []
    for role in sorted(sidecars):
        for name in sorted(sidecars[role]):
            try:
                st = os.stat(os.path.join(folder, name))
                parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{name}:gone")
    return "|".join(parts)


def _load_json(path: str) -> Tuple[Optional[Any], Optional[str]]:
    try:
        if os.path.getsize(path) > MAX_SIDECAR_BYTES:
            return None, "larger than 16 MiB, not read"
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig")), None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def _words(value) -> List[str]:
    if isinstance(value, str):
        return [w.strip() for w in value.split(",") if w.strip()]
    if isinstance(value, list):
        out = []
        for v in value:
            out.extend(_words(v) if isinstance(v, str) else [])
        return out
    return []


def read_sidecars(folder: str, sidecars: Dict[str, List[str]]) -> Dict[str, Any]:
    """What the sidecars say: {"files": {role: [names]}, "civitai": {...}, "user": {...},
    "base_model", "trained_words", "problems": [...]}; missing parts are absent."""
    info: Dict[str, Any] = {"files": {k: sorted(v) for k, v in sidecars.items()}}
    problems: List[str] = []
    words: List[str] = []
    for role in ("civitai", "cm-info", "manager", "user"):
        for name in sorted(sidecars.get(role, [])):
            data, problem = _load_json(os.path.join(folder, name))
            if problem:
                problems.append(f"{name}: {problem}")
                continue
            if not isinstance(data, dict):
                problems.append(f"{name}: not a JSON object")
                continue
            if role == "civitai":  # Civitai model-version record
                model = data.get("model") if isinstance(data.get("model"), dict) else {}
                info["civitai"] = {k: v for k, v in {
                    "model_id": data.get("modelId"), "version_id": data.get("id"),
                    "version_name": data.get("name"), "model_name": model.get("name"),
                    "type": model.get("type"), "nsfw": model.get("nsfw"),
                    "base_model": data.get("baseModel"), "hashes": _civitai_hashes(data),
                }.items() if v is not None}
                info.setdefault("base_model", data.get("baseModel"))
                words += _words(data.get("trainedWords"))
            elif role == "cm-info":  # Stability Matrix ConnectedModelInfo
                info["cm_info"] = {k: data.get(k) for k in ("ModelId", "VersionId", "ModelName", "VersionName", "BaseModel", "ModelType", "Hashes") if data.get(k) is not None}
                info.setdefault("base_model", data.get("BaseModel"))
                words += _words(data.get("TrainedWords"))
            elif role == "manager":  # ComfyUI-Lora-Manager
                info["manager"] = {k: data.get(k) for k in ("model_name", "base_model", "sha256") if data.get(k) is not None}
                info.setdefault("base_model", data.get("base_model"))
            elif role == "user":  # A1111 user metadata
                user = {k: data.get(k) for k in ("description", "notes", "vae", "sd version", "activation text",
                                                 "preferred weight", "negative text") if data.get(k) not in (None, "")}
                if user:
                    info["user"] = user
                words += _words(data.get("activation text"))
    if info.get("base_model") is None:
        info.pop("base_model", None)
    seen, unique = set(), []
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            unique.append(w)
    if unique:
        info["trained_words"] = unique
    if problems:
        info["problems"] = problems
    return info


def _civitai_hashes(record: dict) -> Optional[Dict[str, str]]:
    for f in record.get("files") or []:
        if isinstance(f, dict) and f.get("primary") and isinstance(f.get("hashes"), dict):
            return f["hashes"]
    files = record.get("files") or []
    if files and isinstance(files[0], dict) and isinstance(files[0].get("hashes"), dict):
        return files[0]["hashes"]
    return None
