"""`sdtk lora merge --rank`: the merged LoRA is the truncated SVD of the exact weighted sum.

Oracle: numpy's full SVD of the dense sum M = sum_i w_i (alpha_i / r_i) up_i down_i (or the LoHa /
LoKr product, made dense), computed here in float64 independently of sdtk."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import tensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"


def _flat(a):
    return a.reshape(a.shape[0], -1).astype(np.float64)


def _lora_delta(t, name):
    r = t[name + ".lora_down.weight"].shape[0]
    s = float(t[name + ".alpha"]) / r if name + ".alpha" in t else 1.0
    return _flat(t[name + ".lora_up.weight"]) @ _flat(t[name + ".lora_down.weight"]) * s


def _loha_delta(t, name):
    r = t[name + ".hada_w1_b"].shape[0]
    s = float(t[name + ".alpha"]) / r
    return (_flat(t[name + ".hada_w1_a"]) @ _flat(t[name + ".hada_w1_b"])) * (_flat(t[name + ".hada_w2_a"]) @ _flat(t[name + ".hada_w2_b"])) * s


def _truncated(m, k):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], s


def _check_module(got, name, want_dense, k):
    """The merged module (alpha = rank, scale 1) equals the rank-k truncated SVD of the exact sum."""
    assert got[name + ".lora_down.weight"].shape[0] == k and float(got[name + ".alpha"]) == k
    mine = _lora_delta(got, name)
    best, s = _truncated(want_dense, k)
    mine_s = np.linalg.svd(mine, compute_uv=False)[:k]
    np.testing.assert_allclose(mine_s, s[:k], rtol=2e-6, atol=2e-7 * s[0])
    np.testing.assert_allclose(mine, best, rtol=0, atol=2e-6 * s[0])
    return s


def test_merge_at_rank_is_the_truncated_svd_of_the_sum(tmp, cli):
    rng = np.random.default_rng(11)
    a = {**lora_family(Q, "lora", (40, 32), rng, rank=4, alpha=2.0), **lora_family(CONV, "lora", (16, 8, 3, 3), rng, rank=3, alpha=1.0)}
    b = {**lora_family(Q, "lora", (40, 32), rng, rank=6, alpha=6.0), **lora_family(CONV, "lora", (16, 8, 3, 3), rng, rank=2, alpha=None)}
    pa, pb = write_tensors(tmp / "a.safetensors", a), write_tensors(tmp / "b.safetensors", b)
    out = tmp / "m.safetensors"
    r = cli("lora", "merge", f"{pa}:0.8", f"{pb}:-0.5", "--rank", "3", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = {m["module"]: m for m in json.loads(r.stdout)["per_module"]}
    got = tensors(out)
    assert got[CONV + ".lora_down.weight"].shape == (3, 8, 3, 3) and got[CONV + ".lora_up.weight"].shape == (16, 3, 1, 1)
    for name in (Q, CONV):
        exact = 0.8 * _lora_delta(a, name) - 0.5 * _lora_delta(b, name)
        s = _check_module(got, name, exact, 3)
        want_err = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2))
        assert rep[name]["stacked_rank"] == (10 if name == Q else 5) and not rep[name]["dense"]
        assert abs(rep[name]["error_fro"] - want_err) < 1e-6 and want_err > 0.05
    # kohya's svd_merge_lora is linear in the ratios: doubling a weight doubles its term (no ratio^2)
    r = cli("lora", "merge", f"{pa}:1.6", f"{pb}:-1.0", "--rank", "3", "-o", tmp / "m2.safetensors")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(_lora_delta(tensors(tmp / "m2.safetensors"), Q), 2 * _lora_delta(got, Q), rtol=0, atol=1e-5)
    # the human summary reports the truncation error
    r = cli("lora", "merge", f"{pa}:0.8", f"{pb}:-0.5", "--rank", "3", "-o", tmp / "m3.safetensors")
    assert r.returncode == 0 and "truncation error" in r.stdout, r.stdout


def test_merge_at_rank_dynamic_follows_kohyas_index_rule(tmp, cli):
    from sdtk.ops.lora.resize import dynamic_rank

    rng = np.random.default_rng(12)
    a = lora_family(Q, "lora", (40, 32), rng, rank=8, alpha=8.0)
    b = lora_family(Q, "lora", (40, 32), rng, rank=8, alpha=4.0)
    pa, pb = write_tensors(tmp / "a.safetensors", a), write_tensors(tmp / "b.safetensors", b)
    exact = 1.0 * _lora_delta(a, Q) + 0.3 * _lora_delta(b, Q)
    s = np.linalg.svd(exact, compute_uv=False)[:16]
    want = dynamic_rank(s, "sv_fro", 0.8, 12)
    assert 1 < want < 12
    out = tmp / "d.safetensors"
    r = cli("lora", "merge", pa, f"{pb}:0.3", "--rank", "12", "--dynamic", "sv_fro:0.8", "-o", out)
    assert r.returncode == 0, r.stderr
    _check_module(tensors(out), Q, exact, want)


def test_merge_at_rank_makes_loha_and_lokr_modules_dense(tmp, cli):
    rng = np.random.default_rng(13)
    a = {**lora_family(Q, "loha", (40, 32), rng, rank=4, alpha=2.0), **lora_family(CONV, "loha", (16, 8, 3, 3), rng, rank=2, alpha=2.0)}
    b = {**lora_family(Q, "lora", (40, 32), rng, rank=4, alpha=4.0), **lora_family(CONV, "lora", (16, 8, 3, 3), rng, rank=2, alpha=2.0)}
    c = lora_family(Q, "lokr", (40, 32), rng, rank=2, alpha=1.0, factors=(4, 4), w2_factorised=True)
    pa, pb, pc = (write_tensors(tmp / f"{n}.safetensors", t) for n, t in (("a", a), ("b", b), ("c", c)))
    out = tmp / "m.safetensors"
    r = cli("lora", "merge", f"{pa}:0.5", pb, f"{pc}:2", "--rank", "5", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = {m["module"]: m for m in json.loads(r.stdout)["per_module"]}
    assert rep[Q]["dense"] and rep[CONV]["dense"]
    w1 = c[Q + ".lokr_w1"].astype(np.float64)
    w2 = c[Q + ".lokr_w2_a"].astype(np.float64) @ c[Q + ".lokr_w2_b"]
    lokr = np.kron(w1, w2) * (1.0 / 2)  # alpha / rank(w2_b)
    got = tensors(out)
    _check_module(got, Q, 0.5 * _loha_delta(a, Q) + _lora_delta(b, Q) + 2 * lokr, 5)
    # the LoHa records no conv kernel; the LoCon beside it does, and the output has it
    assert got[CONV + ".lora_down.weight"].shape == (5, 8, 3, 3)
    _check_module(got, CONV, 0.5 * _loha_delta(a, CONV) + _lora_delta(b, CONV), 5)


@pytest.mark.parametrize("kind,opts,words", [("lora", {"dora": "out"}, "DoRA"), ("ia3", {}, "(IA)^3"), ("oft", {}, "OFT"),
                                              ("boft", {}, "BOFT")])
def test_merge_at_rank_refuses_nonlinear_modules(tmp, cli, kind, opts, words):
    rng = np.random.default_rng(14)
    a = lora_family(Q, kind, (40, 32), rng, **opts)
    b = lora_family(Q, "lora", (40, 32), rng)
    pa, pb = write_tensors(tmp / "a.safetensors", a), write_tensors(tmp / "b.safetensors", b)
    out = tmp / "m.safetensors"
    r = cli("lora", "merge", pa, pb, "--rank", "2", "-o", out)
    assert r.returncode == 2 and words in r.stderr and Q in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = cli("lora", "merge", pb, pb, "--dynamic", "sv_fro:0.9", "-o", out)
    assert r.returncode == 2 and "--rank" in r.stderr and not out.exists()


def test_kohya_ratios_follow_merge_lora_py(tmp, cli):
    """--kohya-ratios: kohya merge_lora.py merge_lora_models (reference §3.1), written out here:
    k_i = sqrt(alpha_i / alpha_1) * w_i; down = sum k_i down_i, up = sum |k_i| up_i, alpha = alpha_1
    (alpha = rank when a file has none). A single input at w = 0.5 therefore acts at 0.25."""
    rng = np.random.default_rng(21)
    a = lora_family(Q, "lora", (8, 6), rng, rank=3, alpha=2.0)
    a.update(lora_family(CONV, "lora", (8, 4, 3, 3), rng, rank=2, alpha=1.0))
    b = lora_family(Q, "lora", (8, 6), rng, rank=3, alpha=None)  # no alpha: kohya takes alpha = rank
    b.update(lora_family(CONV, "lora", (8, 4, 3, 3), rng, rank=2, alpha=4.0))
    pa, pb = write_tensors(tmp / "a.safetensors", a), write_tensors(tmp / "b.safetensors", b)
    out = tmp / "k.safetensors"
    r = cli("lora", "merge", f"{pa}:0.7", f"{pb}:-0.4", "--kohya-ratios", "-o", out)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    for name, alpha_a, alpha_b in ((Q, 2.0, 3.0), (CONV, 1.0, 4.0)):
        ka, kb = np.sqrt(alpha_a / alpha_a) * 0.7, np.sqrt(alpha_b / alpha_a) * -0.4
        down = a[name + ".lora_down.weight"] * ka + b[name + ".lora_down.weight"] * kb
        up = a[name + ".lora_up.weight"] * abs(ka) + b[name + ".lora_up.weight"] * abs(kb)
        assert np.allclose(got[name + ".lora_down.weight"], down, rtol=1e-6, atol=1e-7)
        assert np.allclose(got[name + ".lora_up.weight"], up, rtol=1e-6, atol=1e-7)
        assert float(got[name + ".alpha"]) == alpha_a
    # the quadratic ratio: one input at 0.5 gives 0.25 of its delta
    one = tmp / "one.safetensors"
    assert cli("lora", "merge", f"{pa}:0.5", f"{pa}:0", "--kohya-ratios", "-o", one).returncode == 0
    g = tensors(one)
    want = _flat(a[Q + ".lora_up.weight"]) @ _flat(a[Q + ".lora_down.weight"]) * 0.25
    assert np.allclose(_flat(g[Q + ".lora_up.weight"]) @ _flat(g[Q + ".lora_down.weight"]), want, rtol=1e-6, atol=1e-8)
    c = write_tensors(tmp / "c.safetensors", lora_family(Q, "lora", (8, 6), rng, rank=5))
    bad = tmp / "bad.safetensors"
    r = cli("lora", "merge", pa, c, "--kohya-ratios", "-o", bad)
    assert r.returncode == 2 and not bad.exists() and "equal ranks" in r.stderr
