"""`sdtk hash`: every hash equals an independent computation (hashlib / zlib / blake3) on edge-case files."""
import hashlib
import json
import os
import struct
import zlib

import blake3
import pytest

from sdtk.errors import SdtkError
from sdtk.formats.safetensors import write_safetensors
from sdtk.hashing import HashOptions, hash_bytes, hash_file
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import DTYPES

MiB = 1024 * 1024
# Small buffers and threads for every size: the threaded path crosses many buffer boundaries.
THREADED = HashOptions(chunk_bytes=64 * 1024, buffers=3, threads_from_bytes=0)


def independent(data: bytes) -> dict:
    """The definitions of hashes.md, written the plain way (one hasher at a time)."""
    sha = hashlib.sha256(data).hexdigest()
    window = data[0x100000:0x100000 + 0x10000]
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
    v3_start = len(data) if n is None else (8 + n if n < 16 * MiB else 8)
    return {
        "sha256": sha,
        "autov1_a1111": hashlib.sha256(window).hexdigest()[:8],
        "autov1_civitai": hashlib.sha256(window).hexdigest()[:8].upper() if len(data) >= 2 * MiB else None,
        "autov3": hashlib.sha256(data[v3_start:]).hexdigest(),
        "crc32": struct.pack("<I", zlib.crc32(data)).hex(),
        "blake3": blake3.blake3(data).hexdigest(),
    }


def check(path, data):
    want = independent(data)
    for options in (HashOptions(), THREADED):
        h = hash_file(path, options=options)
        civ, a11 = h.formatted("civitai"), h.formatted("a1111")
        assert civ == {
            "SHA256": want["sha256"].upper(), "AutoV1": want["autov1_civitai"], "AutoV2": want["sha256"][:10].upper(),
            "AutoV3": want["autov3"][:12].upper(), "CRC32": want["crc32"].upper(), "BLAKE3": want["blake3"].upper(),
        }
        assert a11 == {
            "SHA256": want["sha256"], "AutoV1": want["autov1_a1111"], "AutoV2": want["sha256"][:10],
            "AutoV3": want["autov3"], "CRC32": want["crc32"], "BLAKE3": want["blake3"],
        }
    return h


def random_bytes(n, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", [0, 5, 8, 100, MiB - 1, MiB + 100, MiB + 0x10000 + 7, 2 * MiB - 1, 2 * MiB, 3 * MiB + 12345])
def test_random_files_of_every_size_class(tmp, size):
    data = random_bytes(size, seed=size)
    p = tmp / "f.bin"
    p.write_bytes(data)
    check(p, data)


def test_hello_world_crc32_prints_as_civitai_vector(tmp):
    p = tmp / "hello.txt"
    p.write_bytes(b"hello world")
    assert zlib.crc32(b"hello world") == 0x0D4A1185
    assert hash_file(p).formatted()["CRC32"] == "85114A0D"
    assert hash_bytes(b"hello world").formatted()["CRC32"] == "85114A0D"


def test_a1111_autov1_of_a_tiny_file_is_the_empty_hash(tmp):
    p = tmp / "tiny.bin"
    p.write_bytes(b"abc")
    h = hash_file(p)
    assert h.formatted("a1111")["AutoV1"] == "e3b0c442"  # sha256 of no bytes, as A1111 prints it
    assert h.formatted("civitai")["AutoV1"] is None


def test_safetensors_autov3_skips_the_header(tmp):
    plan = layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=4)
    p = tmp / "vae.safetensors"
    write_safetensors(p, plan, {"modelspec.title": "x"})
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    h = check(p, data)
    assert h.autov3_start == 8 + n and h.autov3 == hashlib.sha256(data[8 + n:]).hexdigest()


def test_pickle_like_bytes(tmp):
    # a protocol-2 pickle opening: the first 8 bytes read as a huge N, so AutoV3 skips only 8
    data = b"\x80\x02}q\x00(X\x05\x00\x00\x00model" + random_bytes(3 * MiB, seed=7)
    p = tmp / "model.ckpt"
    p.write_bytes(data)
    h = check(p, data)
    assert h.autov3_start == 8


def test_header_claim_over_16_mib_skips_only_8_bytes(tmp):
    data = struct.pack("<Q", 16 * MiB + 1) + b"{" + random_bytes(2 * MiB, seed=3)
    p = tmp / "liar.safetensors"
    p.write_bytes(data)
    h = check(p, data)
    assert h.autov3_start == 8


def test_header_claim_just_under_16_mib_beyond_the_end_hashes_nothing(tmp):
    data = struct.pack("<Q", 16 * MiB - 1) + random_bytes(MiB, seed=4)
    p = tmp / "short.safetensors"
    p.write_bytes(data)
    h = check(p, data)
    assert h.autov3 == hashlib.sha256(b"").hexdigest()


def test_tensor_digests_in_the_same_read_match_the_catalogue(tmp):
    from sdtk.formats import open_model
    from sdtk.hashing import content_hash
    from sdtk.hashing.content import raw_tensor_spans
    from sdtk.hashing.model import hash_model_file

    plan = layout_plan(load_layout("sd15-emaonly"), values="random", scale=16)
    p = tmp / "m.safetensors"
    write_safetensors(p, plan)
    with open_model(p) as cat:
        spans = raw_tensor_spans(cat)
        one_read = hash_file(p, tensor_spans=spans, options=THREADED)
        for t in cat:
            assert one_read.tensor_digests[t.name] == hashlib.sha256(t.read().tobytes()).hexdigest()
        expected = content_hash(cat)
    mh = hash_model_file(p, options=THREADED)
    assert mh.reads == 1 and mh.content == expected
    assert mh.file == hash_file(p)


