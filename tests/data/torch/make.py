"""Generate the small checkpoints real torch writes, with the tensors torch loads beside them.

Run with torch installed (torch==2.13.0 CPU):  python tests/data/torch/make.py
Writes, for each case, `<case>.<ext>` (what torch.save wrote) and `<case>.expected.npz`
(each tensor's bit pattern as unsigned integers, plus `__meta__`: JSON of name -> [dtype, shape]
and the checkpoint's plain extras), so tests check our reader without torch installed.
`test_torch_oracle.py` calls `build_cases` too, on fresh files, and compares with torch.load.
"""
from __future__ import annotations

import io
import json
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def fake_lightning_callback_class():
    """A class pickled as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (the dict
    key Lightning writes in `callbacks`), without installing Lightning."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    module = sys.modules[names[-1]]
    if not hasattr(module, "ModelCheckpoint"):
        cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
        module.ModelCheckpoint = cls
    return module.ModelCheckpoint


def every_dtype(torch):
    """One tensor of every dtype torch saves and sdtk reads (typed storages and _rebuild_tensor_v3)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g) * 7
    out = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2):
        out[f"float.{str(dt).split('.')[1]}"] = base.to(dt)
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        out[f"int.{str(dt).split('.')[1]}"] = (base * 9).abs().to(torch.int64).to(dt)
    out["bool"] = base > 0
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def shared_and_views(torch):
    """Several tensors over one storage: offsets, a transposed (non-contiguous) view, a strided
    slice, an expanded (stride 0) view, a column, plus an unrelated tensor."""
    big = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return {
        "big": big,
        "rows_2_4": big[2:4],  # offset into the shared storage, contiguous
        "transposed": big.t(),  # non-contiguous
        "every_other": big[:, ::2],  # strides (8, 2)
        "column": big[:, 3],  # stride 8, offset 3
        "expanded": torch.arange(4, dtype=torch.int64).unsqueeze(0).expand(3, 4),  # stride 0
        "half_view": big.to(torch.float16)[1:, 2:5],
        "own": torch.ones(2, 2, dtype=torch.bfloat16),
    }


def lightning_checkpoint(torch):
    """A PyTorch Lightning training checkpoint shaped like sd-v1-x full files."""
    ModelCheckpoint = fake_lightning_callback_class()
    g = torch.Generator().manual_seed(2)
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, generator=g).half(),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(4, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
        "model_ema.decay": torch.tensor(0.9999),
    }
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": None, "best_k_models": {}, "save_last": True}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": np.int64(470000), "warm": np.float64(0.25),
                           "history": np.array([1.0, 0.5, 0.25])}],
    }


