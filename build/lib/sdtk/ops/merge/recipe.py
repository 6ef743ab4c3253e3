"""Recipes: multi-step merges as data (YAML in, JSON in the output's metadata), evaluated without
intermediate files, reproducible byte for byte with `--recipe-from`.

```yaml
models:                      # name -> file
  base: v1-5-pruned-emaonly.safetensors
  inpaint: sd-v1-5-inpainting.safetensors
  custom: myModel.safetensors
steps:                       # in order; the last one is the output
  - name: custom_inpaint
    method: add-difference
    inputs: [inpaint, custom, base]   # A, B, C: model or earlier step names
    alpha: 1.0
  - method: weighted-sum
    inputs: [custom_inpaint, other]
    alpha: 0.3
    blocks: GRAD_V             # preset or list; optional
    te: A                      # merge | A | B  (text encoder)
    vae: merge                 # merge | A | B
    exclude: "model_ema\\."    # regex of keys kept from A
    seed: 0                    # DARE
dtype: fp16                  # output float dtype (default: the primary's)
bake_vae: vae-ft-mse.safetensors   # optional
```
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from sdtk.errors import SdtkError, UsageError
from sdtk.ops.merge import methods as M
from sdtk.ops.merge.blocks import parse_block_spec

RECIPE_VERSION = 1
COMPONENT_CHOICES = ("merge", "A", "B")


@dataclass
class Step:
    method: str
    inputs: List[str]
    alpha: Optional[float] = None
    beta: Optional[float] = None
    seed: int = 0
    blocks: Union[None, str, List[float]] = None
    te: str = "merge"
    vae: str = "merge"
    exclude: Optional[str] = None
    name: Optional[str] = None

    def resolved(self) -> "Step":
        """Defaults filled in (so the stored recipe says exactly what was computed)."""
        m = M.METHODS[self.method]
        alpha = m.alpha_default if self.alpha is None else float(self.alpha)
        beta = (m.beta_default if self.beta is None else float(self.beta)) if m.beta_range is not None else None
        return Step(self.method, list(self.inputs), alpha, beta, int(self.seed), self.blocks, self.te, self.vae, self.exclude, self.name)


@dataclass
class Recipe:
    models: Dict[str, str]  # name -> path (only the file name goes into metadata)
    steps: List[Step]
    dtype: Optional[str] = None
    bake_vae: Optional[str] = None
    identities: Dict[str, dict] = field(default_factory=dict)  # name -> {file, size, sha256}, from --recipe-from

    def validate(self) -> "Recipe":
        if not self.models:
            raise UsageError(None, "the recipe names no models")
        if not self.steps:
            raise UsageError(None, "the recipe has no steps")
        known = set(self.models)
        for i, raw in enumerate(self.steps):
            step = raw
            where = f"step {i + 1}" + (f" ({step.name})" if step.name else "")
            if step.method not in M.METHODS:
                raise UsageError(None, f"{where}: unknown method {step.method!r} (one of {', '.join(M.METHODS)})")
            for inp in step.inputs:
                if inp not in known:
                    raise UsageError(None, f"{where}: input {inp!r} is neither a model nor an earlier step")
            meth = M.METHODS[step.method]
            if len(step.inputs) not in meth.inputs:
                want = " or ".join(str(n) for n in meth.inputs)
                raise UsageError(None, f"{where}: {step.method} takes {want} models, got {len(step.inputs)}")
            for comp, value in (("te", step.te), ("vae", step.vae)):
                if value not in COMPONENT_CHOICES:
                    raise UsageError(None, f"{where}: {comp} must be merge, A or B (got {value!r})")
            self.steps[i] = step = step.resolved()
            M.check_scalars(step.method, step.alpha, step.beta)
            if isinstance(step.blocks, str):
                step.blocks = parse_block_spec(step.blocks)
            if step.name:
                if step.name in known:
                    raise UsageError(None, f"{where}: name {step.name!r} is already used")
                known.add(step.name)
        return self

    def canonical(self, identities: Dict[str, dict]) -> dict:
        """The recipe as stored in `sdtk.merge_recipe` (no paths: file names, sizes and hashes)."""
        steps = []
        for s in self.steps:
            d = {k: v for k, v in asdict(s).items() if v is not None}
            steps.append(d)
        out = {"version": RECIPE_VERSION, "models": {n: identities[n] for n in self.models}, "steps": steps}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.bake_vae:
            out["bake_vae"] = identities["__bake_vae__"]
        return out


def _step_from(d: Any, i: int) -> Step:
    if not isinstance(d, dict):
        raise UsageError(None, f"recipe step {i + 1} is not a mapping")
    allowed = {"method", "inputs", "alpha", "beta", "seed", "blocks", "te", "vae", "exclude", "name"}
    extra = sorted(set(d) - allowed)
    if extra:
        raise UsageError(None, f"recipe step {i + 1}: unknown field(s) {extra}")
    if "method" not in d or "inputs" not in d:
        raise UsageError(None, f"recipe step {i + 1}: needs method and inputs")
    inputs = d["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise UsageError(None, f"recipe step {i + 1}: inputs must be a list of names")
    try:
        return Step(method=str(d["method"]), inputs=list(inputs),
                    alpha=None if d.get("alpha") is None else float(d["alpha"]),
                    beta=None if d.get("beta") is None else float(d["beta"]),
                    seed=int(d.get("seed", 0)), blocks=d.get("blocks"),
                    te=str(d.get("te", "merge")), vae=str(d.get("vae", "merge")),
                    exclude=d.get("exclude"), name=d.get("name"))
    except (TypeError, ValueError) as e:
        raise UsageError(None, f"recipe step {i + 1}: {e}") from None


def recipe_from_dict(data: Any, base_dir: str = ".", origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UsageError(origin, "a recipe is a mapping with models and steps")
    extra = sorted(set(data) - {"version", "models", "steps", "dtype", "bake_vae"})
    if extra:
        raise UsageError(origin, f"unknown recipe field(s) {extra}")
    models_raw = data.get("models") or {}
    if not isinstance(models_raw, dict):
        raise UsageError(origin, "models must map names to files")
    models: Dict[str, str] = {}
    identities: Dict[str, dict] = {}
    for name, value in models_raw.items():
        if isinstance(value, dict):  # a stored recipe: {file, size, sha256}
            identities[str(name)] = value
            models[str(name)] = str(value.get("file", ""))
        else:
            path = str(value)
            models[str(name)] = path if os.path.isabs(path) else os.path.join(base_dir, path)
    steps_raw = data.get("steps") or []
    if not isinstance(steps_raw, list):
        raise UsageError(origin, "steps must be a list")
    bake = data.get("bake_vae")
    if isinstance(bake, dict):
        identities["__bake_vae__"] = bake
        bake = str(bake.get("file", ""))
    elif bake is not None:
        bake = str(bake) if os.path.isabs(str(bake)) else os.path.join(base_dir, str(bake))
    return Recipe(models, [_step_from(s, i) for i, s in enumerate(steps_raw)], data.get("dtype"), bake, identities)


def load_recipe_file(path: str) -> Recipe:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise SdtkError(path, "no such file") from None
    except yaml.YAMLError as e:
        raise UsageError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, os.path.dirname(os.path.abspath(path)), path)


def single_step_recipe(paths: List[str], method: str, alpha, beta, seed, blocks, te, vae, exclude, dtype, bake_vae) -> Recipe:
    names = ["A", "B", "C"][: len(paths)]
    step = Step(method, names, alpha, beta, seed, blocks, te, vae, exclude)
    return Recipe(dict(zip(names, paths)), [step], dtype, bake_vae)


def dumps_canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
