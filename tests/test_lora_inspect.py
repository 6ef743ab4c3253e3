"""`sdtk inspect LORA`, deeper: adapter types, rank/alpha groups, components and blocks touched,
the base with its evidence and confidence, trigger words, training facts, the hashes A1111 and
Civitai show, and the problems (NaN, alpha, hashes, base conflicts, keys the base lacks).

Fixtures are kohya LoRAs built from the real SDXL / SD1.5 layouts (every attention Linear /
1x1 conv of the UNet, the text encoders' attention and MLP, optional 3x3 resnet convs as LoCon),
named as sd-scripts names them: SGM names for SDXL, diffusers names for SD1 (reference/lora.md §1.2)."""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import helpers_identify as H
from sdtk.architectures.lora_keys import sd_unet_to_diffusers, under
from sdtk.identify import identify_path
from sdtk.report import LANGUAGES, render_identity

UNET = "model.diffusion_model."
ATTN = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))\.weight$|\.proj_(in|out)\.weight$")
CONV = re.compile(r"(in_layers\.2|out_layers\.3)\.weight$")
TE = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
OPENCLIP = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
OPENCLIP_HF = {"attn.out_proj.weight": ["self_attn_out_proj"], "mlp.c_fc.weight": ["mlp_fc1"], "mlp.c_proj.weight": ["mlp_fc2"],
               "attn.in_proj_weight": ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"]}


def kohya_modules(layout_name: str, conv: bool = False):
    """[(kohya module name, out, in, kernel)] for a real layout, as sd-scripts names them."""
    lay = H.layout(layout_name)
    shapes = {k: s for k, s, _ in lay.tensors}
    sdxl = layout_name.startswith("sdxl")
    rename = {} if sdxl else sd_unet_to_diffusers(k[len(UNET):-len(".weight")] for k in shapes if k.startswith(UNET))
    out = []
    for key, shape in shapes.items():
        if key.startswith(UNET) and (ATTN.search(key) or (conv and CONV.search(key))):
            module = key[len(UNET):-len(".weight")]
            module = module if sdxl else rename.get(module)
            if module:
                out.append(("lora_unet_" + under(module), shape[0], shape[1], tuple(shape[2:])))
        elif TE.search(key):  # CLIP-L in HF layout (SD1 cond_stage_model.transformer, SDXL embedders.0)
            inner = key.split("transformer.", 1)[1][:-len(".weight")]
            out.append((("lora_te1_" if sdxl else "lora_te_") + under(inner), shape[0], shape[1], ()))
        elif sdxl and key.startswith("conditioner.embedders.1.model.") and OPENCLIP.search(key):
            hit = OPENCLIP.search(key)
            rows = shape[0] // len(OPENCLIP_HF[hit.group(2)])
            for name in OPENCLIP_HF[hit.group(2)]:
                out.append((f"lora_te2_text_model_encoder_layers_{hit.group(1)}_{name}", rows, shape[1], ()))
    return out


def write_kohya_lora(path: Path, layout_name: str, rank: int = 32, alpha: float = 16.0, conv_rank: int = 8, conv_alpha: float = 4.0,
                     metadata=None, extra_rows=(), values=None, alpha_missing: bool = False) -> Path:
    rows, alphas = [], {}
    for name, out, inp, k in kohya_modules(layout_name, conv=conv_rank > 0):
        r, a = (conv_rank, conv_alpha) if k and k[0] > 1 else (rank, alpha)
        rows += [(f"{name}.lora_down.weight", (r, inp) + k, "float16"), (f"{name}.lora_up.weight", (out, r) + (1,) * len(k), "float16")]
        if not alpha_missing:
            rows.append((f"{name}.alpha", (), "float16"))
            alphas[f"{name}.alpha"] = np.array(a, dtype=np.float16)
    rows += list(extra_rows)
    return H.write_sparse_with_values(path, rows, {**alphas, **(values or {})}, metadata)


SS_META = {
    "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16.0",
    "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}), "ss_steps": "2400", "ss_epoch": "8", "ss_num_epochs": "8",
    "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "5e-05", "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
    "ss_lr_scheduler": "cosine", "ss_resolution": "(1024, 1024)", "ss_clip_skip": "None", "ss_num_train_images": "300",
    "ss_total_batch_size": "2", "ss_mixed_precision": "bf16", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_dataset_dirs": json.dumps({"10_ohwx woman": {"n_repeats": 10, "img_count": 30}}),
    "ss_tag_frequency": json.dumps({"10_ohwx woman": {"ohwx woman": 30, "1girl": 22, "smile": 9}}),
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
}


def data_hash(path: Path) -> str:
    """sha256 after the safetensors header: A1111's hashes-addnet, kohya's sshs_model_hash."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    return write_kohya_lora(tmp_path_factory.mktemp("lora") / "ohwx_sdxl.safetensors", "sdxl-base", metadata=SS_META)


def test_sdxl_locon_types_ranks_blocks_base_triggers_training(sdxl_lora):
    ident = identify_path(sdxl_lora)
    a = ident.adapter
    linear = [m for m in kohya_modules("sdxl-base", conv=True) if not m[3] or m[3][0] == 1]
    convs = [m for m in kohya_modules("sdxl-base", conv=True) if m[3] and m[3][0] > 1]
    assert ident.architecture == "stable-diffusion-xl-v1-base/lora" and not ident.has_problems, [p.code for p in ident.problems]
    assert a["types"] == {"LoRA": len(linear), "LoCon": len(convs)}
    assert a["rank_groups"] == [{"type": "lora", "conv": False, "rank": 32, "alpha": 16.0, "modules": len(linear)},
                                {"type": "locon", "conv": True, "rank": 8, "alpha": 4.0, "modules": len(convs)}]
    assert set(a["components_touched"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert a["blocks"]["text_encoder"] == {"layers": list(range(12))} and a["blocks"]["text_encoder_2"] == {"layers": list(range(32))}
    assert a["blocks"]["unet"]["input_blocks"][:2] == [1, 2] and "middle_block" in a["blocks"]["unet"]
    assert a["base"]["architecture"] == "stable-diffusion-xl-v1-base" and a["base"]["confidence"] == "high"
    assert [e["source"] for e in a["base"]["evidence"]][:3] == ["shapes", "modelspec", "kohya"]
    assert a["claimed_base_fit"] == {"layout": "sdxl-base", "matched": len(linear) + len(convs), "modules": len(linear) + len(convs),
                                     "unmatched": 0, "examples": []}
    assert [t["word"] for t in a["trigger_words"]] == ["ohwx woman", "1girl", "smile"]
    assert a["trigger_words"][0]["source"] == "ss_dataset_dirs" and a["trigger_words"][1]["count"] == 22
    f = a["training_facts"]
    assert f["steps"] == "2400" and f["optimizer"].endswith("AdamW8bit") and f["network_args"] == {"conv_dim": "8", "conv_alpha": "4"}
    assert f["train_images"] == "300" and f["dataset_images"] == 30 and "clip_skip" not in f  # "None" is absent


def test_hashes_are_what_a1111_and_civitai_compute(sdxl_lora):
    a = identify_path(sdxl_lora).adapter
    whole = hashlib.sha256(sdxl_lora.read_bytes()).hexdigest()
    assert a["hashes"]["sha256"] == whole and a["hashes"]["autov2"] == whole[:10]
    assert a["hashes"]["addnet"] == data_hash(sdxl_lora)
    assert a["hashes"]["autov3"] == data_hash(sdxl_lora)[:12] == a["hashes"]["a1111_short"]


def test_text_report_in_every_language(sdxl_lora, cli):
    n_linear = sum(1 for m in kohya_modules("sdxl-base", conv=True) if not m[3] or m[3][0] == 1)
    n_conv = sum(1 for m in kohya_modules("sdxl-base", conv=True) if m[3] and m[3][0] > 1)
    r = cli("inspect", sdxl_lora, env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert f"rank 32 (alpha 16) on {n_linear} modules; conv rank 8 (alpha 4) on {n_conv}" in out
    assert "made for Stable Diffusion XL 1.0, confidence high" in out and "trigger words: ohwx woman (folder name), 1girl (tag, 22)" in out
    assert "2400 steps" in out and "optimizer bitsandbytes.optim.adamw.AdamW8bit" in out and "dim 32" in out
    assert f"AutoV3 {data_hash(sdxl_lora)[:12].upper()}" in out
    from rich.console import Console

    ident = identify_path(sdxl_lora)
    for lang in LANGUAGES:
        console = Console(record=True, width=200)
        console.print(render_identity(ident, lang, verbose=True))
        text = console.export_text()
        assert "{" not in text and "lora.rank" not in text and "train." not in text, lang
        assert f"{n_linear}" in text and "2400" in text and "ohwx woman" in text


def test_json_carries_the_facts(sdxl_lora, cli):
    r = cli("inspect", "--json", sdxl_lora)
    entry = json.loads(r.stdout)["files"][0]
    assert entry["adapter"]["rank_groups"][0]["rank"] == 32 and entry["adapter"]["hashes"]["addnet"] == data_hash(sdxl_lora)
    assert entry["adapter"]["base"]["confidence"] == "high"


def test_sd1_lora_from_diffusers_names(tmp):
    path = write_kohya_lora(tmp / "sd1.safetensors", "sd15-emaonly", rank=16, alpha=8, conv_rank=0,
                            metadata={"ss_base_model_version": "sd_v1"})
    a = identify_path(path).adapter
    assert a["base"]["architecture"] == "stable-diffusion-v1" and a["base"]["confidence"] == "high"
    assert set(a["blocks"]["unet"]) == {"down_blocks", "mid_block", "up_blocks"} and a["blocks"]["unet"]["up_blocks"] == [1, 2, 3]
    assert a["claimed_base_fit"]["unmatched"] == 0 and a["rank_groups"][0]["rank"] == 16


def test_problems_nan_alpha_hash_base_and_unknown_modules(tmp, cli):
    mods = kohya_modules("sdxl-base")
    bad = f"{mods[0][0]}.lora_up.weight"
    nan = np.zeros((mods[0][1], 32), dtype=np.float16)
    nan[3, 1] = np.nan
    extra = [("lora_unet_input_blocks_99_1_transformer_blocks_0_attn1_to_q.lora_down.weight", (32, 640), "float16"),
             ("lora_unet_input_blocks_99_1_transformer_blocks_0_attn1_to_q.lora_up.weight", (640, 32), "float16")]
    meta = {"ss_base_model_version": "sd_v1", "sshs_model_hash": hashlib.sha256(b"").hexdigest()}
    path = write_kohya_lora(tmp / "bad.safetensors", "sdxl-base", conv_rank=0, metadata=meta, extra_rows=extra, values={bad: nan},
                            alpha_missing=True)
    ident = identify_path(path)
    codes = {p.code: p for p in ident.problems}
    assert codes["non_finite_values"].details["examples"] == [bad]
    assert codes["lora_alpha_missing"].details["count"] == len(mods) + 1
    assert codes["adapter_hash_mismatch"].details["empty"] is True
    assert codes["lora_base_conflict"].details["claimed"] == "stable-diffusion-v1"
    assert ident.adapter["base_architecture"] == "stable-diffusion-xl-v1-base"  # the shapes win
    assert codes["lora_unmatched_in_base"].details["unmatched"] == 1
    r = cli("inspect", path, env={"COLUMNS": "250"})
    out = " ".join(r.stdout.split())
    assert r.returncode == 1
    assert "have no alpha" in out and "says Stable Diffusion 1.x, but the tensors are for Stable Diffusion XL 1.0" in out
    assert "1 of" in out and "match nothing in Stable Diffusion XL 1.0" in out and "sshs_model_hash in the metadata is e3b0c44298fc" in out


def test_lycoris_types_and_peft_flux(tmp):
    rows = H.kohya_lora("sdxl", rank=8, algo="loha") + H.kohya_lora("sdxl", rank=4, algo="lokr")[:0]
    ident = identify_path(H.write_sparse_with_values(tmp / "loha.safetensors", rows, H.lora_alphas(rows, 4.0)))
    assert ident.adapter["types"] == {"LoHa": 6} and ident.adapter["rank_groups"][0] == {"type": "loha", "conv": False, "rank": 8,
                                                                                        "alpha": 4.0, "modules": 6}
    flux = identify_path(H.write_sparse(tmp / "flux.safetensors", H.peft_flux_lora(16)))
    a = flux.adapter
    assert a["base"]["architecture"] == "flux-1-dev" and a["blocks"]["unet"] == {"single_transformer_blocks": [0, 1, 2]}
    assert a["claimed_base_fit"]["unmatched"] == 0 and a["claimed_base_fit"]["matched"] == 6


def test_ss_datasets_class_tokens_are_triggers():
    from sdtk.identify.lora_facts import trigger_words

    meta = {"modelspec.trigger_phrase": "sks dog, best quality",
            "ss_datasets": json.dumps([{"subsets": [{"class_tokens": "sks dog", "img_count": 12}],
                                        "tag_frequency": {"img": {"dog": 12, "grass": 3}}}])}
    words = trigger_words(meta)
    assert [(w["word"], w["source"]) for w in words] == [("sks dog", "modelspec.trigger_phrase"), ("best quality", "modelspec.trigger_phrase"),
                                                        ("dog", "ss_tag_frequency"), ("grass", "ss_tag_frequency")]


def test_folder_listing_reads_headers_only_and_alphas_once(tmp, cli, monkeypatch):
    folder = tmp / "loras"
    folder.mkdir()
    rows = H.kohya_lora("sdxl", 8)
    H.write_valued(folder / "a.safetensors", rows, values=H.lora_alphas(rows, 4.0))
    entry = json.loads(cli("inspect", "--json", folder).stdout)["files"][0]
    assert entry["kind"] == "lora" and "hashes" not in entry["adapter"]  # a listing: no file read
    single = json.loads(cli("inspect", "--json", folder / "a.safetensors").stdout)["files"][0]
    assert single["adapter"]["hashes"]["addnet"] == data_hash(folder / "a.safetensors")
    from sdtk.formats import open_model
    from sdtk.identify import identify

    reads = []
    with open_model(folder / "a.safetensors") as cat:
        for t in list(cat.tensors.values()):
            if t.numel == 1:
                t.loader = (lambda f, n: (lambda: (reads.append(n), f())[1]))(t.loader, t.name)
        identify(cat)
    assert sorted(reads) == sorted(k for k, _, _ in rows if k.endswith(".alpha"))  # each alpha read once


def test_alpha_zero_says_what_each_program_does_and_is_no_problem_for_oft(tmp, cli):
    """alpha 0: kohya (and sdtk's bake) use scale 1, ComfyUI 0 (reference/lora.md §2.1): the
    problem says both. For OFT/BOFT alpha is the rotation constraint, 0 = none (LyCORIS): no problem."""
    from helpers_lora import lora_family, write_tensors

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = lora_family(name, "lora", (320, 320), np.random.default_rng(1), alpha=0.0)
    path = write_tensors(tmp / "zero.safetensors", lora)
    codes = {p.code: p for p in identify_path(path).problems}
    assert codes["lora_alpha_zero"].details["examples"] == [name]
    out = " ".join(cli("inspect", path, env={"COLUMNS": "250"}).stdout.split())
    assert "alpha 0" in out and "scale 1" in out and "ComfyUI applies nothing" in out
    for kind in ("oft", "boft"):
        oft = write_tensors(tmp / f"{kind}.safetensors", lora_family(name, kind, (320, 320), np.random.default_rng(2), alpha=0.0))
        assert "lora_alpha_zero" not in {p.code for p in identify_path(oft).problems}, kind


def test_diffusers_named_joint_blocks_are_told_apart_by_width(tmp):
    """transformer.transformer_blocks.N.attn.* is both FLUX's and SD3's diffusers naming: the
    hidden width decides (FLUX.1 3072, SD3 / SD3.5 medium 1536, SD3.5 large 2432); a second
    attention (attn2) is SD3.5 medium's MMDiT-X."""
    from helpers_lora import lora_family, write_tensors

    rng = np.random.default_rng(3)
    for width, extra, want in ((1536, False, "stable-diffusion-v3-medium"), (1536, True, "stable-diffusion-v3.5-medium"),
                               (2432, False, "stable-diffusion-v3.5-large"), (3072, False, "flux-1-dev")):
        lora = {}
        for n in range(2):
            for m in ("attn.to_q", "attn.add_k_proj") + (("attn2.to_q",) if extra else ()):
                lora.update(lora_family(f"transformer.transformer_blocks.{n}.{m}", "lora", (width, width), rng, rank=2, alpha=None))
        ident = identify_path(write_tensors(tmp / f"dit-{width}-{extra}.safetensors", lora))
        assert ident.adapter["base_architecture"] == want, (width, extra, ident.adapter["base"])
        assert ident.adapter["base_confidence"] == "high"
