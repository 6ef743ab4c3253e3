"""Tensor for tensor equality with torch.load(weights_only=True) on files real torch writes here,
and the corpus's benign torch files; plus controls proving the zip/tar/legacy payloads are real
under torch.load(weights_only=False) while sdtk runs none of them."""
import codecs
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from conftest import torch_or_skip
from helpers_readers import CORPUS, TORCH_DATA, bits_of, plain_json, torch_bits
from sdtk.errors import UnsupportedFormatError
from sdtk.formats import open_model


def _make():
    spec = importlib.util.spec_from_file_location("sdtk_test_make_torch", TORCH_DATA / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_load(torch, path, make):
    """torch.load(weights_only=True), with the non-tensor globals of Lightning/embedding files
    allowlisted the way torch documents (safe_globals)."""
    allowed = [make.fake_lightning_callback_class(), torch.nn.ParameterDict, np.dtype, np.ndarray, codecs.encode,
               np._core.multiarray.scalar, np._core.multiarray._reconstruct, np.dtypes.Float64DType, np.dtypes.Int64DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def _assert_same(cat, tensors, skip=()):
    assert list(cat.tensors) == list(tensors)
    for name, t in tensors.items():
        if name in skip:
            continue
        ours = cat.tensors[name]
        assert ours.dtype.torch_name == str(t.dtype).split(".")[1] and ours.shape == tuple(t.shape), name
        np.testing.assert_array_equal(bits_of(ours.read()), torch_bits(t), err_msg=name)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch_or_skip()
    make = _make()
    out = tmp_path_factory.mktemp("torch_written")
    return out, make, make.build_cases(out)


@pytest.mark.parametrize("name", ["every_dtype.pt", "shared_views.pt", "lightning.ckpt", "embedding.pt", "nested.pth",
                                  "legacy.pt", "legacy_embedding.pt"])
def test_equal_to_torch_load_weights_only(written, name):
    torch = torch_or_skip()
    out, make, cases = written
    originals, extras = cases[name]
    if name == "legacy_embedding.pt":
        # torch's weights_only unpickler refuses legacy ('module', class, source) ids; this file
        # was written by this test, so the full unpickler is safe here.
        loaded = make.flat_tensors(torch.load(out / name, weights_only=False))
    else:
        loaded = make.flat_tensors(_torch_load(torch, out / name, make))
    with open_model(out / name) as cat:
        _assert_same(cat, loaded)  # what torch.load gives
        _assert_same(cat, originals)  # what was saved
        assert plain_json(cat.extras) == plain_json(extras)


def test_big_endian_checkpoint(written):
    torch = torch_or_skip()
    out, make, cases = written
    originals, _ = cases["bigendian.pt"]
    loaded = make.flat_tensors(_torch_load(torch, out / "bigendian.pt", make))
    with open_model(out / "bigendian.pt") as cat:
        _assert_same(cat, originals)
        # torch 2.13 does not byte-swap the storages of uint16/32/64 (dtypes without a typed
        # storage class) when loading big-endian files; sdtk gives the saved values.
        _assert_same(cat, loaded, skip={"int.uint16", "int.uint32", "int.uint64"})


def test_committed_files_match_a_fresh_torch_save(written):
    """The committed fixtures are what this torch writes (same tensors, same extras)."""
    out, _, cases = written
    for name in cases:
        with open_model(out / name) as fresh, open_model(TORCH_DATA / name) as committed:
            assert list(fresh.tensors) == list(committed.tensors)
            for t in fresh:
                np.testing.assert_array_equal(bits_of(t.read()), bits_of(committed[t.name].read()))


@pytest.mark.parametrize("rel", ["data/pytorch_model.bin", "data/new_pytorch_model.bin"])
def test_benign_corpus_torch_files_equal_torch_load(rel):
    torch = torch_or_skip()
    loaded = _make().flat_tensors(torch.load(CORPUS / rel, weights_only=True))
    with open_model(CORPUS / rel) as cat:
        _assert_same(cat, loaded)


def test_complex_tensors_are_refused_clearly(tmp):
    torch = torch_or_skip()
    torch.save({"z": torch.ones(2, dtype=torch.complex64)}, tmp / "complex.pt")
    with pytest.raises(UnsupportedFormatError, match="[Cc]omplex"):
        open_model(tmp / "complex.pt")


CONTAINER_PAYLOADS = ["legacy_stacked.pt", "tar_format.pt", "zip_payload.ckpt", "duplicate_data_pkl.ckpt", "cd_name_swap.ckpt"]


def test_container_payloads_are_real_under_torch_load(tmp):
    """Control for test_scan.test_payloads_never_run: torch.load(weights_only=False) does run
    these (so sdtk refusing them, with no marker, is meaningful). One interpreter, one marker each."""
    torch_or_skip()
    from test_scan import _write_payloads

    paths, markers = [], []
    for name in CONTAINER_PAYLOADS:
        folder = tmp / name.replace(".", "_")
        folder.mkdir()
        markers.append(folder / "MARKER")
        paths.append(str(_write_payloads(folder, markers[-1])[name]))
    code = ("import sys, torch\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        torch.load(p, weights_only=False)\n"
            "    except Exception:\n"
            "        pass\n")
    subprocess.run([sys.executable, "-c", code, *paths], cwd=tmp, timeout=300, capture_output=True)
    assert [m.exists() for m in markers] == [True] * len(markers)
