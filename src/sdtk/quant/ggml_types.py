"""The ggml tensor types a GGUF file can hold: id, name, block size, bytes per block.

Source: ggml `include/ggml.h` (enum ggml_type) and `src/ggml.c` (type_traits: blck_size,
type_size); gguf-py 0.19.0 `constants.py` (GGMLQuantizationType, GGML_QUANT_SIZES) agrees.
Ids 4, 5, 31-33, 36-38 are retired and unknown here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block: int  # elements per block (along ne[0], the last numpy axis)
    nbytes: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.nbytes


_TABLE = [
    # id  name      block bytes
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292), (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66), (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
]

BY_ID: Dict[int, GGMLType] = {row[0]: GGMLType(*row) for row in _TABLE}
BY_NAME: Dict[str, GGMLType] = {t.name: t for t in BY_ID.values()}

# Element types stored as plain little-endian arrays: ggml type name -> sdtk dtype name.
PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}

# general.file_type values (llama.cpp `llama_ftype`, gguf-py LlamaFileType).
FILE_TYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
FILE_TYPE_NAME = {v: k for k, v in FILE_TYPE.items()}

QUANT_VERSION = 2  # GGML_QUANT_VERSION (ggml.h); general.quantization_version


def ggml_type(name_or_id) -> Optional[GGMLType]:
    if isinstance(name_or_id, int):
        return BY_ID.get(name_or_id)
    return BY_NAME.get(str(name_or_id).upper())
