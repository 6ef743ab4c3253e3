"""The PyTorch-zip checkpoint writer (fixtures and benchmarks) against torch itself.

torch 2.13 is the oracle: our files must be byte-identical to what `torch.save` writes for the
same state dict (serialization id aside, which torch draws at random and we copy), load with
`torch.load(weights_only=True)` with identical tensors, and pass `zipfile.testzip`."""
import collections
import os
import zipfile
import zlib

import numpy as np
import pytest

from conftest import torch_or_skip
from sdtk.errors import OutputError
from sdtk.formats import torchzip_write
from sdtk.formats.torchzip_write import crc32_of_zeros, write_torch_zip
from sdtk.samples import layout_plan, load_layout
from sdtk.tensors import DTYPES, LazyTensor, from_array

EVERY_DTYPE = sorted(DTYPES)


def every_dtype_plan():
    """One small non-trivial tensor per dtype (3-D, values that differ per element), plus the
    shapes that need care: a scalar, an empty tensor, a tensor with a zero-size middle dim."""
    rng = np.random.default_rng(7)
    plan = []
    for name in EVERY_DTYPE:
        dt = DTYPES[name]
        if dt.is_float:
            arr = (rng.standard_normal((2, 3, 5)) * 4).astype(dt.numpy)
        elif dt.kind == "bool":
            arr = rng.integers(0, 2, (2, 3, 5)).astype(dt.numpy)
        else:
            info = np.iinfo(dt.numpy)
            arr = rng.integers(info.min, info.max, (2, 3, 5), dtype=dt.numpy, endpoint=True)
        plan.append(from_array(f"model.{dt.short}.weight", arr))
    plan.append(from_array("scalar", np.array(3.25, dtype=np.float32)))
    plan.append(from_array("empty", np.zeros((0, 4), dtype=np.float16)))
    plan.append(from_array("hollow", np.zeros((3, 0, 2), dtype=DTYPES["BF16"].numpy)))
    return plan


def to_torch(torch, t: LazyTensor):
    arr = np.ascontiguousarray(t.read())
    tdt = getattr(torch, t.dtype.torch_name)
    if arr.size == 0:
        return torch.empty(t.shape, dtype=tdt)
    return torch.frombuffer(bytearray(arr.tobytes()), dtype=tdt).reshape(t.shape)


