"""What `inspect` reads of a local adapter file (LoRA, embedding, hypernetwork) beyond its header:
the hashes A1111 and Civitai show for it, the hashes its metadata claims checked against them,
and every tensor scanned for NaN / inf (adapter files are small: 10-200 MB, one pass). kohya's
`sshs_legacy_hash` (a 64 KiB window of kohya's own serialisation) is recomputed by
hashing/kohya_legacy.py.

Hash definitions (reference/lora.md §4.2, reference/hashes.md): SHA256 of the file (Civitai
AutoV2 = first 10 hex); Civitai AutoV3 = first 12 hex of sha256 after the safetensors header
(when the header claims < 16 MiB); A1111's `hashes-addnet` / kohya's `sshs_model_hash` = sha256
after the header, always skipped (A1111 modules/hashes.py addnet_hash_safetensors); A1111's
"Lora hashes" infotext shows its first 12 hex (extensions-builtin/Lora/network.py shorthash).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from sdtk.identify.model import Identity, Problem

ADAPTER_KINDS = ("lora", "embedding", "hypernetwork")
MAX_SCAN_BYTES = 4 << 30  # larger "adapters" (full fine-tune diffs) are left to --deep
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # ai-toolkit #130 wrote this into every file


# A1111's short hash per kind: LoRA = addnet (safetensors) or sha256, first 12 (Lora/network.py
# NetworkOnDisk.set_hash); embedding = sha256, first 12 (textual_inversion.py Embedding.set_hash);
# hypernetwork = sha256, first 10 (hypernetworks/hypernetwork.py Hypernetwork.shorthash).
A1111_SHORT = {"lora": 12, "embedding": 12, "hypernetwork": 10}


def adapter_hashes(path: str, fmt: str, kind: str = "lora") -> Dict[str, str]:
    """{sha256, autov2, autov3, addnet (safetensors), a1111_short} (lower-case hex); cached like `sdtk hash`."""
    from sdtk.hashing.a1111 import a1111_autov3
    from sdtk.hashing.cache import cached_hashes, remember_hashes
    from sdtk.hashing.filehash import HashOptions, hash_file

    known = cached_hashes(path)
    if known.get("sha256") and known.get("autov3") and known.get("autov3_start") is not None:
        sha, v3, start = known["sha256"], known["autov3"], int(known["autov3_start"])
    else:
        fh = hash_file(path, options=HashOptions(kinds=("sha256", "autov3")))
        sha, v3, start = fh.sha256, fh.autov3, fh.autov3_start
        remember_hashes(path, {"sha256": sha, "autov3": v3, "autov3_start": start, "autov1_window": fh.autov1_window})
    out = {"sha256": sha, "autov2": sha[:10], "autov3": v3[:12]}
    if fmt == "safetensors":
        seen = SimpleNamespace(autov3_start=start, size=os.path.getsize(path))  # what a1111_autov3 needs of a FileHashes
        out["addnet"] = a1111_autov3(path, seen) or v3
    out["a1111_short"] = (out["addnet"] if kind == "lora" and "addnet" in out else sha)[:A1111_SHORT.get(kind, 12)]
    return out


def _claimed(metadata: Dict[str, str]) -> Dict[str, str]:
    out = {}
    for key in ("sshs_model_hash", "modelspec.hash_sha256"):
        value = str(metadata.get(key) or "").strip().lower()
        if value.startswith("0x"):
            value = value[2:]
        if value:
            out[key] = value
    return out


def check_adapter_file(ident: Identity, cat, hashes: bool = True) -> None:
    """Hashes (and their check against the metadata) and the NaN / inf scan, for a local adapter."""
    if ident.kind not in ADAPTER_KINDS:
        return
    if hashes:
        try:
            found = adapter_hashes(cat.path, cat.format, ident.kind)
        except (OSError, ValueError) as e:
            ident.notes.append(f"hashes not computed: {e}")
            found = None
        if found is not None:
            ident.adapter = dict(ident.adapter or {})
            ident.adapter["hashes"] = found
            _check_claimed_hashes(ident, cat.metadata, found)
            if cat.format == "safetensors":
                _check_legacy_hash(ident, cat)
    if not ident.deep and ident.tensor_bytes <= MAX_SCAN_BYTES:
        from sdtk.identify import checks

        checks.check_non_finite(ident, cat.tensors)


def _check_claimed_hashes(ident: Identity, metadata, found: Dict[str, str]) -> None:
    actual: Optional[str] = found.get("addnet")
    if actual is None:
        return
    for key, value in _claimed(metadata).items():
        if value != actual:
            details: Dict[str, Any] = {"key": key, "claimed": value[:12], "actual": actual[:12],
                                       "empty": value == EMPTY_SHA256}
            ident.problems.append(Problem("adapter_hash_mismatch", "warning", "problem.adapter_hash_mismatch", details))


def _check_legacy_hash(ident: Identity, cat) -> None:
    """kohya's `sshs_legacy_hash` against the value recomputed from the file (hashing/kohya_legacy.py)."""
    claimed = str((cat.metadata or {}).get("sshs_legacy_hash") or "").strip().lower()
    if not claimed:
        return
    from sdtk.hashing.kohya_legacy import legacy_hash_candidates

    try:
        candidates = legacy_hash_candidates(cat)
    except OSError as e:
        ident.notes.append(f"sshs_legacy_hash not checked: {e}")
        return
    if candidates and claimed not in candidates:
        details: Dict[str, Any] = {"key": "sshs_legacy_hash", "claimed": claimed[:12], "actual": candidates[0],
                                   "empty": False}
        ident.problems.append(Problem("adapter_hash_mismatch", "warning", "problem.adapter_hash_mismatch", details))