def test_a_file_that_grows_while_hashed_is_refused(tmp):
    p = tmp / "growing.bin"
    p.write_bytes(random_bytes(MiB))

    def append(done, total):
        with open(p, "ab") as f:
            f.write(b"more")

    with pytest.raises(SdtkError, match="changed while it was being hashed"):
        hash_file(p, on_progress=append, options=THREADED)


def test_cli_prints_civitai_style_and_json_keys(tmp, cli):
    p = tmp / "hello.txt"
    p.write_bytes(b"hello world")
    r = cli("hash", p)
    assert r.returncode == 0, r.stderr
    assert "CRC32   85114A0D" in r.stdout
    r = cli("hash", p, "--json")
    rows = json.loads(r.stdout)
    assert list(rows[0]) == ["file", "size", "SHA256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3"]
    assert rows[0]["SHA256"] == hashlib.sha256(b"hello world").hexdigest().upper()
    assert rows[0]["AutoV1"] is None
    r = cli("hash", p, "--json", "--style", "a1111")
    row = json.loads(r.stdout)[0]
    assert row["AutoV1"] == "e3b0c442" and row["CRC32"] == "85114a0d" and len(row["AutoV3"]) == 64


def test_cli_bad_input_is_one_line_and_exit_2(tmp, cli):
    r = cli("hash", tmp / "missing.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    r = cli("hash", tmp, "--style", "bogus")
    assert r.returncode == 2 and "--style" in r.stderr
    p = tmp / "notes.txt"
    p.write_text("not a model")
    r = cli("hash", p, "--content", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)[0]["Content"] is None
    assert "not a model file" in r.stderr


def test_content_hash_follows_its_documented_definition(tmp):
    import numpy as np

    from sdtk.formats import open_model
    from sdtk.hashing import content_hash
    from sdtk.tensors import from_array

    b = np.arange(6, dtype=np.float16).reshape(2, 3)
    a = np.array([1.5, -2.0], dtype=np.float32)
    s = np.array(7, dtype=np.int64)
    p = tmp / "tiny.safetensors"
    write_safetensors(p, [from_array("b.weight", b), from_array("a.bias", a), from_array("step", s)], {"title": "x"})
    stream = b"sdtk-content-v1\n"
    for name, dt, dims, arr in sorted([("a.bias", "F32", "2", a), ("b.weight", "F16", "2,3", b), ("step", "I64", "", s)]):
        stream += f"{name}\0{dt}\0{dims}\0{hashlib.sha256(arr.astype(arr.dtype.newbyteorder('<')).tobytes()).hexdigest()}\n".encode()
    with open_model(p) as cat:
        assert content_hash(cat) == hashlib.sha256(stream).hexdigest()


def test_content_hash_ignores_metadata_and_order_but_not_names_dtypes_values(tmp):
    from sdtk.formats import open_model
    from sdtk.hashing import content_hash
    from sdtk.tensors import LazyTensor

    plan = layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=16)

    def chash(name, tensors, metadata=None):
        p = tmp / name
        write_safetensors(p, tensors, metadata)
        with open_model(p) as cat:
            return content_hash(cat)

    base = chash("a.safetensors", plan, {"a": "1"})
    assert chash("b.safetensors", list(reversed(plan)), {"b": "2", "modelspec.title": "renamed"}) == base
    renamed = [LazyTensor("x." + t.name, t.dtype, t.shape, t.loader) if i == 0 else t for i, t in enumerate(plan)]
    assert chash("c.safetensors", renamed) != base
    t0 = plan[0]
    nudged = [LazyTensor(t0.name, t0.dtype, t0.shape, lambda: t0.read() + 1)] + plan[1:]
    assert chash("d.safetensors", nudged) != base
    as_fp16 = [LazyTensor(t.name, DTYPES["F16"], t.shape, (lambda t=t: t.read().astype("<f2"))) if t.dtype.is_float else t for t in plan]
    assert chash("e.safetensors", as_fp16) != base


def test_content_hash_is_the_same_in_a_ckpt_and_a_safetensors(tmp):
    from sdtk.formats import open_model
    from sdtk.formats.torchzip_write import write_torch_zip
    from sdtk.hashing import content_hash
    from sdtk.hashing.model import hash_model_file

    plan = layout_plan(load_layout("sd15-emaonly"), values="random", scale=32)
    st = tmp / "m.safetensors"
    write_safetensors(st, plan, {"modelspec.title": "m"})
    ck = tmp / "m.ckpt"
    write_torch_zip(ck, layout_plan(load_layout("sd15-emaonly"), values="random", scale=32), wrap="state_dict",
                    extras={"global_step": 1000})
    with open_model(ck) as cat:
        assert cat.format == "torch-zip"
        from_ckpt = content_hash(cat)
    assert from_ckpt == hash_model_file(st).content == hash_model_file(ck).content
    assert hash_file(st).sha256 != hash_file(ck).sha256


def test_plain_entry_points_for_other_commands(tmp):
    from sdtk.hashing import file_hashes, sha256_file

    data = random_bytes(3 * MiB, seed=11)
    p = tmp / "f.bin"
    p.write_bytes(data)
    want = independent(data)
    assert sha256_file(p) == want["sha256"]
    got = file_hashes(p, ["sha256", "autov3"])
    assert got == {"sha256": want["sha256"], "autov3": want["autov3"]}
    every = file_hashes(p)
    assert every["crc32"] == want["crc32"] and every["blake3"] == want["blake3"] and every["autov2"] == want["sha256"][:10]
