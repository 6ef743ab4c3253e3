"""LoRA Block Weight in `sdtk lora apply` (`LORA:S:lbw=...`): the parser, the block of every base
weight against kohya's published rule (sd-scripts networks/svd_merge_lora.py get_lbw_block_index,
restated here as the oracle on kohya's own module names), and baked values per block."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers_lora import lora_family, write_tensors
from helpers_merge import make_model, metadata, tensors
from sdtk.architectures.lora_keys import build_alias_table
from sdtk.errors import UsageError
from sdtk.formats import open_model
from sdtk.adapters.block_weights import BLOCK_IDS, block_of, parse_block_weights, unet_layout

# kohya's rule, restated: 0 = BASE (text encoder), 1..12 IN00..IN11, 13 MID, 14..25 OUT00..OUT11, -1 none
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def kohya_block_index(name: str, is_sdxl: bool) -> int:
    if "text_model_encoder_" in name:
        return 0
    if not is_sdxl:
        m = _UPDOWN.search(name)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            if side == "down":
                idx = 3 * i + j + 1 if kind in ("resnets", "attentions") else 3 * (i + 1)
                return 1 + idx
            idx = 3 * i + j if kind in ("resnets", "attentions") else 3 * i + 2
            return 1 + 12 + 1 + idx
        return 13 if "mid_block_" in name else -1
    bare = name[len("lora_unet_"):] if name.startswith("lora_unet_") else ""
    if bare.startswith(("time_embed_", "label_emb_")):
        return 1
    if bare.startswith("input_blocks_"):
        return 1 + int(bare.split("_")[2])
    if bare.startswith("middle_block_"):
        return 13
    if bare.startswith("output_blocks_"):
        return 14 + int(bare.split("_")[2])
    return 23 if bare.startswith("out_") else -1


@pytest.mark.parametrize("layout,is_sdxl,prefix", [("sd15-emaonly", False, "lora_unet_"), ("sdxl-base", True, "lora_unet_"),
                                                     ("sd15-emaonly", False, "lora_te_text_model_encoder_")])
def test_every_module_is_in_kohyas_block(tmp, layout, is_sdxl, prefix):
    path = make_model(tmp, "m", layout, scale=16)
    with open_model(path) as cat:
        shapes = {k: t.shape for k, t in cat.tensors.items()}
    table = build_alias_table(shapes)
    lay = unet_layout(shapes)
    assert lay == ("sdxl" if is_sdxl else "sd1")
    names = [n for n in table.names if n.startswith(prefix)]
    # kohya names SD1 modules in the diffusers layout and SDXL ones in the SGM layout (reference/lora.md)
    sgm = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
    if prefix == "lora_unet_":
        names = [n for n in names if bool(sgm.match(n)) == is_sdxl]
    assert len(names) > 50
    differ = set()
    for name in names:
        target = table.names[name]
        want = kohya_block_index(name, is_sdxl)
        got = block_of(target.component, target.weight)
        if got != (BLOCK_IDS[want] if want >= 0 else None):
            differ.add((name.rsplit("_", 1)[0] if "blocks" not in name else name, got, BLOCK_IDS[want] if want >= 0 else None))
    # the stated differences only (block_weights.py): weights outside the LDM blocks, and SD1's conv_in
    allowed = ({("lora_unet_time_embed_0", None, "IN00"), ("lora_unet_time_embed", None, "IN00"),
                ("lora_unet_label_emb_0_0", None, "IN00"), ("lora_unet_label_emb_0", None, "IN00"),
                ("lora_unet_out", None, "OUT09"), ("lora_unet_out_0", None, "OUT09")} if is_sdxl
               else {("lora_unet_conv", "IN00", None), ("lora_unet_conv_in", "IN00", None)})
    assert differ <= allowed, differ - allowed


def test_parser_lists_and_names():
    sd1 = parse_block_weights(",".join(["1", "0"] + ["1"] * 15))  # 17 values: BASE, IN01, IN02, ...
    assert sd1.family == "sd1" and sd1.factor("IN01") == 0 and sd1.factor("IN00") == 1 and sd1.factor("BASE") == 1
    xl = parse_block_weights(",".join(["0.5"] + ["1"] * 4 + ["0"] + ["1"] * 6))  # 12: BASE, IN04, IN05, IN07, IN08, MID, OUT00..05
    assert xl.family == "sdxl" and xl.factor("BASE") == 0.5 and xl.factor("MID") == 0 and xl.factor("OUT06") == 1
    every = parse_block_weights(",".join(str(i) for i in range(26)))
    assert [every.factor(b) for b in BLOCK_IDS] == list(range(26))
    named = parse_block_weights("in04=0.5, MID=0")
    assert named.family is None and named.factor("IN04") == 0.5 and named.factor("MID") == 0 and named.factor("OUT00") == 1
    # the A1111 extension's preset names, case-insensitive: the same factors as their lists
    outs = parse_block_weights("outs")
    assert outs.factors == parse_block_weights("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1").factors and outs.family == "sd1"
    assert outs.factor("IN01") == 0 and outs.factor("OUT08") == 1 and outs.text == "OUTS"
    for bad, said in [("OUTSS", "or a preset name (NONE, ALL"), ("1,1,1", "3 values"), ("1,x" + ",1" * 15, "'x' is not a number"), ("IN99=1", "unknown block"),
                      ("IN01=1,0.5", "not both"), ("nan" + ",1" * 16, "not a finite number"), ("", "empty")]:
        with pytest.raises(UsageError, match=re.escape(said)):
            parse_block_weights(bad)


def _sd15_lora(tmp, base):
    rng = np.random.default_rng(7)
    modules = {  # kohya name -> checkpoint weight: IN01, MID, OUT03 and the text encoder
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_mid_block_attentions_0_proj_in": "model.diffusion_model.middle_block.1.proj_in.weight",
        "lora_unet_up_blocks_1_attentions_0_proj_out": "model.diffusion_model.output_blocks.3.1.proj_out.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    }
    lora = {}
    for name, key in modules.items():
        lora.update(lora_family(name, "lora", base[key].shape, rng))
    return write_tensors(tmp / "l.safetensors", lora), lora, modules


def _delta(lora, name):  # up @ down * alpha / rank (alpha 2, rank 4)
    up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:]) * 0.5


def test_apply_scales_each_block_and_records_it(tmp, cli):
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=8, dtype="float16")
    base = tensors(base_path)
    lora_path, lora, modules = _sd15_lora(tmp, base)
    # 17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    weights = ["0", "0", "1", "1", "1", "1", "1", "0.5", "2"] + ["1"] * 8
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:0.8:lbw={','.join(weights)}", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "block weights: BASE x0, IN01 x0, MID x0.5, OUT03 x2" in r.stdout
    got = tensors(out)
    factors = {"input_blocks.1.": 0.0, "middle_block.": 0.5, "output_blocks.3.": 2.0, "cond_stage_model.": 0.0}
    for name, key in modules.items():
        f = next(v for part, v in factors.items() if part in key)
        want = (base[key].astype(np.float32) + np.float32(0.8 * f) * _delta(lora, name)).astype(np.float16)
        assert np.abs(got[key].astype(np.float32) - want.astype(np.float32)).max() <= np.abs(np.spacing(want)).max()
        if f == 0:
            assert got[key].tobytes() == base[key].tobytes()  # a zero factor leaves the weight as it was
    step = json.loads(metadata(out)["sdtk.lineage"])[-1]
    assert step["loras"][0]["block_weights"] == {"BASE": 0.0, "IN01": 0.0, "MID": 0.5, "OUT03": 2.0}
    assert step["operations"][0].endswith("lbw BASE=0,IN01=0,MID=0.5,OUT03=2")
    # a preset name on the command line, as in an A1111 prompt: the bytes of its list
    by_name, by_list = tmp / "by_name.safetensors", tmp / "by_list.safetensors"
    assert cli("lora", "apply", base_path, f"{lora_path}:0.8:lbw=INALL", "-o", by_name).returncode == 0
    assert cli("lora", "apply", base_path, f"{lora_path}:0.8:lbw=1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "-o", by_list).returncode == 0
    a, b = tensors(by_name), tensors(by_list)
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in b)
    assert a[modules["lora_unet_mid_block_attentions_0_proj_in"]].tobytes() == base["model.diffusion_model.middle_block.1.proj_in.weight"].tobytes()


def test_block_weights_for_another_unet_are_refused(tmp, cli):
    base_path = make_model(tmp, "sd", "sd15-emaonly", scale=16, dtype="float16")
    lora_path, _, _ = _sd15_lora(tmp, tensors(base_path))
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:lbw=" + ",".join(["1"] * 12), "-o", out)  # an SDXL list
    assert r.returncode == 2 and "are for SDXL" in r.stderr and "17 or 26 values" in r.stderr
    assert not out.exists() and not list(tmp.glob("*.tmp*"))
    r = cli("lora", "apply", base_path, f"{lora_path}:1:lbw=1,2", "-o", out)
    assert r.returncode == 2 and "2 values" in r.stderr and not out.exists()
