"""Tokenizer folders for a diffusers pipeline, written offline.

CLIP (every SD family): `vocab.json`, `merges.txt`, `special_tokens_map.json`,
`tokenizer_config.json`, derived from the BPE merges sdtk ships (sdtk/data/tokenizers/SOURCE.md:
OpenAI CLIP via open_clip_torch, MIT). The vocabulary is rebuilt the way CLIP builds it: the 256
byte symbols (GPT-2's byte -> unicode table), the same with `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>` (shared reference diffusers-interop.md 2.7).
SD2's tokenizer and SDXL/SD3's second tokenizer pad with `!` (id 0), as OpenCLIP does.
T5 tokenizers cannot be shipped: they are copied from a folder the user gives (--tokenizers).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Optional, Tuple

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
# Files a T5 tokenizer folder may hold (transformers T5TokenizerFast: tokenizer.json and/or spiece.model).
T5_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def byte_symbols() -> List[str]:
    """The 256 printable stand-ins for bytes in CLIP's vocabulary order (GPT-2/CLIP byte-level
    BPE): first the printable latin-1 bytes, standing for themselves, in byte order; then the
    other bytes, in byte order, mapped to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_merges_text() -> str:
    ref = resources.files("sdtk.data").joinpath("tokenizers", "clip-merges.txt.gz")
    with ref.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")


@lru_cache(maxsize=1)
def clip_vocab() -> Dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for line in clip_merges_text().splitlines()[1:]:
        if line:
            a, b = line.split(" ")
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def clip_tokenizer_files(pad: str) -> Dict[str, bytes]:
    """{file name: bytes} of a CLIP tokenizer folder padding with `pad`."""
    vocab = clip_vocab()
    added = {str(vocab[BOS]): _special(BOS), str(vocab[EOS]): _special(EOS)}
    if pad != EOS:
        added[str(vocab[pad])] = _special(pad)
    config = {
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": BOS, "clean_up_tokenization_spaces": True,
        "do_lower_case": True, "eos_token": EOS, "errors": "replace", "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": pad, "tokenizer_class": "CLIPTokenizer", "unk_token": EOS,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad, "unk_token": EOS}
    dump = lambda obj: (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
            "merges.txt": clip_merges_text().encode("utf-8"),
            "special_tokens_map.json": dump(special), "tokenizer_config.json": dump(config)}


def find_t5_tokenizer(source: Optional[str], folder_name: str) -> Optional[str]:
    """The folder holding a T5 tokenizer in what the user gave: FOLDER/<tokenizer_N>, or FOLDER
    itself (a diffusers pipeline folder or a bare tokenizer folder)."""
    if not source:
        return None
    for cand in (os.path.join(source, folder_name), source, os.path.join(source, "tokenizer_3"),
                 os.path.join(source, "tokenizer_2")):
        if os.path.isfile(os.path.join(cand, "tokenizer.json")) or os.path.isfile(os.path.join(cand, "spiece.model")):
            if _is_t5(cand):
                return cand
    return None


def _is_t5(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as fh:
            cls = json.load(fh).get("tokenizer_class", "")
    except (OSError, ValueError):
        cls = ""
    return "T5" in cls or os.path.isfile(os.path.join(folder, "spiece.model")) or not cls


def copy_t5_tokenizer(src: str, dest: str) -> List[str]:
    os.makedirs(dest, exist_ok=True)
    copied = []
    for name in T5_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dest, name))
            copied.append(name)
    return copied
