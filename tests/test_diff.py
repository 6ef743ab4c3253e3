"""`sdtk diff`: per-component and per-block cosine similarity and relative L2, against numpy."""
import json

import numpy as np
import pytest

from helpers_merge import make_model, tensors
from sdtk.formats import open_model
from sdtk.ops.merge.blocks import BLOCK_LISTS, block_of
from sdtk.ops.merge.diff import diff_models


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    return make_model(d, "a", seed=1, scale=32), make_model(d, "b", seed=2, scale=32, dtype="float16")


def _expected(A, B, select):
    keys = [k for k in A if A[k].dtype.kind == "f" and select(k)]
    a = np.concatenate([A[k].astype(np.float64).ravel() for k in keys])
    b = np.concatenate([B[k].astype(np.float64).ravel() for k in keys])
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), np.linalg.norm(a - b) / np.linalg.norm(a), len(keys)


def test_diff_matches_numpy_per_component_and_block(pair):
    a, b = pair
    A, B = tensors(a), tensors(b)
    with open_model(a) as ca, open_model(b) as cb:
        res = diff_models(ca, cb).as_dict()
    assert res["family"] == "sd1"
    cos, rel, n = _expected(A, B, lambda k: k.startswith("cond_stage_model."))
    te = res["components"]["te"]
    assert te["keys"] == n and te["cosine"] == pytest.approx(cos, abs=1e-7) and te["relative_l2"] == pytest.approx(rel, abs=1e-7)
    cos, rel, n = _expected(A, B, lambda k: block_of(k, "sd1") == "IN04")
    assert res["blocks"]["IN04"]["keys"] == n and res["blocks"]["IN04"]["cosine"] == pytest.approx(cos, abs=1e-7)
    assert list(res["blocks"]) == BLOCK_LISTS["sd1"]
    assert res["non_float_differs"] == []


def test_diff_of_a_model_with_itself(pair, cli):
    a, _ = pair
    r = cli("diff", a, a, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["total"]["cosine"] == pytest.approx(1.0) and data["total"]["relative_l2"] == 0.0
    assert data["total"]["identical_keys"] == data["total"]["keys"] > 1000
    r = cli("diff", a, pair[1])
    assert r.returncode == 0 and "OUT11" in r.stdout and "te" in r.stdout and "cosine" in r.stdout


def test_diff_flags_float_position_ids(tmp_path):
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    a = make_model(tmp_path, "a", seed=1, scale=32)
    bad = make_model(tmp_path, "bad", seed=1, scale=32,
                     transform=lambda l: l.without(lambda k: k == pos).plus([(pos, (1, 77), "float32")]))
    with open_model(a) as ca, open_model(bad) as cb:
        res = diff_models(ca, cb)
    assert res.non_float_differs == [pos]
