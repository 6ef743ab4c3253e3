"""kohya's `sshs_legacy_hash` recomputed from a file (hashing/kohya_legacy.py) and checked by inspect.

The oracle is kohya's own definition run with the reference writer: sd-scripts
`precalculate_safetensors_hashes` serialises the tensors with only the `ss_*` metadata through
`safetensors.torch.save` (here its numpy twin, the same Rust serialiser) and `addnet_hash_legacy`
hashes bytes 0x100000..0x110000 of that buffer (reference/lora.md §4.2). The file under test is
written by sdtk in another tensor order and with more metadata, as real files are after editing."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sdtk.formats.safetensors import read_safetensors, write_safetensors
from sdtk.hashing.kohya_legacy import legacy_hash_candidates
from sdtk.identify import identify_path
from sdtk.tensors import from_array

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors (test extra) is the reference serialiser")


def kohya_legacy(tensors, metadata):
    """sd-scripts train_util.precalculate_safetensors_hashes + addnet_hash_legacy, verbatim in meaning."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = safetensors_numpy.save(tensors, metadata=ss)
    return hashlib.sha256(buf[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def lora_tensors(seed=0, rank=64, modules=12):  # 1.97 MB of data: the window lies inside
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_{i % 3}_attentions_{i % 2}_transformer_blocks_0_attn1_to_q_{i}"
        out[f"{name}.lora_down.weight"] = rng.standard_normal((rank, 640)).astype(np.float16)
        out[f"{name}.lora_up.weight"] = rng.standard_normal((640, rank)).astype(np.float16)
        out[f"{name}.alpha"] = np.array(rank / 2, dtype=np.float32)
    return out


METADATA = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": '{"10_cat": {"a cat": 3, "t\\u00e9l\\u00e9 \\"quoted\\"": 1}}',
            "ss_output_name": "café lora", "modelspec.title": "not part of kohya's hash"}


def write_like_an_edited_file(path, tensors, metadata):
    plan = [from_array(k, v) for k, v in reversed(sorted(tensors.items()))]  # not safetensors' order
    write_safetensors(path, plan, metadata=metadata)


def test_recomputed_value_equals_kohyas_definition(tmp_path):
    tensors = lora_tensors()
    expected = kohya_legacy(tensors, METADATA)
    path = tmp_path / "lora.safetensors"
    write_like_an_edited_file(path, tensors, METADATA)
    cat = read_safetensors(path)
    try:
        candidates = legacy_hash_candidates(cat)
    finally:
        cat.close()
    assert candidates[0] == expected  # safetensors >= 0.4 pads the header: the first candidate
    assert len(candidates) == 2 and candidates[1] != expected  # the unpadded (older) layout differs here


def test_small_file_hashes_an_empty_window_like_kohya(tmp_path):
    tensors = lora_tensors(rank=8, modules=1)  # < 1 MiB: kohya's slice is empty
    path = tmp_path / "small.safetensors"
    write_like_an_edited_file(path, tensors, METADATA)
    cat = read_safetensors(path)
    try:
        assert legacy_hash_candidates(cat)[0] == kohya_legacy(tensors, METADATA) == hashlib.sha256(b"").hexdigest()[:8]
    finally:
        cat.close()


def test_inspect_accepts_the_right_value_and_flags_a_stale_one(tmp_path):
    tensors = lora_tensors(seed=1)
    good = dict(METADATA, sshs_legacy_hash=kohya_legacy(tensors, METADATA))
    write_like_an_edited_file(tmp_path / "good.safetensors", tensors, good)
    assert not [p for p in identify_path(tmp_path / "good.safetensors").problems if p.code == "adapter_hash_mismatch"]

    changed = {k: np.asarray(v * v.dtype.type(2)) for k, v in tensors.items()}  # weights changed after kohya wrote the hash
    write_like_an_edited_file(tmp_path / "stale.safetensors", changed, good)
    found = [p for p in identify_path(tmp_path / "stale.safetensors").problems if p.code == "adapter_hash_mismatch"]
    assert [p.details["key"] for p in found] == ["sshs_legacy_hash"]
    assert found[0].details["claimed"] == good["sshs_legacy_hash"]
    assert found[0].details["actual"] == kohya_legacy(changed, good)
