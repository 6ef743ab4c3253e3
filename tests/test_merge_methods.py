"""Merge formulas against independent numpy references (and torch/A1111 order as oracle), on
scaled-down random-valued models built from real layouts."""
import numpy as np
import pytest

from conftest import torch_or_skip
from helpers_merge import make_model, tensors
from sdtk.ops.merge import methods as M
from sdtk.ops.merge import plan as P
from sdtk.ops.merge.recipe import single_step_recipe
from sdtk.ops.merge.run import run_recipe

F32 = np.float32


@pytest.fixture(scope="module")
def sd15_fp32(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    return [make_model(d, n, seed=s, scale=32) for n, s in (("a", 1), ("b", 2), ("c", 3))], d


def merge(paths, out, method, alpha=None, beta=None, dtype="fp16", **kw):
    recipe = single_step_recipe([str(p) for p in paths], method, alpha, beta, kw.pop("seed", 0), kw.pop("blocks", None),
                                kw.pop("te", "merge"), kw.pop("vae", "merge"), kw.pop("exclude", None), dtype, kw.pop("bake_vae", None))
    return run_recipe(recipe, str(out), hash_inputs=kw.pop("hash_inputs", False), **kw)


def float_keys(t):
    return [k for k, v in t.items() if v.dtype.kind == "f" and v.size and "." in k]


def test_weighted_sum_is_a1111_order_bit_for_bit(sd15_fp32, tmp_path):
    (a, b, _), _ = sd15_fp32
    merge([a, b], tmp_path / "o.safetensors", "weighted-sum", 0.3)
    A, B, O = tensors(a), tensors(b), tensors(tmp_path / "o.safetensors")
    for k in float_keys(A):
        ref = ((F32(1 - 0.3) * A[k]) + (F32(0.3) * B[k])).astype(np.float16)
        assert O[k].dtype == np.float16
        assert O[k].tobytes() == ref.tobytes(), k


def test_add_difference_is_a1111_order_bit_for_bit(sd15_fp32, tmp_path):
    (a, b, c), _ = sd15_fp32
    merge([a, b, c], tmp_path / "o.safetensors", "add-difference", 0.7)
    A, B, C, O = (tensors(p) for p in (a, b, c, tmp_path / "o.safetensors"))
    for k in float_keys(A):
        ref = (A[k] + F32(0.7) * (B[k] - C[k])).astype(np.float16)
        assert O[k].tobytes() == ref.tobytes(), k


def test_weighted_sum_and_add_difference_match_torch_a1111_code(sd15_fp32, tmp_path):
    torch = torch_or_skip()
    (a, b, c), _ = sd15_fp32
    merge([a, b], tmp_path / "ws.safetensors", "weighted-sum", 0.45)
    merge([a, b, c], tmp_path / "ad.safetensors", "add-difference", 0.6)
    A, B, C = tensors(a), tensors(b), tensors(c)
    WS, AD = tensors(tmp_path / "ws.safetensors"), tensors(tmp_path / "ad.safetensors")
    for k in float_keys(A)[::10]:
        t0, t1, t2 = (torch.from_numpy(x[k]) for x in (A, B, C))
        ws = (((1 - 0.45) * t0) + (0.45 * t1)).half()  # A1111 modules/extras.py weighted_sum
        ad = (t0 + (0.6 * (t1 - t2))).half()  # A1111 get_difference + add_difference
        assert WS[k].tobytes() == ws.numpy().tobytes(), k
        assert AD[k].tobytes() == ad.numpy().tobytes(), k


def test_position_ids_stay_int64_and_identical_sd1_and_sdxl(tmp_path):
    for layout in ("sd15-emaonly", "sdxl-base"):
        a = make_model(tmp_path, f"{layout}-a", layout, seed=1, scale=64)
        b = make_model(tmp_path, f"{layout}-b", layout, seed=2, scale=64)
        c = make_model(tmp_path, f"{layout}-c", layout, seed=3, scale=64)
        out = tmp_path / f"{layout}-o.safetensors"
        merge([a, b, c], out, "add-difference", 1.0)
        A, O = tensors(a), tensors(out)
        keys = [k for k in A if k.endswith("position_ids")]
        assert keys
        for k in keys:
            assert O[k].dtype == np.int64
            assert O[k].tobytes() == A[k].tobytes()
            assert O[k].tolist() == [list(range(O[k].shape[-1]))]


def _ref_train_difference(a, b, c, alpha):
    diff = b - c
    dist = np.abs(diff)
    dba = np.abs(b - a)
    tot = dist + dba
    scale = np.where(tot != 0, dba / np.where(tot == 0, 1, tot), 0).astype(F32)
    return a + (np.sign(diff) * scale * dist) * F32(alpha * 1.8)


def _ref_ties(a, b, c, alpha, density):
    ds = []
    for m in (a, b):
        d = (m - c).ravel()
        k = int(np.ceil(density * d.size))
        thr = np.sort(np.abs(d))[::-1][k - 1]
        ds.append(np.where(np.abs(d) >= thr, d, 0))
    sign = np.sign(ds[0] + ds[1])
    agree = [(np.sign(d) == sign) & (d != 0) for d in ds]
    tot = sum(np.where(g, d, 0) for g, d in zip(agree, ds))
    cnt = sum(g.astype(F32) for g in agree)
    merged = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0)
    return (c.ravel() + F32(alpha) * merged.astype(F32)).reshape(a.shape)


