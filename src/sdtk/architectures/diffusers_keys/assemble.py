"""A whole single file split into diffusers components, and components joined back.

Everything a component's links do not cover (EMA copies, schedule buffers, markers, CLIP
position_ids, OpenCLIP logit_scale, SD2's last text-encoder layer and text_projection, training
leftovers) is returned as `extra`, under its single-file name, for the sidecar that makes a round
trip exact (shared reference diffusers-interop.md section 4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sdtk.architectures.diffusers_keys import components as rows
from sdtk.architectures.diffusers_keys.links import Link
from sdtk.architectures.diffusers_keys.pipelines import PIPELINES, ComponentSpec, PipelineSpec
from sdtk.architectures.diffusers_keys.plan import to_diffusers, to_single
from sdtk.architectures.prefixes import DDPM_BUFFERS, MARKER_KEYS
from sdtk.tensors import LazyTensor

# Single-file prefixes that are never a bare DiT's keys (everything else a component does not claim).
NOT_BARE = ("model.", "model_ema.", "first_stage_model.", "vae.", "cond_stage_model.", "conditioner.", "text_encoders.")
POSITION_IDS = "text_model.embeddings.position_ids"


class ComponentError(ValueError):
    """A component is incomplete or malformed: (component, problem)."""

    def __init__(self, component: str, problem: str):
        self.component, self.problem = component, problem
        super().__init__(f"{component}: {problem}")


@dataclass
class ComponentPlan:
    spec: ComponentSpec
    prefix: str
    tensors: List[LazyTensor]  # diffusers names, in link order
    single_shapes: Dict[str, Tuple[int, ...]]
    created: List[str] = field(default_factory=list)  # diffusers keys made up (not from the file)

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {t.name: tuple(t.shape) for t in self.tensors}


@dataclass
class Split:
    pipeline: PipelineSpec
    components: List[ComponentPlan]
    extra: List[LazyTensor]  # single-file names
    absent: List[str]  # component folders the file does not hold


def _claim(remaining: Dict[str, LazyTensor], spec: ComponentSpec) -> Tuple[Optional[str], Dict[str, LazyTensor]]:
    for prefix in spec.prefixes:
        if prefix:
            sub = {k[len(prefix):]: t for k, t in remaining.items() if k.startswith(prefix)}
        else:
            sub = {k: t for k, t in remaining.items() if not k.startswith(NOT_BARE) and k not in DDPM_BUFFERS
                   and k not in MARKER_KEYS}
        if sub:
            return prefix, sub
    return None, {}


def split_single_file(tensors: Mapping[str, LazyTensor], family: str) -> Split:
    """Split a single file's tensors (full names, file order) into the family's components."""
    pipeline = PIPELINES[family]
    remaining = dict(tensors)
    comps: List[ComponentPlan] = []
    absent: List[str] = []
    specs = sorted(pipeline.components, key=lambda s: "" in s.prefixes[:1])  # bare-prefix components last
    for spec in specs:
        prefix, sub = _claim(remaining, spec)
        if prefix is None:
            absent.append(spec.folder)
            continue
        shapes = {k: tuple(t.shape) for k, t in sub.items()}
        try:
            links = rows.links_from_single(spec.kind, shapes, spec.options)
        except (ValueError, KeyError) as e:
            raise ComponentError(spec.folder, f"does not have the structure of a {spec.cls} ({e})") from None
        missing = [link.single for link in links if link.single not in sub]
        if missing:
            raise ComponentError(spec.folder, f"{len(missing)} tensors missing, e.g. {prefix}{missing[0]}")
        out: List[LazyTensor] = []
        for link in links:
            try:
                out += to_diffusers(link, sub[link.single])
            except ValueError as e:
                raise ComponentError(spec.folder, str(e)) from None
            del remaining[prefix + link.single]
        plan = ComponentPlan(spec, prefix, out, shapes)
        if spec.kind == "clip-hf" and spec.options.get("projection") and "text_projection.weight" not in plan.shapes:
            plan.tensors.append(_identity_projection(plan))  # what diffusers does too (reference 1.4)
            plan.created.append("text_projection.weight")
        comps.append(plan)
    order = {s.folder: i for i, s in enumerate(pipeline.components)}
    comps.sort(key=lambda c: order[c.spec.folder])
    return Split(pipeline, comps, list(remaining.values()), [f for f in (s.folder for s in pipeline.components) if f in absent])


def _identity_projection(plan: ComponentPlan) -> LazyTensor:
    tok = next(t for t in plan.tensors if t.name.endswith("embeddings.token_embedding.weight"))
    n = tok.shape[1]
    return LazyTensor("text_projection.weight", tok.dtype, (n, n), lambda: np.eye(n, dtype=tok.dtype.numpy))


@dataclass
class Joined:
    tensors: List[LazyTensor]  # single-file names
    notes: List[str] = field(default_factory=list)


def join_component(spec: ComponentSpec, prefix: str, tensors: Mapping[str, LazyTensor], config: Mapping,
                   created: Sequence[str] = ()) -> List[LazyTensor]:
    """One diffusers component back under single-file names (prefix added)."""
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    try:
        links: List[Link] = rows.links_from_diffusers(spec.kind, shapes, config, spec.options)
    except (ValueError, KeyError) as e:
        raise ComponentError(spec.folder, f"does not match its config.json ({e})") from None
    out: List[LazyTensor] = []
    used = set(created)
    for link in links:
        if any(d in used for d in link.diffusers):
            continue
        missing = [d for d in link.diffusers if d not in tensors]
        if missing:
            raise ComponentError(spec.folder, f"{len(missing)} tensors missing, e.g. {missing[0]}")
        try:
            t = to_single(link, [tensors[d] for d in link.diffusers])
        except ValueError as e:
            raise ComponentError(spec.folder, str(e)) from None
        t.name = prefix + t.name
        out.append(t)
        used.update(link.diffusers)
    strangers = [k for k in tensors if k not in used]
    if strangers:
        raise ComponentError(spec.folder, f"{len(strangers)} tensors its config does not explain, e.g. {strangers[0]}")
    return out


def regenerated(family: str, prefixes: Mapping[str, str], configs: Mapping[str, Mapping],
                scheduler: Mapping) -> Tuple[List[LazyTensor], List[str]]:
    """Without a sidecar: the tensors a single file of `family` holds that can be recreated exactly
    (CLIP position_ids 0..n-1 int64; v_pred / ztsnr markers from the scheduler config; SD1/SD2's
    DDPM schedule buffers from its betas), and the names of what cannot (listed for people)."""
    from sdtk.tensors import DTYPES

    out: List[LazyTensor] = []
    notes: List[str] = []
    pipeline = PIPELINES[family]
    for spec in pipeline.components:
        if spec.folder not in prefixes:
            continue
        if spec.kind == "clip-hf" and family in ("sd1", "sdxl") and spec.folder == "text_encoder":
            n = int(configs.get(spec.folder, {}).get("max_position_embeddings", 77))
            out.append(LazyTensor(prefixes[spec.folder] + POSITION_IDS, DTYPES["I64"], (1, n),
                                  lambda n=n: np.arange(n, dtype=np.int64).reshape(1, n)))
        if spec.kind == "open-clip":
            lost = ["logit_scale"] + (["the last text-encoder layer", "text_projection"] if spec.options.get("drop_last_layers") else [])
            notes.append(f"{spec.folder}: not in a diffusers folder and not recreated: {', '.join(lost)} "
                         f"({prefixes[spec.folder]}*; unused for generation)")
    if family.startswith("sdxl"):
        if scheduler.get("prediction_type") == "v_prediction":
            out.append(LazyTensor("v_pred", DTYPES["F16"], (0,), lambda: np.zeros((0,), np.float16)))
        if scheduler.get("rescale_betas_zero_snr"):
            out.append(LazyTensor("ztsnr", DTYPES["F16"], (0,), lambda: np.zeros((0,), np.float16)))
    if family in ("sd1", "sd2"):  # every SD1/SD2 checkpoint LDM saves has them (shared layouts sd15-*, sd21-*)
        made, note = _schedule_buffers(scheduler)
        out += made
        if note:
            notes.append(note)
    return out, notes


def _schedule_buffers(scheduler: Mapping) -> Tuple[List[LazyTensor], Optional[str]]:
    """LDM's twelve DDPM buffers from the scheduler config's betas (ddpm_schedule.py), float32 as
    LDM stores them; or why not."""
    from sdtk.architectures.ddpm_schedule import BUFFER_NAMES, ldm_buffers, schedule_of
    from sdtk.tensors import DTYPES

    sched = schedule_of(scheduler)
    if sched is None:
        return [], ("DDPM schedule buffers (alphas_cumprod, betas, ...) not recreated: the scheduler's betas "
                    f"({scheduler.get('beta_schedule')!r}) are not an LDM linear schedule (A1111 and ComfyUI "
                    "compute them from the schedule)")
    cache: Dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if not cache:
            cache.update(ldm_buffers(**sched))
        return cache[name]

    n = sched["timesteps"]
    made = [LazyTensor(name, DTYPES["F32"], (n,), lambda name=name: value(name)) for name in BUFFER_NAMES]
    note = None
    if scheduler.get("rescale_betas_zero_snr"):
        note = ("DDPM schedule buffers recreated from the plain schedule, as LDM stores them (zero terminal SNR "
                "is the sampler's rescaling, not in the file)")
    return made, note
