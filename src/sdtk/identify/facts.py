"""What sdtk knows about a model, with evidence and confidence: the one source of truth that
inspect shows, convert and merge write (ModelSpec), and the library indexes.

Only facts of high confidence are written as ModelSpec (`modelspec_keys`); a guess (a family
default, a value heuristic) is written nowhere but in sdtk's own lineage record (`as_record`),
clearly labelled with its confidence. SD 2.x is named `stable-diffusion-v2-512` or
`-768-v` only when its prediction type is known with high confidence (SwarmUI and others read
the name as the prediction type)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# ModelSpec `prediction_type` takes these values only (ecosystem reference); flow/edm are not recorded there.
MODELSPEC_PREDICTIONS = ("epsilon", "v")
FAMILY_OF_PREFIX = (("flux", "flux"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-xl", "sdxl"),
                    ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
# identify's SD2 names -> ModelSpec's (ModelSpec README architecture list)
EVIDENCE_PROBLEMS = ("config_unreadable", "config_mismatch", "prediction_conflict", "programs_disagree")
SD2_BY_PREDICTION = {"v": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"}


@dataclass
class ModelFacts:
    architecture: Optional[str]  # identify's id ("stable-diffusion-v2" when 512/768-v is unknown); None when unknown
    prediction_type: Optional[str]  # "epsilon", "v", "flow", "edm" or None
    prediction_source: str  # marker, modelspec, kohya, config, architecture, heuristic, family-default, stated, unknown
    has_ema: bool
    identified_by: str  # "identify" or "key names"
    prediction_confidence: str = "none"  # high, medium, low, none
    zero_terminal_snr: bool = False
    variant: Optional[str] = None
    kind: str = "checkpoint"
    evidence: List[dict] = field(default_factory=list)
    problems: List = field(default_factory=list)  # identify's Problems about the evidence (contradictions, bad yaml)

    @property
    def family(self) -> str:
        a = self.architecture or ""
        return next((fam for prefix, fam in FAMILY_OF_PREFIX if a.startswith(prefix)), "unknown")

    @property
    def certain(self) -> bool:
        return self.prediction_confidence == "high" and self.prediction_type is not None

    @property
    def modelspec_prediction(self) -> Optional[str]:
        """`modelspec.prediction_type`: only when known with high confidence."""
        return self.prediction_type if (self.certain and self.prediction_type in MODELSPEC_PREDICTIONS) else None

    @property
    def modelspec_architecture(self) -> Optional[str]:
        """`modelspec.architecture`: SD2 only with its prediction type known for sure (else None:
        no ModelSpec block rather than a label that states a prediction type)."""
        arch = self.architecture
        if arch is None:
            return None
        if arch.startswith("stable-diffusion-v2") and arch in ("stable-diffusion-v2", *SD2_BY_PREDICTION.values()):
            return SD2_BY_PREDICTION.get(self.prediction_type) if self.certain else None
        return arch

    def stated(self, prediction: str) -> "ModelFacts":
        """These facts with the prediction type stated by the user (--prediction-type)."""
        arch = self.architecture
        if self.family == "sd2" and arch in ("stable-diffusion-v2", *SD2_BY_PREDICTION.values()):
            arch = SD2_BY_PREDICTION.get(prediction, arch)
        evidence = [{"source": "stated", "type": prediction, "confidence": "high", "detail": "--prediction-type"}] + self.evidence
        return ModelFacts(arch, prediction, "stated", self.has_ema, self.identified_by, "high", self.zero_terminal_snr,
                          self.variant, self.kind, evidence, list(self.problems))

    def as_record(self) -> Dict[str, object]:
        """For sdtk's lineage: what was known, with confidence and source (guesses included)."""
        return {"architecture": self.architecture, "prediction_type": self.prediction_type,
                "confidence": self.prediction_confidence, "source": self.prediction_source,
                **({"zero_terminal_snr": True} if self.zero_terminal_snr else {})}


def facts_of(ident, has_ema: Optional[bool] = None) -> ModelFacts:
    """ModelFacts of an Identity (sdtk.identify)."""
    arch = ident.architecture if ident.architecture != "unknown" else None
    if arch and arch.startswith("stable-diffusion-v2") and arch in SD2_BY_PREDICTION.values() and ident.prediction_confidence != "high":
        arch = "stable-diffusion-v2"  # named by a guess: keep the family name only
    return ModelFacts(arch, ident.prediction_type, ident.prediction_source or "unknown",
                      bool(ident.has_ema if has_ema is None else has_ema), "identify", ident.prediction_confidence,
                      ident.zero_terminal_snr, ident.variant, ident.kind, list(ident.prediction_evidence),
                      [p for p in ident.problems if p.code in EVIDENCE_PROBLEMS])


def merged_facts(inputs: List[ModelFacts]) -> ModelFacts:
    """What is known of a merge of `inputs` (the first is the base): the architecture when every
    input is of the same family; the prediction type with high confidence only when every input's
    is certain and the same (a merge of a v and an epsilon model is neither for sure)."""
    first = inputs[0]
    same_family = all(f.family == first.family for f in inputs)
    arch = first.architecture if same_family else None
    types = {f.prediction_type for f in inputs}
    if len(types) == 1 and all(f.certain for f in inputs):
        pred, conf, source = first.prediction_type, "high", "merge (every input: " + ", ".join(sorted({f.prediction_source for f in inputs})) + ")"
    elif len(types - {None}) == 1:
        pred, conf, source = next(iter(types - {None})), "medium", "merge (not every input is certain)"
    else:
        pred, conf, source = None, "none", "merge (the inputs disagree)" if len(types - {None}) > 1 else "unknown"
    if arch and arch in SD2_BY_PREDICTION.values() and conf != "high":
        arch = "stable-diffusion-v2"
    return ModelFacts(arch, pred, source, False, "merge", conf, all(f.zero_terminal_snr for f in inputs),
                      first.variant, first.kind, [], [])
