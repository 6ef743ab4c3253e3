"""The CLIP tokenizers sdtk writes (from its shipped BPE data) give open_clip's token ids, read by
transformers' CLIPTokenizer. The oracle is open_clip's own SimpleTokenizer (tokenizer.py of the
open_clip_torch 3.3.0 wheel, loaded by file: the package's __init__ needs torchvision, which
does not install beside this CPU torch; CI installs open_clip_torch with --no-deps)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from sdtk.ops.diffusers.tokenizers import clip_tokenizer_files

TEXTS = ["a photo of a cat", "Ünïcödé 🐱 (masterpiece:1.2), best quality, 8k", "", "word " * 100,
         "A1111-style [prompt|mix] {x}, <lora:foo:0.5> 'quotes' and 42 numbers"]


def _open_clip_tokenizer():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch==3.3.0)")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_ids_equal_open_clip(pad, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name, data in clip_tokenizer_files(pad).items():
        (tmp_path / name).write_bytes(data)
    ours = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    oracle = _open_clip_tokenizer()
    assert len(ours) == 49408
    assert ours.pad_token_id == (0 if pad == "!" else 49407)  # OpenCLIP pads with 0 ("!"), CLIP-L with EOT
    for text in TEXTS:
        ids = ours(text, max_length=77, truncation=True).input_ids
        ref = [int(i) for i in oracle(text)[0].tolist()]
        n = len(ids)
        assert ids == ref[:n] and all(i == 0 for i in ref[n:]), text
