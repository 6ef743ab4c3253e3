"""Run by tests/test_gguf.py in a subprocess: load GGUF files with ComfyUI-GGUF's own loader
(`gguf_sd_loader` + `dequantize_tensor`, unmodified, from ../shared/clients) and compare every
tensor with what sdtk reads. Prints one JSON object: {path: {arch, tensors, worst_rel, ...}}.
Usage: python comfyui_gguf_check.py CLIENTS_DIR SDTK_SRC FILE.gguf...
"""
import sys, types, json, importlib.util, os
clients, src, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
class _Stub(types.ModuleType):
    def __getattr__(self, name):  # any attribute: another stub (ComfyUI only touches them in models we do not build)
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _Stub(f"{self.__name__}.{name}"); sub.__path__ = []; sys.modules[sub.__name__] = sub
        return sub
for name in ("torchvision", "torchaudio"):
    m = _Stub(name); m.__path__ = []; sys.modules[name] = m
sys.path.insert(0, os.path.join(clients, "ComfyUI"))
sys.argv = ["comfy", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
spec = importlib.util.spec_from_file_location("comfyui_gguf", os.path.join(clients, "ComfyUI-GGUF", "__init__.py"), submodule_search_locations=[os.path.join(clients, "ComfyUI-GGUF")])
pkg = importlib.util.module_from_spec(spec); sys.modules["comfyui_gguf"] = pkg
from comfyui_gguf.loader import gguf_sd_loader
from comfyui_gguf.dequant import dequantize_tensor
import torch, numpy as np
sys.path.insert(0, src)
from sdtk.formats import open_model
results = {}
for path in paths:
    sd, arch = gguf_sd_loader(path, return_arch=True)
    out = {"arch": arch, "tensors": len(sd), "worst_rel": 0.0, "worst": None, "shape_mismatch": None}
    with open_model(path) as cat:
        for k, v in sd.items():
            w = dequantize_tensor(v, dtype=torch.float32).float().numpy()
            mine = np.asarray(cat.tensors[k].read(), dtype=np.float32)
            if tuple(w.shape) != tuple(mine.shape):
                out["shape_mismatch"] = [k, list(w.shape), list(mine.shape)]
                break
            if w.size:
                rel = float(np.max(np.abs(w - mine)) / max(float(np.max(np.abs(mine))), 1e-30))
                if rel > out["worst_rel"]:
                    out["worst_rel"], out["worst"] = rel, [k, getattr(v.tensor_type, "name", str(v.tensor_type))]
    results[path] = out
print(json.dumps(results))