def embedding(torch):
    """A textual-inversion embedding (A1111 format; string_to_param as an nn.ParameterDict)."""
    g = torch.Generator().manual_seed(3)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 8, generator=g))})
    return {"string_to_token": {"*": 265}, "string_to_param": params, "name": "tiny-style", "step": 1500,
            "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def nested(torch):
    """Nested dicts and lists of tensors (exposed with dotted names)."""
    return {"model": {"encoder": {"w": torch.ones(2, 3)}, "scale": 0.5},
            "banks": [torch.zeros(2), torch.full((1,), 7.0)], "note": "hello"}


def to_big_endian(src: Path, dest: Path) -> None:
    """Rewrite a torch zip checkpoint as a big-endian machine would have written it: byteorder
    record "big" and every storage byte-swapped. Each storage's element size comes from the
    tensors in data.pkl, read with sdtk's own interpreter (pure data, nothing executed)."""
    sys.path.insert(0, str(HERE.parents[2] / "src"))
    from sdtk.formats.checkpoint_tree import flatten_checkpoint
    from sdtk.formats.picklevm import PickleVM, StorageRef

    def storage(pid):
        return StorageRef(pid[2], pid[1], pid[3], pid[4], 1 << 40)

    with zipfile.ZipFile(src) as z:
        top = z.namelist()[0].split("/")[0]
        root, _ = PickleVM(z.read(f"{top}/data.pkl"), persistent_load=storage).run()
        tensors, _ = flatten_checkpoint(root, str(src), 1 << 20)
        itemsize = {t.storage.key: t.dtype.itemsize for _, t in tensors}
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
            for info in z.infolist():
                data = z.read(info.filename)
                rel = info.filename[len(top) + 1:]
                if rel == "byteorder":
                    data = b"big"
                elif rel.startswith("data/"):
                    size = itemsize.get(rel[5:], 1)
                    if size > 1:
                        data = np.frombuffer(data, dtype=f"<u{size}").astype(f">u{size}").tobytes()
                out.writestr(zipfile.ZipInfo(f"{top}/{rel}"), data)


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def flat_tensors(obj, prefix=""):
    """The tensors of a saved object under the dotted names sdtk gives them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix or "tensor": obj}
    out = {}
    if isinstance(obj, torch.nn.ParameterDict):
        obj = dict(obj.items())
    if isinstance(obj, dict):
        if not prefix and isinstance(obj.get("state_dict"), dict):
            out.update(flat_tensors(obj["state_dict"]))
            obj = {k: v for k, v in obj.items() if k != "state_dict"}
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


# case name -> (builder, file extension, torch.save keyword arguments)
CASES = {
    "every_dtype": (every_dtype, "pt", {}),
    "shared_views": (shared_and_views, "pt", {}),
    "lightning": (lightning_checkpoint, "ckpt", {}),
    "embedding": (embedding, "pt", {}),
    "nested": (nested, "pth", {}),
    "legacy": (shared_and_views, "pt", {"_use_new_zipfile_serialization": False}),
    "legacy_embedding": (embedding, "pt", {"_use_new_zipfile_serialization": False}),
}


def build_cases(outdir: Path, names=None) -> dict:
    """Write each case with torch.save into `outdir`; return {file name: (tensors, extras)}."""
    import torch

    written = {}
    for name, (builder, ext, kwargs) in CASES.items():
        if names and name not in names:
            continue
        obj = builder(torch)
        path = outdir / f"{name}.{ext}"
        torch.save(obj, path, **kwargs)
        written[path.name] = (flat_tensors(obj), plain_extras(obj))
    if not names or "bigendian" in names:
        src = outdir / "every_dtype.pt"
        if not src.exists():
            torch.save(every_dtype(torch), src)
        to_big_endian(src, outdir / "bigendian.pt")
        written["bigendian.pt"] = (flat_tensors(every_dtype(torch)), {})
    return written


def plain_extras(obj, prefix="") -> dict:
    """The non-tensor values of a saved object as sdtk should expose them (computed here from
    the Python objects, independently of sdtk): dotted names, numpy values as plain numbers."""
    import torch

    out = {}
    if isinstance(obj, torch.nn.ParameterDict):
        obj = dict(obj.items())
    if isinstance(obj, dict):
        if not prefix and isinstance(obj.get("state_dict"), dict):
            out.update({k: v for k, v in plain_extras(obj["state_dict"]).items()})
            obj = {k: v for k, v in obj.items() if k != "state_dict"}
        if not obj and prefix:
            return {prefix: {}}
        for k, v in obj.items():
            key = f"{k.__module__}.{k.__name__}" if isinstance(k, type) else str(k)
            out.update(plain_extras(v, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(obj, (list, tuple)) and any(True for _ in _tensors(obj)):
        for i, v in enumerate(obj):
            out.update(plain_extras(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    if isinstance(obj, torch.Tensor):
        return {}
    return {prefix or "value": _plain(obj)}


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def bit_pattern(t) -> np.ndarray:
    """A tensor's exact bits as unsigned integers (NaN-safe, works for bf16/fp8)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8)
    size = t.element_size()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    return raw.view(f"<u{size}").reshape(tuple(t.shape))


def write_expected(path: Path, tensors: dict, extras: dict) -> None:
    meta = {"tensors": {k: [str(v.dtype).split(".")[1], list(v.shape)] for k, v in tensors.items()}, "extras": extras}
    arrays = {f"t{i}": bit_pattern(v) for i, v in enumerate(tensors.values())}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    path.write_bytes(buf.getvalue())


def main() -> None:
    written = build_cases(HERE)
    for fname, (tensors, extras) in written.items():
        write_expected(HERE / f"{fname}.expected.npz", tensors, extras)
        print(f"wrote {fname} ({os.path.getsize(HERE / fname)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
