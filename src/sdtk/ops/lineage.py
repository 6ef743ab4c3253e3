"""What an output says about where it came from: the input's metadata kept, ModelSpec keys
added when missing, and an `sdtk.lineage` record (source name, size, hashes, operations).

ModelSpec keys (Stability AI ModelSpec 1.0.0, see ecosystem.md): `modelspec.sai_model_spec`,
`modelspec.architecture`, `modelspec.implementation`, `modelspec.title`,
`modelspec.prediction_type`. Values already in the input win, except prediction_type when the
user states it.

Source hashes (SHA256, AutoV3: what Civitai finds the source by; sdtk's content hash version 2,
`source_content_v2`: the same weights in any container) are computed by
`sdtk.hashing.model.lineage_hashes` in a background thread while the output is written: one
sequential read of the input (the pages the conversion maps come from the same page cache, so the
disk is read once), SHA256 and AutoV3 on one worker thread each (or both on one core with the
two-stream SHA-NI kernel, where it pays: sdtk.hashing.sha2pair), BLAKE3 per tensor on a third;
then patched into the header before the output is committed. Files written before issue 10 carry
`source_content` (content hash version 1, sha256-based) instead.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from sdtk.version import __version__

LINEAGE_KEY = "sdtk.lineage"
MODELSPEC_VERSION = "1.0.0"
HASH_PLACEHOLDER = "0" * 64  # every recorded hash is 64 hex digits
HASH_NAMES = ("sha256", "autov3", "content_v2")
OUTPUT_HASH_PLACEHOLDER = "0" * 64  # the output's data-section sha256, known when the last byte is written


def source_hashes(path: str, on_progress=None, cancelled=lambda: False) -> Dict[str, str]:
    """SHA256, AutoV3 and content hash v2 (64 hex, lower case) of a model file, in one read when
    its tensors lie as raw bytes in the file (safetensors; most checkpoints). Taken from the hash
    cache when this exact file was hashed before (see sdtk.hashing.cache); remembered there."""
    from sdtk.hashing.model import lineage_hashes

    return lineage_hashes(path, on_progress=on_progress, cancelled=cancelled)


class BackgroundHashes:
    """`source_hashes(path)` computed in a thread; `result()` waits for it, `cancel()` stops it."""

    def __init__(self, path: str, on_progress=None):
        self.on_progress = on_progress  # (bytes done, total) while the file is read
        self.from_cache = False  # set before the hashes are computed: True when the hash cache knew them
        self._result: Optional[Dict[str, str]] = None
        self._error: Optional[BaseException] = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True, name="sdtk-source-hash")
        self._thread.start()

    def _run(self, path: str) -> None:
        try:
            from sdtk.hashing.cache import cached_hashes

            known = cached_hashes(path)
            self.from_cache = all(known.get(name) for name in HASH_NAMES)
            self._result = source_hashes(path, self.on_progress, self._cancelled.is_set)
        except BaseException as e:  # reported by result()
            self._error = e

    def cancel(self) -> None:
        """Stop reading (the output failed or was interrupted): nothing goes into the hash cache."""
        self._cancelled.set()
        self._thread.join()

    def result(self) -> Dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


@dataclass
class Lineage:
    source: str  # file name
    source_size: int
    operations: List[str]
    hashes: Dict[str, str] = field(default_factory=dict)  # sha256, autov3, content (placeholders until known)
    facts: Dict[str, object] = field(default_factory=dict)  # what was known of the model, guesses with their confidence

    def as_dict(self) -> dict:
        record = {"tool": f"sdtk {__version__}", "source": self.source, "source_size": self.source_size}
        for name in HASH_NAMES:
            if name in self.hashes:
                record[f"source_{name}"] = self.hashes[name]
        record["operations"] = self.operations
        if self.facts:
            record["facts"] = self.facts
        return record


def lineage_value(previous: Optional[str], step: Lineage) -> str:
    """The `sdtk.lineage` metadata value: a JSON list of steps, oldest first (earlier steps kept)."""
    history: list = []
    if previous:
        try:
            old = json.loads(previous)
            history = old if isinstance(old, list) else [old]
        except ValueError:
            history = [{"unparsed": previous}]
    return json.dumps(history + [step.as_dict()], separators=(",", ":"), ensure_ascii=False)


def modelspec_additions(existing: Dict[str, str], architecture: Optional[str], title: str,
                        prediction_type: Optional[str], prediction_stated: bool) -> Dict[str, str]:
    """ModelSpec keys to add (never overwriting the input's, except a stated prediction type)."""
    add: Dict[str, str] = {}
    if architecture is None and "modelspec.architecture" not in existing:
        return add  # ModelSpec requires an architecture; we do not invent one
    add["modelspec.sai_model_spec"] = MODELSPEC_VERSION
    if architecture:
        add["modelspec.architecture"] = architecture
    add["modelspec.implementation"] = "sgm"
    add["modelspec.title"] = title
    if prediction_type:
        add["modelspec.prediction_type"] = prediction_type
    out = {k: v for k, v in add.items() if k not in existing}
    if prediction_stated and prediction_type:
        out["modelspec.prediction_type"] = prediction_type
    return out


def output_metadata(input_metadata: Dict[str, str], modelspec: Dict[str, str], step: Lineage) -> Dict[str, str]:
    meta = dict(input_metadata)
    meta.update(modelspec)
    meta[LINEAGE_KEY] = lineage_value(input_metadata.get(LINEAGE_KEY), step)
    return meta


def with_output_hash(meta: Dict[str, str], data_sha256: Optional[str]) -> Dict[str, str]:
    """Hashes of the output's own tensor bytes: `modelspec.hash_sha256` ("0x" + 64 hex, on every
    output, with or without other ModelSpec keys: an extracted text encoder has no architecture id) and kohya's `sshs_model_hash` (when the input had one). Both are
    the sha256 of the data section (formats/data_hash.py). An input's values describe the input's
    bytes, so they are replaced, or removed when the output is not hashed (`data_sha256` None);
    kohya's `sshs_legacy_hash` depends on kohya's own serialisation and cannot be recomputed: it
    is removed rather than left wrong."""
    meta = dict(meta)
    meta.pop("sshs_legacy_hash", None)
    if data_sha256 is None:
        meta.pop("modelspec.hash_sha256", None)
        meta.pop("sshs_model_hash", None)
        return meta
    meta["modelspec.hash_sha256"] = "0x" + data_sha256  # asked for (--hash-output): written on every output
    if "sshs_model_hash" in meta:
        meta["sshs_model_hash"] = data_sha256
    return meta


def title_of(path: Path) -> str:
    return path.name.rsplit(".", 1)[0] if "." in path.name else path.name


def file_size(path: str) -> int:
    return os.path.getsize(path)
