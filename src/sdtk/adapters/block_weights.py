"""LoRA Block Weight: one strength factor per U-Net block, the convention of A1111's
sd-webui-lora-block-weight extension (hako-mochi) and kohya's `--lbws` (sd-scripts
networks/svd_merge_lora.py, sdxl_merge_lora.py): `BASE` (the text encoders), `IN00`..`IN11`,
`MID`, `OUT00`..`OUT11`, named after the LDM U-Net's `input_blocks.N`, `middle_block`,
`output_blocks.N`.

A list gives the blocks that hold weights in that family, in order: 17 values for SD 1.x/2.x
(the blocks with attention or resnets that LoRAs train), 26 for every SD1 block, 12 for SDXL (the
blocks with transformers) or 20 for every SDXL block; blocks not listed keep factor 1. Or name
blocks: `IN04=0.5,MID=0,OUT03=1.2` (the rest 1), or give one of the extension's preset names
(`OUTS`, `INALL`, ...). Pure functions: parse once, look up per target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from sdtk.errors import UsageError

BLOCK_IDS = ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("MID",) + tuple(f"OUT{i:02d}" for i in range(12))
# which of the 26 blocks each list length names; source: kohya sd-scripts networks/svd_merge_lora.py
# LAYER12 / LAYER17 / LAYER20 / LAYER26 (the lbw extension's 17-value SD1 and 12-value SDXL lists)
_LISTED = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{i:02d}" for i in range(3, 12)),
    26: BLOCK_IDS,
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{i:02d}" for i in range(6)),
    20: ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("MID",) + tuple(f"OUT{i:02d}" for i in range(9)),
}
# the A1111 extension's preset names (hako-mikan/sd-webui-lora-block-weight,
# scripts/lora_block_weight.py DEF_WEIGHT_PRESET), 17 values each (SD 1.x/2.x); accepted as the
# whole `lbw=` value, case-insensitive, as the extension accepts them in a prompt
PRESETS: Dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
# the U-Net each list length is for (kohya: lengths 12 and 20 are SDXL)
FAMILY_OF_LENGTH = {17: "sd1", 26: "sd1", 12: "sdxl", 20: "sdxl"}
# A weight's block is the LDM block it lives in (as the A1111 extension and supermerger read
# `input_blocks.N` / `middle_block` / `output_blocks.N`); weights outside every block (time_embed,
# label_emb, the final `out.`) keep factor 1. kohya's `get_lbw_block_index` differs there only:
# SDXL time_embed/label_emb -> IN00 and out -> OUT09; SD1 conv_in (input_blocks.0) -> no block.
_UNET_BLOCK = re.compile(r"(?:^|\.)(input_blocks|middle_block|output_blocks)\.(\d+)")


@dataclass(frozen=True)
class BlockWeights:
    """Factors by block id (blocks absent: 1.0), and the U-Net layout they were written for."""

    factors: Tuple[Tuple[str, float], ...]
    family: Optional[str]  # "sd1" (SD 1.x/2.x), "sdxl", or None when blocks were named
    text: str

    def factor(self, block: Optional[str]) -> float:
        return dict(self.factors).get(block, 1.0) if block else 1.0


def parse_block_weights(text: str) -> BlockWeights:
    """`1,0,0,1,...` (12, 17, 20 or 26 numbers), `IN04=0.5,MID=0` or a preset name (`OUTS`) -> BlockWeights."""
    preset = PRESETS.get(text.strip().upper())
    if preset is not None:
        return BlockWeights(parse_block_weights(preset).factors, "sd1", text.strip().upper())
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise UsageError(None, f"block weights {text!r}: empty")
    if all("=" in p for p in items):
        factors: Dict[str, float] = {}
        for p in items:
            name, _, raw = p.partition("=")
            name = name.strip().upper()
            if name not in BLOCK_IDS:
                raise UsageError(None, f"block weights {text!r}: unknown block {name!r} (BASE, IN00..IN11, MID, OUT00..OUT11)")
            factors[name] = _finite(raw, text)
        return BlockWeights(tuple(factors.items()), None, text)
    if any("=" in p for p in items):
        raise UsageError(None, f"block weights {text!r}: give either a list of numbers or NAME=VALUE pairs, not both")
    if len(items) == 1:
        try:
            float(items[0])
        except ValueError:
            raise UsageError(None, f"block weights {text!r}: not a list of numbers, NAME=VALUE pairs or a preset name "
                                   f"({', '.join(PRESETS)})") from None
    values = [_finite(p, text) for p in items]
    listed = _LISTED.get(len(values))
    if listed is None:
        raise UsageError(None, f"block weights {text!r}: {len(values)} values; the convention takes 17 or 26 (SD 1.x/2.x), "
                               f"12 or 20 (SDXL)")
    return BlockWeights(tuple(zip(listed, values)), FAMILY_OF_LENGTH[len(values)], text)


def _finite(raw: str, text: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(None, f"block weights {text!r}: {raw.strip()!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError(None, f"block weights {text!r}: {raw.strip()!r} is not a finite number")
    return value


def unet_layout(base_keys) -> Optional[str]:
    """"sd1" (12 input blocks: SD 1.x/2.x), "sdxl" (9), or None (no LDM U-Net: FLUX, SD3...)."""
    highest = -1
    for key in base_keys:
        m = _UNET_BLOCK.search(key)
        if m and m.group(1) == "input_blocks":
            highest = max(highest, int(m.group(2)))
    return {11: "sd1", 8: "sdxl"}.get(highest)


def check_fits(weights: BlockWeights, layout: Optional[str], base_label: str, lora_path: Optional[str] = None) -> None:
    """Refuse block weights the base's U-Net cannot take (the message names the LoRA argument)."""
    if layout is None:
        raise UsageError(lora_path, f"block weights need an SD 1.x/2.x or SDXL U-Net; {base_label} has none "
                               f"(the LoRA Block Weight convention names U-Net blocks)")
    if weights.family is not None and weights.family != layout:
        want = "17 or 26" if layout == "sd1" else "12 or 20"
        raise UsageError(lora_path, f"block weights {weights.text!r}: {len(weights.factors)} values are for "
                               f"{'SDXL' if weights.family == 'sdxl' else 'SD 1.x/2.x'}, but {base_label} is "
                               f"{'SDXL' if layout == 'sdxl' else 'SD 1.x/2.x'} ({want} values)")


def block_of(component: str, weight_key: str) -> Optional[str]:
    """The block id a base weight belongs to: BASE for text encoders, the U-Net block, or None."""
    if component != "unet":
        return "BASE"
    m = _UNET_BLOCK.search(weight_key)
    if m is None:
        return None
    kind, n = m.group(1), int(m.group(2))
    return "MID" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{n:02d}"


def describe(weights: BlockWeights) -> Mapping[str, float]:
    """The factors that differ from 1, for reports and the lineage."""
    return {b: v for b, v in weights.factors if v != 1.0}
