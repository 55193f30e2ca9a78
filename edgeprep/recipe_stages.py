"""The training and stage sections of a recipe: the shared ``train:`` defaults, one config per stage
kind (a discriminated union on ``kind``), and the cross-stage order rules. ``edgeprep.recipe``
re-exports every name here, so stages and the CLI import them from there.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edgeprep.registry import stage_spec, stage_specs


class Strict(BaseModel):
    """Every recipe section: unknown keys are errors (with their path), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- training
class DistillConfig(Strict):
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of KD loss; (1 - alpha) on ground-truth CE


class TrainConfig(Strict):
    """Defaults for every training stage; a stage may override any of them."""

    steps: int = Field(300, ge=1)  # optimizer steps
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    grad_accum_steps: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    checkpoint_every: int = Field(0, ge=0)  # 0: keep the last good weights in memory only
    # embedding targets only: weight of the MSE between the batch's pairwise cosine matrices
    # (student vs targets), which trains the neighbourhood structure retrieval depends on
    relation_weight: float = Field(0.0, ge=0)


class TrainOverrides(Strict):
    steps: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    grad_clip_norm: Optional[float] = Field(None, ge=0)  # 0 disables clipping
    grad_accum_steps: Optional[int] = Field(None, ge=1)
    eval_every: Optional[int] = Field(None, ge=0)
    checkpoint_every: Optional[int] = Field(None, ge=0)
    relation_weight: Optional[float] = Field(None, ge=0)

    def resolve(self, defaults: TrainConfig) -> TrainConfig:
        return defaults.model_copy(update=self.model_dump(exclude_none=True))


# ----------------------------------------------------------------------------- stages
class StageConfig(Strict):
    kind: str
    targets: list[str] = Field(default_factory=list)  # module FQNs or "re:<regex>"; empty = all
    ignore: list[str] = Field(default_factory=list)


class TrainingStageConfig(StageConfig):
    """A stage that trains with its own step budget: ``steps`` is shorthand for ``train.steps``."""

    steps: Optional[int] = Field(None, ge=1)
    train: TrainOverrides = Field(default_factory=TrainOverrides)

    @model_validator(mode="after")
    def _steps_agree(self) -> "TrainingStageConfig":
        if self.steps is not None and self.train.steps is not None and self.steps != self.train.steps:
            raise ValueError(f"steps ({self.steps}) and train.steps ({self.train.steps}) disagree; set one")
        return self

    def train_config(self, defaults: TrainConfig) -> TrainConfig:
        """The recipe's training defaults with this stage's overrides (and ``steps``) applied."""
        cfg = self.train.resolve(defaults)
        return cfg if self.steps is None else cfg.model_copy(update={"steps": self.steps})


class FinetuneConfig(StageConfig):
    """Train (or distill into) the current model with the shared training loop."""

    kind: Literal["finetune"] = "finetune"
    train: TrainOverrides = Field(default_factory=TrainOverrides)
    distill: Optional[DistillConfig] = None  # None: plain cross-entropy; else KD from the teacher