def torch_bytes(tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()


def assert_same_tensors(loaded, plan):
    assert list(loaded) == [t.name for t in plan]
    for t in plan:
        got = loaded[t.name]
        assert str(got.dtype) == f"torch.{t.dtype.torch_name}", t.name
        assert tuple(got.shape) == t.shape, t.name
        assert torch_bytes(got) == np.ascontiguousarray(t.read()).tobytes(), t.name


def torch_save_reference(torch, tmp, obj, stem):
    """torch.save `obj` to tmp/<stem>.ckpt; returns (path, archive folder, serialization id)."""
    path = tmp / f"{stem}.ckpt"
    torch.save(obj, path)
    with zipfile.ZipFile(path) as z:
        top = z.namelist()[0].split("/")[0]
        serial = z.read(f"{top}/.data/serialization_id").decode()
    return path, top, serial


# --- byte identity with torch.save ----------------------------------------------------------


def test_every_dtype_is_byte_identical_to_torch_save(tmp):
    torch = torch_or_skip()
    plan = every_dtype_plan()
    ref, top, serial = torch_save_reference(torch, tmp, collections.OrderedDict((t.name, to_torch(torch, t)) for t in plan), "ref")
    ours = tmp / "ours.ckpt"
    size = write_torch_zip(ours, plan, top=top, serial=serial)
    assert size == ours.stat().st_size
    assert ours.read_bytes() == ref.read_bytes()


def test_real_layout_with_many_tensors_is_byte_identical(tmp):
    """sd15-full-ema (1831 tensors: memo indexes past 255, SETITEMS batches of 1000) scaled down."""
    torch = torch_or_skip()
    plan = layout_plan(load_layout("sd15-full-ema"), values="random", seed=3, scale=64)
    ref, top, serial = torch_save_reference(torch, tmp, collections.OrderedDict((t.name, to_torch(torch, t)) for t in plan), "sd15")
    ours = tmp / "ours.ckpt"
    write_torch_zip(ours, plan, top=top, serial=serial)
    assert ours.read_bytes() == ref.read_bytes()


def test_lightning_checkpoint_with_extras_is_byte_identical(tmp):
    torch = torch_or_skip()
    plan = layout_plan(load_layout("vae-sd-kl-f8"), values="random", scale=32)
    extras = {"global_step": 840000, "epoch": 5, "pytorch-lightning_version": "1.4.2",
              "lr": 1.0e-4, "huge": 2**70, "neg": -3, "flags": [True, False, None],
              "loops": {"fit_loop": {"epoch_progress": (1, 2, 3, 4)}, "empty": ()}}
    sd = collections.OrderedDict((t.name, to_torch(torch, t)) for t in plan)
    ref, top, serial = torch_save_reference(torch, tmp, {"state_dict": sd, **extras}, "lightning")
    ours = tmp / "ours.ckpt"
    write_torch_zip(ours, plan, top=top, wrap="state_dict", extras=extras, serial=serial)
    assert ours.read_bytes() == ref.read_bytes()


# --- loading with torch and zipfile ---------------------------------------------------------


def test_torch_load_weights_only_gives_identical_tensors(tmp):
    torch = torch_or_skip()
    plan = every_dtype_plan()
    out = tmp / "all.pt"
    write_torch_zip(out, plan)
    loaded = torch.load(out, weights_only=True)
    assert isinstance(loaded, collections.OrderedDict)
    assert_same_tensors(loaded, plan)


def test_lightning_wrapping_loads(tmp):
    torch = torch_or_skip()
    plan = layout_plan(load_layout("sd15-emaonly"), values="random", scale=64)
    out = tmp / "model.ckpt"
    write_torch_zip(out, plan, top="model", wrap="state_dict", extras={"global_step": 470000, "epoch": 3})
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["state_dict", "global_step", "epoch"]
    assert (loaded["global_step"], loaded["epoch"]) == (470000, 3)
    assert_same_tensors(loaded["state_dict"], plan)
    with zipfile.ZipFile(out) as z:
        assert z.namelist()[0] == "model/data.pkl"


def test_default_lightning_extras(tmp):
    torch = torch_or_skip()
    out = tmp / "m.ckpt"
    write_torch_zip(out, [from_array("w", np.ones(3, np.float32))], wrap="state_dict")
    loaded = torch.load(out, weights_only=True)
    assert loaded["global_step"] == 0 and loaded["epoch"] == 0


def test_zip_structure_matches_torch_conventions(tmp):
    plan = every_dtype_plan()
    out = tmp / "x.ckpt"
    write_torch_zip(out, plan, top="x")
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert names[:4] == ["x/data.pkl", "x/.format_version", "x/.storage_alignment", "x/byteorder"]
        assert names[4:-2] == [f"x/data/{i}" for i in range(len(plan))]
        assert names[-2:] == ["x/version", "x/.data/serialization_id"]
        assert z.read("x/version") == b"3\n" and z.read("x/byteorder") == b"little"
        assert z.read("x/.storage_alignment") == b"64" and z.read("x/.format_version") == b"1"
        assert len(z.read("x/.data/serialization_id")) == 40
        for info, t in zip(z.infolist()[4:-2], plan):
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.file_size == t.nbytes
            data_start = info.header_offset + 30 + len(info.filename) + len(_local_extra(out, info))
            assert data_start % 64 == 0, info.filename


def _local_extra(path, info):
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        nl, el = np.frombuffer(f.read(4), "<u2")
        f.seek(info.header_offset + 30 + nl)
        return f.read(el)


# --- sparse full-size files -----------------------------------------------------------------


def test_full_size_sparse_checkpoint_is_sparse_and_readable(tmp):
    """sd15-full-ema as a 7.7 GB fp32 .ckpt with ~no disk use; torch maps it and sees every tensor."""
    layout = load_layout("sd15-full-ema")
    plan = layout_plan(layout)
    out = tmp / "sd15-full-ema.ckpt"
    size = write_torch_zip(out, plan, wrap="state_dict", sparse_zeros=True)
    st = out.stat()
    assert st.st_size == size > layout.parameter_count * 4 > 7_700_000_000
    assert st.st_blocks * 512 < 32 << 20  # allocated: pickle, zip headers, position_ids
    with zipfile.ZipFile(out) as z:
        infos = {i.filename: i for i in z.infolist()}
        assert len(infos) == len(plan) + 6
        big = max(plan, key=lambda t: t.nbytes)
        rec = f"archive/data/{plan.index(big)}"
        assert infos[rec].file_size == big.nbytes
        assert z.read(rec) == bytes(big.nbytes)  # zipfile checks the CRC of the zeros
    torch = torch_or_skip()
    loaded = torch.load(out, weights_only=True, mmap=True)
    sd = loaded["state_dict"]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(t.name, t.shape) for t in plan]
    ids = next(k for k in sd if k.endswith("position_ids"))
    assert sd[ids].tolist() == [list(range(77))]  # small tensors are written for real