def _ref_slerp(a, b, t):
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    ua, ub = a64 / na, b64 / nb
    w = np.arccos(np.clip(ua @ ub, -1, 1))
    v = (np.sin((1 - t) * w) * ua + np.sin(t * w) * ub) / np.sin(w)
    return (v * ((1 - t) * na + t * nb)).reshape(a.shape)


@pytest.mark.parametrize("method,alpha,beta", [
    ("triple-sum", 0.3, 0.2), ("sum-twice", 0.4, 0.3), ("train-difference", 0.8, None),
    ("ties", 1.0, 0.3), ("dare", 0.9, 0.4), ("slerp", 0.35, None), ("cosine", 0.2, None),
])
def test_each_method_matches_numpy_reference(sd15_fp32, tmp_path, method, alpha, beta):
    (a, b, c), _ = sd15_fp32
    three = method in ("triple-sum", "sum-twice", "train-difference", "ties", "dare")
    out = tmp_path / "o.safetensors"
    merge([a, b, c] if three else [a, b], out, method, alpha, beta, dtype="fp32", seed=7)
    A, B, C, O = (tensors(p) for p in (a, b, c, out))
    checked = 0
    for k in float_keys(A)[::7]:
        x, y, z = A[k], B[k], C[k]
        if method == "triple-sum":
            ref = F32(1 - alpha - beta) * x + F32(alpha) * y + F32(beta) * z
        elif method == "sum-twice":
            ref = F32(1 - beta) * (F32(1 - alpha) * x + F32(alpha) * y) + F32(beta) * z
        elif method == "train-difference":
            ref = _ref_train_difference(x, y, z, alpha)
        elif method == "ties":
            ref = _ref_ties(x, y, z, alpha, beta)
        elif method == "dare":
            keep = M.dare_keep_mask(7, k, 0, x.size, beta).reshape(x.shape)
            ref = x + F32(alpha) * np.where(keep, (y - z) * F32(1 / (1 - beta)), 0).astype(F32)
        elif method == "slerp":
            ref = _ref_slerp(x, y, alpha)
        else:
            x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            cos = x64 @ y64 / (np.linalg.norm(x64) * np.linalg.norm(y64))
            kk = 1 - min(max(cos - alpha, 0), 1)
            ref = (1 - kk) * x64.reshape(x.shape) + kk * y64.reshape(x.shape)
        np.testing.assert_allclose(O[k], ref, rtol=2e-5, atol=2e-6, err_msg=f"{method} {k}")
        checked += 1
    assert checked > 50


def test_chunking_and_threads_do_not_change_bytes(tmp_path, monkeypatch):
    a, b, c = (make_model(tmp_path, n, seed=s, scale=32) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    for method, paths, beta in (("dare", [a, b, c], 0.5), ("slerp", [a, b], None), ("ties", [a, b, c], 0.2), ("weighted-sum", [a, b], None)):
        merge(paths, tmp_path / "big.safetensors", method, beta=beta, seed=3, workers=1)
        monkeypatch.setattr(P, "CHUNK", 3000)
        merge(paths, tmp_path / "small.safetensors", method, beta=beta, seed=3, workers=3)
        monkeypatch.undo()
        big, small = tensors(tmp_path / "big.safetensors"), tensors(tmp_path / "small.safetensors")
        for k in big:
            if method == "slerp":  # per-tensor dot products summed in a different order
                np.testing.assert_allclose(big[k].astype(F32), small[k].astype(F32), rtol=1e-3, atol=1e-5)
            else:
                assert big[k].tobytes() == small[k].tobytes(), (method, k)
        (tmp_path / "big.safetensors").unlink()
        (tmp_path / "small.safetensors").unlink()


def test_dare_mask_is_chunk_invariant_and_seeded():
    whole = M.dare_keep_mask(5, "model.x", 0, 10_000, 0.3)
    parts = np.concatenate([M.dare_keep_mask(5, "model.x", lo, min(777, 10_000 - lo), 0.3) for lo in range(0, 10_000, 777)])
    assert (whole == parts).all()
    assert not (whole == M.dare_keep_mask(6, "model.x", 0, 10_000, 0.3)).all()
    assert not (whole == M.dare_keep_mask(5, "model.y", 0, 10_000, 0.3)).all()
    assert abs((~whole).mean() - 0.3) < 0.03


def test_same_inputs_same_bytes(sd15_fp32, tmp_path):
    (a, b, c), _ = sd15_fp32
    merge([a, b, c], tmp_path / "1.safetensors", "dare", 1.0, 0.5, seed=11, hash_inputs=True)
    merge([a, b, c], tmp_path / "2.safetensors", "dare", 1.0, 0.5, seed=11, hash_inputs=True)
    merge([a, b, c], tmp_path / "3.safetensors", "dare", 1.0, 0.5, seed=12, hash_inputs=True)
    one, two, three = ((tmp_path / f"{i}.safetensors").read_bytes() for i in (1, 2, 3))
    assert one == two
    assert one != three


def test_slerp_endpoints_and_weighted_sum_fallback():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000).astype(F32), rng.standard_normal(1000).astype(F32)
    np.testing.assert_allclose(M.slerp(a, b, 0.0), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(M.slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-6)
    assert M.slerp(a, a * 2, 0.5).tobytes() == M.weighted_sum(a, a * 2, 0.5).tobytes()
    z = np.zeros_like(a)
    assert M.slerp(z, b, 0.5).tobytes() == M.weighted_sum(z, b, 0.5).tobytes()


def test_train_difference_leaves_a_where_b_equals_c():
    a = np.arange(10, dtype=F32)
    b = np.ones(10, dtype=F32)
    assert M.train_difference(a, b, b.copy(), 1.0).tobytes() == a.tobytes()
