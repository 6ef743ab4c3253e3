"""Textual-inversion embeddings and hypernetworks: inspect (every layout A1111 and ComfyUI load,
read through sdtk's restricted pickle reader), fit with a base, `sdtk embedding convert` and
`sdtk embedding merge`; hostile pickles refused. Files are written the way their tools write them:
A1111's `Embedding.save` dict and hypernetwork state dict through torch.save (torch is the
test oracle), diffusers' learned_embeds.bin, kohya's emb_params and SDXL clip_l/clip_g."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import helpers_identify as H
from conftest import torch_or_skip
from sdtk.identify import identify_path
from sdtk.report import LANGUAGES, render_identity

EVIL_PICKLE = b"cos\nsystem\n(S'echo pwned > /tmp/sdtk-pwned'\ntR."


def a1111_embedding(torch, path: Path, vectors: int = 4, width: int = 768, terms=("*",), seed: int = 0) -> Path:
    """A1111 textual_inversion.py Embedding.save: string_to_token, string_to_param (a ParameterDict
    as older versions pickled it), name, step, sd_checkpoint, sd_checkpoint_name."""
    g = torch.Generator().manual_seed(seed)
    params = torch.nn.ParameterDict({t: torch.nn.Parameter(torch.randn(vectors, width, generator=g)) for t in terms})
    torch.save({"string_to_token": {t: 265 for t in terms}, "string_to_param": params, "name": path.stem, "step": 3000,
                "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


def hypernetwork(torch, path: Path, widths=(320, 640, 768, 1280)) -> Path:
    """A1111 hypernetwork.py Hypernetwork.save: {width: (module_k, module_v) state dicts} plus options;
    layer_structure [1, 2, 1], relu, layer norm (Linear, ReLU, LayerNorm, Linear, LayerNorm)."""
    def module(dim):
        m = torch.nn.Module()
        m.linear = torch.nn.Sequential(torch.nn.Linear(dim, dim * 2), torch.nn.ReLU(), torch.nn.LayerNorm(dim * 2),
                                       torch.nn.Linear(dim * 2, dim), torch.nn.LayerNorm(dim))
        return m.state_dict()

    sd = {w: (module(w), module(w)) for w in widths}
    sd.update({"step": 5000, "name": path.stem, "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
               "weight_initialization": "Normal", "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly",
               "activate_output": False, "use_dropout": False, "dropout_structure": [0, 0, 0], "last_layer_dropout": False,
               "optional_info": None})
    torch.save(sd, path)
    return path


def sdxl_embedding(path: Path, vectors: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return H.write_valued(path, [("clip_g", (vectors, 1280), "float32"), ("clip_l", (vectors, 768), "float32")],
                          values={"clip_g": rng.standard_normal((vectors, 1280)).astype(np.float32),
                                  "clip_l": rng.standard_normal((vectors, 768)).astype(np.float32)})


def test_a1111_pt_embedding_is_read_safely_and_described(tmp, cli):
    torch = torch_or_skip()
    path = a1111_embedding(torch, tmp / "ohwx-style.pt")
    ident = identify_path(path)
    a = ident.adapter
    assert ident.architecture == "stable-diffusion-v1/textual-inversion" and ident.safety["verdict"] == "read-safely"
    assert a["vectors"] == 4 and a["token"] == "*" and a["token_id"] == 265 and a["step"] == 3000
    assert a["encoders"] == [{"tensor": "string_to_param.*", "encoder": "CLIP-L", "width": 768, "vectors": 4}]
    import hashlib

    whole = hashlib.sha256(path.read_bytes()).hexdigest()
    assert a["hashes"]["autov2"] == whole[:10] and a["hashes"]["a1111_short"] == whole[:12]  # A1111 Embedding.shorthash
    r = cli("inspect", path, env={"COLUMNS": "200"})
    out = " ".join(r.stdout.split())
    assert "4 vectors per token for CLIP-L 768" in out and "name ohwx-style, step 3000, trained on v1-5-pruned-emaonly [cc6cb27103]" in out


def test_convert_pt_to_safetensors_bit_for_bit(tmp, cli):
    torch = torch_or_skip()
    from safetensors.numpy import load_file, safe_open

    src = a1111_embedding(torch, tmp / "style.pt", vectors=3)
    want = torch.load(src, weights_only=False)["string_to_param"]["*"].detach().numpy()
    dest = tmp / "style.safetensors"
    r = cli("embedding", "convert", src, "-o", dest)
    assert r.returncode == 0, r.stderr
    got = load_file(str(dest))
    assert list(got) == ["emb_params"] and got["emb_params"].tobytes() == want.tobytes()
    with safe_open(str(dest), "np") as f:
        meta = f.metadata()
    assert meta["name"] == "style" and meta["step"] == "3000" and meta["token"] == "*" and "sdtk.lineage" in meta
    again = identify_path(dest)
    assert again.architecture == "stable-diffusion-v1/textual-inversion" and again.adapter["format"] == "kohya"
    r = cli("embedding", "convert", src, "-o", dest)  # exists: refused, kept
    assert r.returncode == 2 and load_file(str(dest))["emb_params"].tobytes() == want.tobytes()


def test_diffusers_learned_embeds_bin(tmp, cli):
    torch = torch_or_skip()
    src = tmp / "learned_embeds.bin"
    vec = torch.randn(768, generator=torch.Generator().manual_seed(5))
    torch.save({"<cat-toy>": vec}, src)
    ident = identify_path(src)
    assert ident.kind == "embedding" and ident.adapter["token"] == "<cat-toy>" and ident.adapter["vectors"] == 1
    r = cli("embedding", "convert", src, "-o", tmp / "cat.safetensors", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["vectors"] == 1
    from safetensors.numpy import load_file

    assert load_file(str(tmp / "cat.safetensors"))["emb_params"].reshape(-1).tobytes() == vec.numpy().tobytes()


def test_merge_concatenates_or_averages_sdxl_pairs(tmp, cli):
    from safetensors.numpy import load_file

    a, b = sdxl_embedding(tmp / "a.safetensors", 2, seed=1), sdxl_embedding(tmp / "b.safetensors", 2, seed=2)
    va, vb = load_file(str(a)), load_file(str(b))
    r = cli("embedding", "merge", a, b, "-o", tmp / "ab.safetensors")
    assert r.returncode == 0, r.stderr
    ab = load_file(str(tmp / "ab.safetensors"))
    for key in ("clip_l", "clip_g"):
        assert np.array_equal(ab[key], np.concatenate([va[key], vb[key]]))
    r = cli("embedding", "merge", a, b, "-o", tmp / "avg.safetensors", "--average", "--json")
    assert json.loads(r.stdout)["vectors"] == 2
    avg = load_file(str(tmp / "avg.safetensors"))
    assert np.array_equal(avg["clip_g"], ((va["clip_g"] + vb["clip_g"]) / np.float32(2)).astype(np.float32))
    ident = identify_path(tmp / "ab.safetensors")
    assert ident.architecture == "stable-diffusion-xl-v1-base/textual-inversion" and ident.adapter["vectors"] == 4


def test_merge_refuses_other_text_encoders_and_writes_nothing(tmp, cli):
    sd1 = H.write_valued(tmp / "sd1.safetensors", [("emb_params", (2, 768), "float32")])
    sd2 = H.write_valued(tmp / "sd2.safetensors", [("emb_params", (2, 1024), "float32")])
    r = cli("embedding", "merge", sd1, sd2, "-o", tmp / "x.safetensors")
    assert r.returncode == 2 and "sd2.safetensors" in r.stderr and "other text encoders" in r.stderr
    assert not (tmp / "x.safetensors").exists() and len(r.stderr.strip().splitlines()) == 1
    r = cli("embedding", "merge", sd1, H.write_valued(tmp / "three.safetensors", [("emb_params", (3, 768), "float32")]),
            "--average", "-o", tmp / "x.safetensors")
    assert r.returncode == 2 and not (tmp / "x.safetensors").exists()


def test_hostile_pt_is_refused(tmp, cli):
    evil = tmp / "evil.pt"
    evil.write_bytes(EVIL_PICKLE)
    r = cli("embedding", "convert", evil, "-o", tmp / "out.safetensors")
    assert r.returncode == 2 and not (tmp / "out.safetensors").exists() and not Path("/tmp/sdtk-pwned").exists()
    assert cli("inspect", evil).returncode == 2


def test_multiple_terms_and_bad_pairs_are_problems(tmp, cli):
    torch = torch_or_skip()
    multi = a1111_embedding(torch, tmp / "multi.pt", terms=("a", "b"))
    ident = identify_path(multi)
    assert ident.problem("embedding_multiple_terms").details["tokens"] == ["a", "b"]
    r = cli("embedding", "convert", multi, "-o", tmp / "m.safetensors")
    assert r.returncode == 2 and "2 terms" in r.stderr
    pair = H.write_valued(tmp / "pair.safetensors", [("clip_l", (2, 768), "float32"), ("clip_g", (3, 1280), "float32")])
    assert identify_path(pair).problem("embedding_pair_mismatch").details == {"l": 2, "g": 3}
    nan = H.write_valued(tmp / "nan.safetensors", [("emb_params", (2, 768), "float32")],
                         values={"emb_params": np.full((2, 768), np.nan, dtype=np.float32)})
    assert identify_path(nan).problem("non_finite_values") is not None


def test_fit_with_a_base(tmp, cli):
    torch = torch_or_skip()
    emb = a1111_embedding(torch, tmp / "e.pt")
    sd15 = H.write_sparse(tmp / "sd15.safetensors", H.layout("sd15-emaonly"))
    sdxl = H.write_sparse(tmp / "sdxl.safetensors", H.layout("sdxl-base"))
    r = cli("inspect", emb, "--base", sd15, "--json")
    assert json.loads(r.stdout)["files"][0]["base_fit"]["fits"] is True
    r = cli("inspect", emb, "--base", sdxl, env={"COLUMNS": "200"})
    assert "does not fit: an SD1 embedding (768): SDXL needs a clip_l + clip_g pair" in " ".join(r.stdout.split())
    r = cli("inspect", sdxl_embedding(tmp / "xl.safetensors"), "--base", sdxl, "--json")
    assert json.loads(r.stdout)["files"][0]["base_fit"] == {"base": str(sdxl), "base_architecture": "stable-diffusion-xl-v1-base",
                                                            "fits": True, "reason": None}


def test_hypernetwork_structure(tmp, cli):
    torch = torch_or_skip()
    path = hypernetwork(torch, tmp / "anime.pt", widths=(320, 640, 1024, 1280))
    ident = identify_path(path)
    a = ident.adapter
    assert ident.architecture == "stable-diffusion-v2/hypernetwork" and ident.safety["verdict"] == "read-safely"
    assert a["layer_sizes"]["1024"] == [1024, 2048, 1024] and a["activation_func"] == "relu" and a["is_layer_norm"] is True
    assert a["step"] == 5000 and a["layer_structure"] == [1, 2, 1]
    assert len(a["hashes"]["a1111_short"]) == 10  # A1111 Hypernetwork.shorthash: sha256[:10]
    r = cli("inspect", path, env={"COLUMNS": "200"})
    out = " ".join(r.stdout.split())
    assert "1024: 1024 -> 2048 -> 1024" in out and "activation relu, layer norm yes, dropout no" in out


def test_every_language_renders_embeddings_and_hypernetworks(tmp):
    torch = torch_or_skip()
    from rich.console import Console

    files = [a1111_embedding(torch, tmp / "e.pt"), hypernetwork(torch, tmp / "h.pt", widths=(768,)), sdxl_embedding(tmp / "x.safetensors"),
             a1111_embedding(torch, tmp / "multi.pt", terms=("a", "b"), vectors=80)]
    for path in files:
        ident = identify_path(path)
        for lang in LANGUAGES:
            console = Console(record=True, width=200)
            console.print(render_identity(ident, lang, verbose=True))
            text = console.export_text()
            assert "{" not in text and "embedding." not in text and "problem." not in text, (path, lang, text)
