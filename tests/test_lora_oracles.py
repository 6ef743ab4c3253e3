"""`sdtk lora apply` against the reference libraries, offline: PEFT merge_and_unload (LoRA,
rsLoRA, DoRA, LoHa) and LyCORIS 4.1.3's forward pass (LoCon, Tucker, LoHa, LoKr, DoRA, BOFT; not its
`merge_to`, which bakes (alpha/r)^2 for LoHa/LoKr: reference/lora.md §3.5). A tiny torch module is
the base (saved as a file by its own key names), the adapter file is what the library stores;
sdtk's baked weights must equal the library's merged weights (or reproduce its forward output)
within float32 rounding, and the untouched tensors stay bit-identical."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_lora import write_tensors
from helpers_merge import tensors

torch = pytest.importorskip("torch")
nn = torch.nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 32)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 1)
        self.keep = nn.Linear(8, 8)


def _base(tmp, seed=0):
    torch.manual_seed(seed)
    model = Toy()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, write_tensors(tmp / "base.safetensors", sd), sd


def _randomise(model, words, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(w in name for w in words):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "magnitude" in name else 0.0))


def _check(got, want, touched, base):
    worst = 0.0
    for key in touched:
        assert np.max(np.abs(want[key] - base[key])) > 1e-3, key  # the adapter really changes it
        d = float(np.max(np.abs(got[key].astype(np.float64) - want[key])))
        s = float(np.max(np.abs(want[key]))) or 1.0
        worst = max(worst, d / s)
        assert d <= 2e-6 * s + 1e-7, (key, d)
    for key in base:
        if key not in touched:
            assert got[key].tobytes() == base[key].tobytes(), key
    return worst


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "loha"])
def test_peft_merge_and_unload(tmp, cli, kind):
    peft = pytest.importorskip("peft")
    model, base_path, base = _base(tmp)
    targets = ["lin", "conv3", "conv1"]
    if kind == "loha":
        config = peft.LoHaConfig(r=4, alpha=6, target_modules=targets)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=kind == "rslora",
                                 use_dora=kind == "dora")
    pm = peft.get_peft_model(model, config)
    _randomise(pm, ["lora_", "hada_"])
    state = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    header = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6, "use_rslora": kind == "rslora"})}
    lora_path = write_tensors(tmp / "peft.safetensors", state, header)
    merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, lora_path, "-o", out)
    assert r.returncode == 0, r.stderr
    worst = _check(tensors(out), merged, [t + ".weight" for t in targets], base)
    print(f"{kind}: max relative difference to PEFT {worst:.2e}")


def _lycoris_case(kind):
    from lycoris.modules import LoConModule, LohaModule, LokrModule
    from lycoris.modules.boft import ButterflyOFTModule

    return {
        "locon": (LoConModule, {}),
        "tucker": (LoConModule, {"use_tucker": True}),
        "loha": (LohaModule, {}),
        "loha-tucker": (LohaModule, {"use_tucker": True}),
        "lokr": (LokrModule, {"factor": 4, "lora_dim": 2}),  # w2 factorised (lora_dim < max(w2 dims) / 2)
        "lokr-full": (LokrModule, {"factor": 4, "decompose_both": False, "full_matrix": True}),
        "dora": (LoConModule, {"weight_decompose": True}),
        "loha-dora": (LohaModule, {"weight_decompose": True}),
        "boft": (ButterflyOFTModule, {}),  # 32 rows: 4 butterfly stages of 8 blocks of 4
        "boft-constrained-rescaled": (ButterflyOFTModule, {"constraint": 1e-3, "rescaled": True}),  # ||Q|| clamped to alpha * out_dim
    }[kind]


@pytest.mark.parametrize("kind", ["locon", "tucker", "loha", "loha-tucker", "lokr", "lokr-full", "dora", "loha-dora",
                                  "boft", "boft-constrained-rescaled"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_lycoris_forward(tmp, cli, kind, multiplier):
    pytest.importorskip("lycoris")
    cls, opts = _lycoris_case(kind)
    model, base_path, base = _base(tmp, seed=3)
    lora = {}
    wrapped = {}
    for name in ("lin", "conv3"):
        org = getattr(model, name)
        opts = {"lora_dim": 4, **opts}
        mod = cls(f"lora_unet_{name}", org, multiplier, alpha=1.5, **opts)
        _randomise(mod, ["lora_", "hada_", "lokr_", "dora_scale", "t1", "t2", "oft_blocks", "rescale"], seed=len(name))
        if hasattr(mod, "dora_scale"):
            with torch.no_grad():
                mod.dora_scale.copy_(mod.dora_scale.abs() + 0.5)
        mod.apply_to()
        wrapped[name] = (org, mod)
        custom = mod.custom_state_dict() if hasattr(mod, "custom_state_dict") else None  # BOFT's returns None
        for k, v in (custom if custom is not None else mod.state_dict()).items():
            lora[f"{name}.{k}"] = v.detach().float().numpy().copy()
    if kind == "lokr":
        assert any(k.endswith("lokr_w2_a") for k in lora), sorted(lora)
    if kind.startswith("boft"):
        assert lora["lin.oft_blocks"].ndim == 4 and lora["lin.oft_blocks"].shape[0] > 1, lora["lin.oft_blocks"].shape
    lora_path = write_tensors(tmp / "lyco.safetensors", lora)
    out = tmp / "out.safetensors"
    r = cli("lora", "apply", base_path, f"{lora_path}:{multiplier}", "-o", out, "--dora", "lycoris")
    assert r.returncode == 0, r.stderr + r.stdout
    got = tensors(out)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        x = torch.randn(5, 24, generator=g)
        want = model.lin(x).numpy()  # the wrapped forward (LyCORIS replaced org.forward)
        mine = x.numpy() @ got["lin.weight"].T + got["lin.bias"]
        xc = torch.randn(2, 8, 6, 6, generator=g)
        want_c = model.conv3(xc).numpy()
        mine_c = torch.nn.functional.conv2d(xc, torch.from_numpy(got["conv3.weight"]), torch.from_numpy(got["conv3.bias"]), padding=1).numpy()
    for a, b in ((mine, want), (mine_c, want_c)):
        assert np.max(np.abs(a - b)) <= 1e-5 * (np.max(np.abs(b)) + 1), (kind, np.max(np.abs(a - b)))
    for key in base:
        if key not in ("lin.weight", "conv3.weight"):
            assert got[key].tobytes() == base[key].tobytes(), key
