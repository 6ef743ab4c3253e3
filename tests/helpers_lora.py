"""Helpers for the LoRA tests: adapter tensors of every family built for given weight shapes (the
file layouts of reference/lora.md §1.1), and the ComfyUI client as an oracle."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest

from sdtk.formats.safetensors import write_safetensors
from sdtk.tensors import from_array

CLIENTS = Path(__file__).resolve().parent.parent.parent / "shared" / "clients"


def lora_family(prefix: str, kind: str, shape: Tuple[int, ...], rng, rank: int = 4, alpha: Optional[float] = 2.0,
                **opts) -> Dict[str, np.ndarray]:
    """Tensors of one adapter module `prefix` of type `kind` for a weight of `shape` (float32)."""
    out, inn = shape[0], shape[1] if len(shape) > 1 else 1
    k = tuple(shape[2:])
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    t: Dict[str, np.ndarray] = {}
    if kind == "lora":
        t[".lora_down.weight"] = r(rank, inn, *k)
        t[".lora_up.weight"] = r(out, rank, *((1,) * len(k)))
    elif kind == "tucker":
        t[".lora_down.weight"] = r(rank, inn, 1, 1)
        t[".lora_mid.weight"] = r(rank, rank, *k)
        t[".lora_up.weight"] = r(out, rank, 1, 1)
    elif kind == "loha":
        if opts.get("tucker"):
            for i in (1, 2):
                t[f".hada_w{i}_a"] = r(rank, out)
                t[f".hada_w{i}_b"] = r(rank, inn)
                t[f".hada_t{i}"] = r(rank, rank, *k)
        else:
            flat = inn * int(np.prod(k)) if k else inn
            for i in (1, 2):
                t[f".hada_w{i}_a"] = r(out, rank)
                t[f".hada_w{i}_b"] = r(rank, flat)
    elif kind == "lokr":
        a, c = opts.get("factors", (2, 2))
        b, d = out // a, inn // c
        if opts.get("w1_factorised"):
            t[".lokr_w1_a"] = r(a, rank)
            t[".lokr_w1_b"] = r(rank, c)
        else:
            t[".lokr_w1"] = r(a, c)
        if opts.get("w2_factorised"):
            t[".lokr_w2_a"] = r(b, rank)
            t[".lokr_w2_b"] = r(rank, d * int(np.prod(k)) if k else d)
            if k:
                t[".lokr_w2_b"] = r(rank, d * int(np.prod(k)))
        else:
            t[".lokr_w2"] = r(b, d, *k)
    elif kind == "glora":
        t[".a1.weight"] = r(inn, rank)
        t[".a2.weight"] = r(rank, inn)
        t[".b1.weight"] = r(out, rank)
        t[".b2.weight"] = r(rank, inn * (int(np.prod(k)) if k else 1))
    elif kind == "full":
        t[".diff"] = r(*shape)
        if opts.get("bias"):
            t[".diff_b"] = r(out)
    elif kind == "ia3":
        on_input = bool(opts.get("on_input"))
        t[".weight"] = r(inn if on_input else out)
        t[".on_input"] = np.array(1 if on_input else 0, dtype=np.int64)
        alpha = None
    elif kind == "oft":
        blocks = opts.get("blocks", 4)
        t[".oft_blocks"] = r(blocks, out // blocks, out // blocks)
    elif kind == "boft":  # LyCORIS butterfly OFT: (stages, blocks, b, b)
        stages, b = opts.get("stages", 2), opts.get("block_size", 4)
        t[".oft_blocks"] = r(stages, out // b, b, b)
    if alpha is not None and kind not in ("full", "ia3"):
        t[".alpha"] = np.array(alpha, dtype=np.float32)
    if opts.get("dora"):
        t[".dora_scale"] = (1 + np.abs(r(1, inn, *((1,) * len(k))))).astype(np.float32) if opts["dora"] == "in" else \
            (1 + np.abs(r(out, *((1,) * (len(shape) - 1))))).astype(np.float32)
    return {prefix + s: v for s, v in t.items()}


def write_tensors(path: Path, tensors: Dict[str, np.ndarray], metadata=None) -> Path:
    write_safetensors(path, [from_array(k, v) for k, v in tensors.items()], metadata or {}, overwrite=True)
    return Path(path)


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *a, **k):
        return _Stub("call")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision / torchaudio wheels do not load beside the CPU torch; ComfyUI imports them only
    for models these tests never build (shared/clients/README.md)."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torchvision", "torchaudio"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Stub(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def comfy_or_skip():
    """ComfyUI's comfy.lora / comfy.utils (real client code) or a skip with the reason."""
    pytest.importorskip("torch")
    root = CLIENTS / "ComfyUI"
    if not (root / "comfy" / "lora.py").exists():
        pytest.skip(f"ComfyUI client not found at {root} (only in the project's CI / shared checkout)")
    if "comfy.lora" not in sys.modules:
        for mod in ("einops", "safetensors", "yaml", "scipy", "tqdm", "psutil", "PIL"):
            pytest.importorskip(mod)
        if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _StubFinder())
        sys.path.insert(0, str(root))
        saved = sys.argv
        sys.argv = ["comfy", "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401
            import comfy.lora  # noqa: F401
            import comfy.utils  # noqa: F401
        finally:
            sys.argv = saved
    return sys.modules["comfy.lora"], sys.modules["comfy.utils"]
