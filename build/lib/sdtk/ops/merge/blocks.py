"""Block weights ("MBW", 層別マージ): which block each key belongs to, block lists, presets.

Convention: supermerger / bbc-mc MBW / meh (the popular one), documented in docs/merge.md.
SD1 and SD2 (26 weights): BASE, IN00-IN11, M00, OUT00-OUT11.
SDXL (20 weights): BASE, IN00-IN08, M00, OUT00-OUT08 (supermerger / model-mixer `BLOCKIDXL`).
FLUX (58 weights, our extension, no popular convention exists): BASE, D00-D18 (double_blocks),
S00-S37 (single_blocks).
A list one shorter (no BASE) uses the global alpha for BASE. An SD1-length list (25/26) given for
SDXL is converted the way supermerger does: IN00-IN08, M00, OUT00-OUT08 picked by name
(in supermerger's 25-list indexing `w[:9] + w[12:22]`).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

from sdtk.errors import UsageError

BASE = "BASE"


def _names(prefix: str, n: int) -> List[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


# Block lists per architecture family. Sources: supermerger scripts/mergers/mergers.py BLOCKID /
# BLOCKIDXL (also wkpark/sd-webui-model-mixer); FLUX: ours (double_blocks 0-18, single_blocks 0-37,
# as in the FLUX.1 checkpoints' layout).
BLOCK_LISTS: Dict[str, List[str]] = {
    "sd1": [BASE] + _names("IN", 12) + ["M00"] + _names("OUT", 12),
    "sd2": [BASE] + _names("IN", 12) + ["M00"] + _names("OUT", 12),
    "sdxl": [BASE] + _names("IN", 9) + ["M00"] + _names("OUT", 9),
    "flux": [BASE] + _names("D", 19) + _names("S", 38),
}

_UNET = "model.diffusion_model."
_RE_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_RE_OUT = re.compile(r"\.output_blocks\.(\d+)\.")
_RE_DOUBLE = re.compile(r"(?:^|\.)double_blocks\.(\d+)\.")
_RE_SINGLE = re.compile(r"(?:^|\.)single_blocks\.(\d+)\.")


def block_of(key: str, family: str) -> str:
    """The block a key belongs to. Rules, in this order (supermerger `blockfromkey`, meh
    `weighted_sum` block matching):
    - keys outside the diffusion model (text encoders, VAE, schedule buffers) -> BASE
    - `time_embed` (and SDXL `label_emb`) -> IN00
    - the final `out.` of the UNet -> the last OUT block (OUT11; SDXL OUT08)
    - `.input_blocks.N.` -> IN{N}; `.middle_block.` -> M00; `.output_blocks.N.` -> OUT{N}
    - FLUX: `double_blocks.N.` -> D{N}, `single_blocks.N.` -> S{N}, all else -> BASE
    - anything else -> BASE"""
    if family == "flux":
        m = _RE_DOUBLE.search(key)
        if m:
            return f"D{int(m.group(1)):02d}"
        m = _RE_SINGLE.search(key)
        if m:
            return f"S{int(m.group(1)):02d}"
        return BASE
    if not key.startswith(_UNET):
        return BASE
    last_out = "OUT08" if family == "sdxl" else "OUT11"
    rest = key[len(_UNET):]
    if rest.startswith("time_embed.") or rest.startswith("label_emb."):
        return "IN00"
    if rest.startswith("out."):
        return last_out
    m = _RE_IN.search(key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if ".middle_block." in key:
        return "M00"
    m = _RE_OUT.search(key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return BASE


# Presets: 26 values (BASE, IN00-IN11, M00, OUT00-OUT11). Values as published with
# bbc-mc/sdweb-merge-block-weighted-gui (csv/preset.tsv) and repeated in s1dlx/meh
# sd_meh/presets.py (BLOCK_WEIGHTS_PRESETS); supermerger ships the same names.
_G = [round(i / 12, 10) for i in range(13)]  # 0, 1/12, ..., 1 (the published values are these, rounded to 10 places)
PRESETS: Dict[str, List[float]] = {
    "GRAD_V": [0] + _G[::-1][:12] + [0] + _G[1:],
    "GRAD_A": [0] + _G[:12] + [1.0] + _G[::-1][1:],
    "FLAT_25": [0] + [0.25] * 25,
    "FLAT_75": [0] + [0.75] * 25,
    "WRAP08": [0] + [1] * 4 + [0] * 17 + [1] * 4,
    "WRAP12": [0] + [1] * 6 + [0] * 13 + [1] * 6,
    "WRAP14": [0] + [1] * 7 + [0] * 11 + [1] * 7,
    "WRAP16": [0] + [1] * 8 + [0] * 9 + [1] * 8,
    "MID12_50": [0] + [0] * 5 + [0.5] * 14 + [0] * 6,
    "OUT07": [0] + [0] * 18 + [1] * 7,
    "OUT12": [0] + [0] * 13 + [1] * 12,
    "OUT12_5": [0] + [0] * 12 + [0.5] + [1] * 12,
    "RING08_SOFT": [0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0, 0],
    "RING08_5": [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    "RING10_5": [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "RING10_3": [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    "ALL_A": [0] * 26,
    "ALL_B": [1] * 26,
}


def expected_lengths(family: str) -> List[int]:
    n = len(BLOCK_LISTS[family])
    lengths = [n, n - 1]
    if family == "sdxl":
        lengths += [26, 25]  # SD1-style lists, converted
    return lengths


def _sd1_to_sdxl(values26: Sequence[float]) -> List[float]:
    """supermerger's SD1 -> SDXL conversion, by name: BASE, IN00-IN08, M00, OUT00-OUT08."""
    names = BLOCK_LISTS["sd1"]
    wanted = BLOCK_LISTS["sdxl"]
    by_name = dict(zip(names, values26))
    return [by_name[n] for n in wanted]


def parse_block_spec(spec: str) -> "str | List[float]":
    """A preset name, or comma-separated numbers."""
    text = spec.strip()
    if text.upper() in PRESETS:
        return text.upper()
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        known = ", ".join(sorted(PRESETS))
        raise UsageError(None, f"--blocks {spec!r}: neither a list of numbers nor a preset name ({known})") from None


def resolve_blocks(spec: "str | Sequence[float]", family: Optional[str], alpha: float) -> Dict[str, float]:
    """Block name -> weight for `family`, from a preset name or a list of numbers."""
    if family not in BLOCK_LISTS:
        raise UsageError(None, f"block weights need an SD1, SD2, SDXL or FLUX model (this one is {family or 'not recognised'})")
    names = BLOCK_LISTS[family]
    values = list(PRESETS[spec]) if isinstance(spec, str) else [float(v) for v in spec]
    if family == "sdxl" and len(values) in (25, 26):
        values = _sd1_to_sdxl(values if len(values) == 26 else [alpha] + values)
    if len(values) == len(names) - 1:
        values = [alpha] + values
    if len(values) != len(names):
        lengths = " or ".join(str(n) for n in expected_lengths(family))
        raise UsageError(None, f"--blocks has {len(values)} values; {family.upper()} takes {lengths} ({', '.join([names[0], names[1], '...', names[-1]])})")
    return dict(zip(names, values))