class PruneConfig(StageConfig):
    """Structural pruning (Adapt-Pruner): heads / MLP neurons / conv channels physically removed."""

    kind: Literal["prune"] = "prune"
    pruning_ratio: float = Field(gt=0, lt=1)  # fraction of the stage's input params (or MACs) removed
    budget: Literal["params", "macs"] = "params"
    allocation: Literal["adaptive", "uniform", "erk"] = "adaptive"
    schedule: Literal["incremental", "one-shot"] = "incremental"
    ratio_per_stage: float = Field(0.05, gt=0, le=1)  # incremental: share of the original removed per stage
    # allocation steps per stage, each on a fresh batch; None: steps of D = 0.02 mean sparsity (the paper's)
    inner_steps: Optional[int] = Field(None, ge=1)
    importance: Literal["taylor", "magnitude", "random"] = "taylor"
    units: Optional[list[Literal["heads", "mlp", "channels"]]] = None  # None: all the model has
    amplitude: float = Field(0.02, ge=0)  # A in s_l <- clip(s_l + D - A * I^_l)
    calibration_batch: int = Field(64, ge=1)  # samples per importance / Taylor batch
    # Training after each pruning stage; default: train.steps split evenly over the stages.
    steps_per_stage: Optional[int] = Field(None, ge=0)
    train: TrainOverrides = Field(default_factory=TrainOverrides)
    distill: Optional[DistillConfig] = Field(default_factory=DistillConfig)  # null: labels only

    @field_validator("units")
    @classmethod
    def _units(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("units must be a non-empty list without repeats, e.g. [heads, mlp]")
        return v


class QatLossWeights(Strict):
    """Weights of the distillation terms (the paper weighs all four 1)."""

    logits: float = Field(1.0, ge=0)  # soft cross-entropy on logits
    scores: float = Field(1.0, ge=0)  # MSE on attention scores, summed over layers
    hidden: float = Field(1.0, ge=0)  # MSE on hidden states (embeddings + every block output)
    attn_out: float = Field(1.0, ge=0)  # MSE on attention outputs (before residual + norm)


class QatConfig(TrainingStageConfig):
    """Quantization-aware training with Teacher Intervention, distilled from the stage's input model."""

    kind: Literal["qat"] = "qat"
    weights: Literal["int8", "int4", "ternary"] = "int8"
    activations: Literal["int8", "none"] = "int8"  # Linear inputs, Q, K, V and attention probabilities
    intervention: Literal["none", "m", "c", "o", "gradual"] = "gradual"
    # s: optimizer steps of step 1 (with intervention); None: 10% of the steps
    intervention_steps: Optional[int] = Field(None, ge=0)
    loss_weights: QatLossWeights = Field(default_factory=QatLossWeights)
    label_loss: float = Field(0.0, ge=0)  # weight of ground-truth cross-entropy; 0: none (the paper)
    # SmoothQuant migration strength alpha in (0, 1] for int8 Linear inputs (edgeprep.quant.smooth);
    # null: none. For post-LN BERT encoders with outlier channels; 0.85 on all-MiniLM-L6-v2.
    smoothing: Optional[float] = Field(None, gt=0, le=1)
    # int8: every nn.Embedding (under targets) gets per-row int8 weights (edgeprep.quant.embedding):
    # a sentence encoder's word-embedding table is most of its artifact's bytes
    embeddings: Literal["float", "int8"] = "float"
    # The CPU family the int8 artifact ships to (edgeprep.quant.cpu_family). portable / x86-avx2:
    # int8 weights on the [-63, 63] grid, exact on every family's int8 kernels (full-range weights
    # saturate AVX2's U8S8 kernel); x86-vnni / x86-sse4 / arm64: the full [-127, 127] grid, exact
    # there. Only int8 weights with int8 activations are affected.
    target_cpu: Literal["portable", "x86-avx2", "x86-vnni", "x86-sse4", "arm64"] = "portable"

    @model_validator(mode="after")
    def _intervention(self) -> "QatConfig":
        if self.intervention_steps and self.intervention == "none":
            raise ValueError("intervention_steps is set but intervention is none; set intervention: gradual|m|c|o")
        if self.smoothing is not None and self.activations != "int8":
            raise ValueError("smoothing applies to int8 activations; set activations: int8 or smoothing: null")
        return self


class ReparamConfig(TrainingStageConfig):
    """SLAB re-parameterization: LayerNorm -> PRepBN (folded away at export), optionally SLA attention."""

    kind: Literal["reparam"] = "reparam"
    # prepbn: progressive LN -> RepBN (the paper); repbn / bn: RepBN or plain BN from the first
    # step (the paper's ablations: a direct swap is the one that may collapse)
    norm: Literal["prepbn", "repbn", "bn"] = "prepbn"
    attention: Literal["keep", "sla"] = "keep"  # sla: Simplified Linear Attention (edgeprep's ViTs)
    warmup_steps: Optional[int] = Field(None, ge=0)  # lam = 1; None: 10% of the steps
    decay_steps: Optional[int] = Field(None, ge=0)  # lam 1 -> 0 linearly; None: 50% of the steps
    hidden_loss: float = Field(1.0, ge=0)  # weight of the MSE between teacher and student block outputs
    distill: Optional[DistillConfig] = Field(default_factory=DistillConfig)  # KD on logits; null: labels only

    @model_validator(mode="after")
    def _schedule(self) -> "ReparamConfig":
        if self.norm != "prepbn" and (self.warmup_steps or self.decay_steps):
            raise ValueError(f"warmup_steps / decay_steps apply to norm: prepbn, not {self.norm} "
                             "(which has no LayerNorm to decay)")
        return self

    def schedule(self, steps: int) -> tuple[int, int]:
        """(warmup_steps, decay_steps) for a stage of ``steps``: the configured ones, or 10% warmup
        then 50% decay (lam reaches 0 at 60% of the steps, leaving 40% to train the pure-BN model)."""
        if self.norm != "prepbn":
            return 0, 0
        warmup = self.warmup_steps if self.warmup_steps is not None else round(0.1 * steps)
        decay = self.decay_steps if self.decay_steps is not None else round(0.5 * steps)
        return warmup, decay


class BinarizeConfig(TrainingStageConfig):
    """BiPFT binarization: binary weights, binary / int8 / float activations, low-rank estimators."""

    kind: Literal["binarize"] = "binarize"
    weights: Literal["binary"] = "binary"  # BWN: sign(W - mean W) * mean|W|
    activations: Literal["binary", "int8", "none"] = "binary"  # Linear inputs, Q, K, V, attention probs
    estimator_rank: int = Field(1, ge=0)  # rank of the residual estimators; 0 turns them off
    keep_head: bool = True  # the classifier head (last Linear) stays full precision
    intervention: Literal["none", "m", "c", "o", "gradual"] = "none"  # Teacher Intervention (qat's)
    intervention_steps: Optional[int] = Field(None, ge=0)  # None: 10% of the steps when intervention is on
    # BiPFT distils hidden states (MSE) and logits (soft CE); attention terms are off by default
    loss_weights: QatLossWeights = Field(default_factory=lambda: QatLossWeights(scores=0.0, attn_out=0.0))
    label_loss: float = Field(0.0, ge=0)  # weight of ground-truth cross-entropy

    @model_validator(mode="after")
    def _intervention(self) -> "BinarizeConfig":
        if self.intervention_steps and self.intervention == "none":
            raise ValueError("intervention_steps is set but intervention is none; set intervention: gradual|m|c|o")
        return self


# ----------------------------------------------------------------------------- the registry's view
def _dispatch_stage(value: Any) -> Any:
    """A ``stages:`` item -> its kind's config (the registry's ``StageSpec.config``), so pydantic
    reports a nested error at its path (``stages.1.pruning_ratio``) and a plugin's kind is as
    valid as a built-in one."""
    if not isinstance(value, dict):
        return value  # an already-built config (the Python API), or a type error pydantic reports
    kinds = list(stage_specs())
    if "kind" not in value:
        raise PydanticCustomError("union_tag_not_found", "stage has no `kind`; valid kinds: {kinds}",
                                  {"kinds": ", ".join(kinds)})
    kind = value["kind"]
    if kind not in kinds:
        raise PydanticCustomError("union_tag_invalid", "unknown stage kind {kind}; valid kinds: {kinds}",
                                  {"kind": repr(kind), "kinds": ", ".join(kinds)})
    return stage_spec(kind).config.model_validate(value)


# A recipe's ``stages:`` entry: any registered kind's config (serialised with its own fields).
AnyStage = Annotated[SerializeAsAny[StageConfig], BeforeValidator(_dispatch_stage)]


def stage_kinds() -> tuple[str, ...]:
    return tuple(stage_specs())


def check_stage_order(kinds: list[str]) -> None:
    """Raise ValueError when ``kinds`` break the registered order rules: each ranked kind comes after
    every kind of a lower rank, conflicting kinds never share a recipe, required kinds come first."""
    specs = {k: stage_spec(k) for k in dict.fromkeys(kinds)}
    for kind, spec in specs.items():
        clash = sorted(spec.conflicts.intersection(kinds))
        if clash:
            raise ValueError(f"stages {' and '.join(sorted([kind, *clash]))} cannot both appear in one recipe")
    highest, highest_at = 0, -1
    for i, kind in enumerate(kinds):
        missing = [r for r in specs[kind].requires if r not in kinds[:i]]
        if missing:
            raise ValueError(f"stage {i} ({kind}) needs an earlier {' and '.join(missing)} stage")
        rank = specs[kind].rank
        if rank is None:
            continue
        if rank < highest:
            before = kinds[highest_at]
            ranked = sorted((s for s in stage_specs().values() if s.rank is not None), key=lambda s: s.rank)
            order = ", then ".join(" or ".join(s.kind for s in ranked if s.rank == r)
                                   for r in sorted({s.rank for s in ranked}))
            raise ValueError(f"stage {i} ({kind}) must come before stage {highest_at} ({before}): order is {order}")
        highest, highest_at = rank, i
