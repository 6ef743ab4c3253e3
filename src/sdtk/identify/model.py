"""What `identify` returns: plain dataclasses, JSON-ready (`to_json`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA = "sdtk.inspect/1"

# Severities: "error" (the file will misbehave), "warning" (likely a problem, or incomplete),
# "info" (worth knowing). Problems of severity warning or error make `sdtk inspect` exit 1.
SEVERITIES = ("error", "warning", "info")


@dataclass
class Problem:
    code: str  # stable identifier, e.g. "clip_position_ids_float"
    severity: str  # "error" | "warning" | "info"
    message_key: str  # key in the report message catalogues, e.g. "problem.clip_position_ids_float"
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> bool:
        return self.severity in ("error", "warning")


@dataclass
class Advice:
    code: str
    message_key: str
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Component:
    name: str  # unet, unet_ema, vae, text_encoder, text_encoder_2, text_encoder_3, ddpm_buffers, ...
    prefix: str  # key prefix as found in this file ("" for bare keys)
    keys: List[str] = field(default_factory=list)
    parameters: int = 0
    dtypes: Dict[str, int] = field(default_factory=dict)  # short dtype name -> tensor count
    bytes: int = 0
    model: Optional[str] = None  # what it is, when known: "clip-l", "clip-g", "t5-xxl", "kl-f8 (4 ch)"...

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "prefix": self.prefix, "model": self.model, "tensors": len(self.keys),
                "parameters": self.parameters, "dtypes": dict(self.dtypes), "bytes": self.bytes}


@dataclass
class Identity:
    path: str
    format: str  # safetensors, torch-zip, torch-legacy, pickle, diffusers-folder
    file_size: int
    kind: str  # checkpoint, diffusion-model, vae, text-encoder, lora, embedding, hypernetwork, controlnet, t2i-adapter, diffusers-pipeline, unknown
    architecture: str  # ModelSpec id or our own (docs/inspect.md), "unknown"
    family: Optional[str] = None
    variant: Optional[str] = None
    implementation: Optional[str] = None  # key naming: ldm, diffusers, kohya, peft, ...
    title: Optional[str] = None
    components: Dict[str, Component] = field(default_factory=dict)
    tensor_count: int = 0
    parameters: int = 0
    tensor_bytes: int = 0
    dtypes: Dict[str, int] = field(default_factory=dict)
    precision: str = "unknown"  # "fp16", "fp32", "bf16", "mixed fp32/fp16", ...
    has_ema: bool = False
    partial: bool = False
    missing_components: List[str] = field(default_factory=list)
    prediction_type: Optional[str] = None  # epsilon, v, flow, edm, v (zsnr) ... or None
    prediction_confidence: str = "none"  # high, medium, low, none
    prediction_source: Optional[str] = None  # marker, modelspec, kohya, architecture, family-default, heuristic, config
    zero_terminal_snr: bool = False
    prediction_evidence: List[Dict[str, Any]] = field(default_factory=list)  # every source, strongest first
    missing_keys: Dict[str, List[str]] = field(default_factory=dict)
    extra_keys: Dict[str, List[str]] = field(default_factory=dict)
    adapter: Optional[Dict[str, Any]] = None  # LoRA / embedding / hypernetwork / controlnet details
    metadata: Dict[str, Any] = field(default_factory=dict)  # summarised: modelspec, training, merge, lineage, other
    training_state: List[str] = field(default_factory=list)  # non-tensor training leftovers (pickles)
    safety: Dict[str, Any] = field(default_factory=dict)
    problems: List[Problem] = field(default_factory=list)
    advice: List[Advice] = field(default_factory=list)
    unknown_summary: Optional[Dict[str, Any]] = None  # for kind == unknown: prefixes, shapes, params
    deep: bool = False
    vae_comparison: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    quantization: Optional[Dict[str, Any]] = None  # GGUF (and other quantized forms): sdtk.identify.quantized

    @property
    def identified(self) -> bool:
        return self.kind != "unknown"

    @property
    def has_problems(self) -> bool:
        return any(p.counts for p in self.problems)

    def problem(self, code: str) -> Optional[Problem]:
        return next((p for p in self.problems if p.code == code), None)

    def to_json(self) -> Dict[str, Any]:
        """The language-neutral JSON object of schema sdtk.inspect/1 (docs/inspect.md)."""
        return {
            "schema": SCHEMA,
            "path": self.path, "format": self.format, "file_size": self.file_size,
            "kind": self.kind, "architecture": self.architecture, "family": self.family, "variant": self.variant,
            "implementation": self.implementation, "title": self.title,
            "tensor_count": self.tensor_count, "parameters": self.parameters, "tensor_bytes": self.tensor_bytes,
            "dtypes": dict(self.dtypes), "precision": self.precision, "has_ema": self.has_ema,
            "partial": self.partial, "missing_components": list(self.missing_components),
            "components": {n: c.to_json() for n, c in self.components.items()},
            "prediction": {"type": self.prediction_type, "confidence": self.prediction_confidence,
                           "source": self.prediction_source, "zero_terminal_snr": self.zero_terminal_snr,
                           "evidence": list(self.prediction_evidence)},
            "missing_keys": {c: list(k) for c, k in self.missing_keys.items()},
            "extra_keys": {c: list(k) for c, k in self.extra_keys.items()},
            "adapter": self.adapter, "metadata": self.metadata, "training_state": list(self.training_state),
            "safety": self.safety,
            "problems": [asdict(p) for p in self.problems],
            "advice": [asdict(a) for a in self.advice],
            "unknown": self.unknown_summary, "deep": self.deep, "vae_comparison": self.vae_comparison, "quantization": self.quantization,
            "notes": list(self.notes),
        }