def test_scaled_down_sparse_checkpoint_loads_with_zeros(tmp, monkeypatch):
    torch = torch_or_skip()
    monkeypatch.setattr(torchzip_write, "SPARSE_MIN_BYTES", 64 << 10)
    plan = layout_plan(load_layout("sd15-emaonly"), scale=4)
    out = tmp / "small.ckpt"
    write_torch_zip(out, plan, sparse_zeros=True)
    assert out.stat().st_blocks * 512 < out.stat().st_size // 4
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    assert_same_tensors(torch.load(out, weights_only=True), plan)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 1000, (1 << 20) + 3, 5_000_001])
def test_crc32_of_zeros_matches_zlib(n):
    assert crc32_of_zeros(n) == zlib.crc32(bytes(n))
    assert crc32_of_zeros(n, 0x12345678) == zlib.crc32(bytes(n), 0x12345678)


# --- refusals -------------------------------------------------------------------------------


def test_refuses_existing_output_and_leaves_nothing(tmp):
    out = tmp / "m.ckpt"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        write_torch_zip(out, [from_array("w", np.ones(2, np.float32))])
    assert out.read_bytes() == b"keep"
    write_torch_zip(out, [from_array("w", np.ones(2, np.float32))], overwrite=True)
    assert zipfile.ZipFile(out).testzip() is None
    assert sorted(os.listdir(tmp)) == ["m.ckpt"]


def test_bad_plan_is_refused_and_leaves_nothing(tmp):
    out = tmp / "m.ckpt"
    with pytest.raises(OutputError, match="twice"):
        write_torch_zip(out, [from_array("w", np.ones(2, np.float32))] * 2)
    lying = LazyTensor("w", DTYPES["F32"], (3,), loader=lambda: np.ones(4, np.float32))
    with pytest.raises(OutputError, match="tensor 'w'.* shape"):
        write_torch_zip(out, [from_array("ok", np.ones(2, np.float32)), lying])
    with pytest.raises(OutputError, match="cannot write a"):
        write_torch_zip(out, [], extras={"obj": object()})
    assert os.listdir(tmp) == []


# --- sdtk's own reader reads what the writer writes -----------------------------------------


def test_sdtk_reader_reads_the_writer_output(tmp):
    from sdtk.formats import open_model

    plan = every_dtype_plan()
    out = tmp / "all.ckpt"
    write_torch_zip(out, plan, top="all", wrap="state_dict", extras={"global_step": 12, "epoch": 1})
    with open_model(out) as cat:
        assert cat.format == "torch-zip"
        assert list(cat.tensors) == [t.name for t in plan]
        for t in plan:
            got = cat.tensors[t.name]
            assert (got.dtype, got.shape) == (t.dtype, t.shape)
            assert got.read().tobytes() == np.ascontiguousarray(t.read()).tobytes(), t.name
        assert cat.extras["global_step"] == 12 and cat.extras["epoch"] == 1


def test_sdtk_reader_opens_the_full_size_sparse_file_lazily(tmp):
    from sdtk.formats import open_model

    layout = load_layout("sd15-full-ema")
    out = tmp / "full.ckpt"
    write_torch_zip(out, layout_plan(layout), wrap="state_dict", sparse_zeros=True)
    with open_model(out) as cat:
        assert [(n, t.shape, t.dtype.torch_name) for n, t in cat.tensors.items()] == list(layout.tensors)
        assert cat.parameter_count == layout.parameter_count


def test_zip64_file_over_4_gb(tmp):
    """A 4.3 GB storage (ZIP64 sizes) followed by records beyond 4 GB (ZIP64 offsets), as a
    sparse file; zipfile, torch and sdtk's reader all find the tensor after the big one.
    (Checked once by hand to be byte-identical to torch.save of the same state dict.)"""
    from sdtk.formats import open_model

    big = LazyTensor("big", DTYPES["U8"], (4_300_000_000,), loader=lambda: np.zeros(4_300_000_000, np.uint8))
    after = from_array("after", np.arange(5, dtype=np.float32))
    out = tmp / "big.ckpt"
    size = write_torch_zip(out, [from_array("small", np.ones(3, np.float32)), big, after], top="big", sparse_zeros=True)
    assert size > 2**32 and out.stat().st_blocks * 512 < 1 << 20
    with zipfile.ZipFile(out) as z:
        info = {i.filename: i for i in z.infolist()}
        assert info["big/data/1"].file_size == 4_300_000_000
        assert info["big/data/2"].header_offset > 2**32
        assert z.read("big/data/2") == np.arange(5, dtype=np.float32).tobytes()
        assert z.read("big/.data/serialization_id").isdigit()
    with open_model(out) as cat:
        assert cat.tensors["big"].shape == (4_300_000_000,)
        assert cat.tensors["after"].read().tolist() == [0, 1, 2, 3, 4]
    torch = torch_or_skip()
    loaded = torch.load(out, weights_only=True, mmap=True)
    assert loaded["after"].tolist() == [0, 1, 2, 3, 4] and loaded["big"].shape == (4_300_000_000,)
