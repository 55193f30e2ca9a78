"""The recipe: pydantic models, ``extra="forbid"`` at every level, stages as a discriminated union.

Everything that can be checked without running is checked here, at load time: unknown keys (with
their path, e.g. ``stages.1.pruning_ratio``), wrong types, unknown stage kinds and targets, and the
order of stages across the recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeprep.errors import RecipeError
from edgeprep.recipe_stages import (  # noqa: F401  (re-exported: the stage configs are part of the recipe's API)
    EXCLUSIVE_KINDS, STAGE_CONFIGS, STAGE_KINDS, STAGE_RANK, BinarizeConfig, DistillConfig, FinetuneConfig,
    PruneConfig, QatConfig, QatLossWeights, ReparamConfig, StageConfig, StageUnion, Strict, TrainConfig,
    TrainingStageConfig, TrainOverrides, check_stage_order)
from edgeprep.remote.config import DeviceConfig


# ----------------------------------------------------------------------------- model / data
class ModelConfig(Strict):
    # zoo name | "package.module:factory" | path to .ts/.torchscript | .pt2 | .safetensors | .pt
    source: str
    kwargs: dict[str, Any] = Field(default_factory=dict)  # factory keyword arguments
    factory: Optional[str] = None  # "package.module:factory" that builds the module for .safetensors
    input_shape: Optional[list[int]] = None  # per-sample input shape when the source cannot tell
    trust_pickle: bool = False  # allow full-pickle .pt loading (runs code from the file!)


class DataConfig(Strict):
    # "digits" (8x8) | "digits32" (32x32 upsampled) | path to .npz (x, y) | image folder.
    # None: the zoo model's own data set (e.g. vit-bench -> digits32).
    source: Optional[str] = None
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    split_seed: int = 0
    image_size: Optional[list[int]] = None  # image folder: resize to [H, W]
    calibration_samples: int = Field(128, ge=1)
    # text sources ("docstrings"): tokens per sentence (truncate / pad); None: 128
    seq_len: Optional[int] = Field(None, ge=4, le=512)

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


# ----------------------------------------------------------------------------- export
OptimizeLevel = Literal["disable", "basic", "extended", "all"]


class ExportTargetConfig(Strict):
    target: str
    # artifact directory name under artifacts/; defaults to the target
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # onnx options
    opset: int = Field(20, ge=18)  # 20: Gelu is one op (at 18 it is 5 that ORT does not fuse back)
    dynamo: bool = True  # dynamo exporter, falling back to TorchScript (recorded in the report)
    optimize: OptimizeLevel = "extended"  # ORT graph optimization level used to run/profile
    mobile: bool = False  # also write ORT's .ort format
    mobile_fixed_batch: Optional[int] = Field(None, ge=1)  # .ort with the batch axis fixed (NNAPI / CoreML EPs)
    ptq: list[Literal["dynamic", "static"]] = Field(default_factory=list)  # ORT PTQ peers
    # binarized models: binary weights 1 bit each on disk (unpacked at load) or INT2 (MatMulNBits)
    binary_storage: Literal["packed1", "int2"] = "packed1"
    dynamic_sequence: bool = False  # token models: dim 1 of the inputs (sequence) is symbolic too
    residual_sum: bool = True  # onnx: residual Add -> LayerNorm as Sum (ORT's SkipLayerNorm fusion is slow)
    # onnx: int8 Gemm / MatMul weights as trained (s8) or as uint8 + zero point 128 (u8: same numbers,
    # exact on AVX2 x86 kernels without retraining, slower on VNNI; edgeprep.quant.cpu_family);
    # u8_weight_layers: only these Linears as uint8 (the fix a failed parity check names)
    int8_weights: Literal["s8", "u8"] = "s8"
    u8_weight_layers: list[str] = Field(default_factory=list)
    # executorch / litert options
    static_batch: int = Field(1, ge=1)  # edge programs run one fixed input shape
    # also the target's own int8 PTQ peer (executorch: PT2E + XNNPACKQuantizer; litert: ai-edge-quantizer;
    # tensorrt: ORT's QDQ quantizer with TensorRT's explicit-quantization settings)
    int8: bool = False
    # coreml options (exporters/coreml.py): weights as carried from the model or compressed anew,
    # and the minimum deployment target (None: the lowest the weights allow, iOS16 or iOS18)
    coreml_weights: Literal["auto", "fp16", "fp32", "int8", "palettize4", "palettize2", "int4-block"] = "auto"
    coreml_target: Optional[Literal["iOS16", "iOS17", "iOS18"]] = None
    # tensorrt options (exporters/tensorrt.py): the engine's optimization profile runs batch 1 to
    # max_batch, tuned at static_batch; a float artifact's engine precision
    max_batch: int = Field(32, ge=1)
    tensorrt_precision: Literal["fp16", "fp32"] = "fp16"

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        from edgeprep.exporters import EXPORTERS

        if v not in EXPORTERS:
            raise ValueError(f"unknown target {v!r}; valid targets: {', '.join(sorted(EXPORTERS))}")
        return v

    @property
    def artifact_name(self) -> str:
        return self.name or self.target


# ----------------------------------------------------------------------------- validate / gates
class ProfileConfig(Strict):
    warmup: int = Field(20, ge=0)
    iters: int = Field(200, ge=5)
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)


class ValidateConfig(Strict):
    split: Literal["train", "val", "test"] = "test"
    max_samples: Optional[int] = Field(None, ge=1)  # cap on eval samples for the task metric
    parity_samples: int = Field(256, ge=1)  # reference inputs stored in each manifest
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    # Profile every artifact on each of these devices too, over SSH, with the same profile settings.
    devices: list[DeviceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_device_labels(self) -> "ValidateConfig":
        labels = [d.name or d.url for d in self.devices]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"devices listed twice: {', '.join(dup)}; give each a distinct name")
        return self


class GatesConfig(Strict):
    max_metric_drop: Optional[float] = Field(None, ge=0)  # baseline metric - artifact metric
    min_sqnr_db: Optional[float] = None
    # fraction of reference rows whose argmax matches the PyTorch model's (class logits only: on an
    # embedding model it fails, saying it does not apply); like the two above, judged on the host
    # and on every device entry (ssh:// and emu://)
    min_top1_agreement: Optional[float] = Field(None, ge=0, le=1)
    max_latency_ms_p90: Optional[float] = Field(None, gt=0)
    min_speedup: Optional[float] = Field(None, gt=0)  # baseline fp32 p50 / artifact p50
    max_size_bytes: Optional[int] = Field(None, gt=0)
    # An artifact whose runtime cannot run on this machine (Core ML off macOS, TensorRT without a
    # GPU) has nothing measured: "fail" (default) fails its gates; "skip" records them as skipped,
    # with the reason, for a recipe that exports for devices CI does not have.
    unavailable_runtimes: Literal["fail", "skip"] = "fail"


# ----------------------------------------------------------------------------- recipe
class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageUnion] = Field(default_factory=list)
    export: list[ExportTargetConfig] = Field(default_factory=list)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    gates: GatesConfig = Field(default_factory=GatesConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        check_stage_order([s.kind for s in self.stages])
        # Every directory the exports will write, including derived ones (-baseline, -ptq-*).
        names = [n for e in self.export
                 for n in (e.artifact_name, f"{e.artifact_name}-baseline", *(f"{e.artifact_name}-ptq-{k}" for k in e.ptq),
                           *([f"{e.artifact_name}-int8", f"{e.artifact_name}-baseline-int8"] if e.int8 else []))]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"export: artifact name(s) {', '.join(dupes)} used twice; give each a distinct `name`")
        for i, e in enumerate(self.export):
            if e.target != "onnx" and (e.ptq or e.mobile):
                raise ValueError(f"export.{i}: `ptq` and `mobile` apply to target onnx only, not {e.target}")
            if e.target != "coreml" and (e.coreml_weights != "auto" or e.coreml_target is not None):
                raise ValueError(f"export.{i}: `coreml_weights` and `coreml_target` apply to target coreml only, "
                                 f"not {e.target}")
            if e.int8 and e.target not in ("executorch", "litert", "tensorrt"):
                raise ValueError(f"export.{i}: `int8` applies to targets executorch, litert and tensorrt, not "
                                 f"{e.target} (for onnx use `ptq: [static]`)")
            if e.target != "tensorrt" and (e.max_batch != 32 or e.tensorrt_precision != "fp16"):
                raise ValueError(f"export.{i}: `max_batch` and `tensorrt_precision` apply to target tensorrt only, "
                                 f"not {e.target}")
            if e.target == "tensorrt" and e.static_batch > e.max_batch:
                raise ValueError(f"export.{i}: static_batch {e.static_batch} exceeds max_batch {e.max_batch}")
        sla_at = next((i for i, st in enumerate(self.stages)
                       if isinstance(st, ReparamConfig) and st.attention == "sla"), None)
        qat_at = next((i for i, st in enumerate(self.stages) if isinstance(st, QatConfig)), None)
        if qat_at is not None:
            from edgeprep.exporters.base import QAT_TORCH_EXPORT_FIX, TORCH_EXPORT_TARGETS

            for i, e in enumerate(self.export):
                if e.target in TORCH_EXPORT_TARGETS:
                    raise ValueError(f"export.{i}: target {e.target} cannot take the QAT model of stages.{qat_at} "
                                     f"yet; {QAT_TORCH_EXPORT_FIX}")
        if sla_at is not None and qat_at is not None:
            raise ValueError(f"stages.{qat_at}: qat after reparam with attention: sla (stages.{sla_at}) is not "
                             "supported yet (its quantizers and Teacher Intervention tap softmax attention); "
                             "use attention: keep")
        for i, st in enumerate(self.stages):
            if isinstance(st, ReparamConfig) and st.norm == "prepbn":
                steps = st.train_config(self.train).steps
                warmup, decay = st.schedule(steps)
                if warmup + decay > steps:
                    raise ValueError(f"stages.{i}: warmup_steps + decay_steps ({warmup} + {decay}) exceed the "
                                     f"stage's {steps} steps, so LayerNorm would remain and nothing could be "
                                     f"exported; raise steps or lower them")
        if self.gates.min_speedup is not None and not self.export:
            raise ValueError("gates.min_speedup needs at least one export target")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _format_loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator value into the path ("stages.0.finetune.lr"); drop it so the
    # path is the one the user sees in the YAML ("stages.0.lr").
    parts = list(loc)
    if len(parts) >= 3 and parts[0] == "stages" and isinstance(parts[1], int) and parts[2] in STAGE_KINDS:
        del parts[2]
    return ".".join("validate" if p == "validate_" else str(p) for p in parts)


MAX_PROBLEMS_SHOWN = 8  # a recipe with more problems than this is probably the wrong file


def _problem(e: Any) -> tuple[str, str]:
    """(path in the YAML, what is wrong there and how to fix it) for one pydantic error."""
    loc = _format_loc(tuple(e["loc"]))
    msg, kind = e["msg"], e["type"]
    if kind == "extra_forbidden":
        msg = f"unknown key {loc.rsplit('.', 1)[-1]!r}; remove it or check its spelling"
    elif kind == "union_tag_invalid":
        msg = f"unknown stage kind {e['input'].get('kind')!r}" if isinstance(e.get("input"), dict) else msg
        msg += f"; valid kinds: {', '.join(STAGE_KINDS)}"
    elif kind == "union_tag_not_found":
        msg = f"stage has no `kind`; valid kinds: {', '.join(STAGE_KINDS)}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return loc, msg


def _one_line(err: ValidationError, source: str) -> str:
    """Every problem pydantic found (up to MAX_PROBLEMS_SHOWN), on one line: the key a user mistyped
    is often not the first one reported."""
    problems = [_problem(e) for e in err.errors()]
    shown = [f"at {loc}: {msg}" if loc else msg for loc, msg in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) == 1:
        loc, msg = problems[0]
        return f"{source}: invalid recipe{f' at {loc}' if loc else ''}: {msg}"
    more = f" (+{len(problems) - MAX_PROBLEMS_SHOWN} more not shown)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    numbered = " ".join(f"({i}) {text}" for i, text in enumerate(shown, 1))
    return f"{source}: invalid recipe, {len(problems)} problems: {numbered}{more}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with at least `name` and `model`")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_one_line(err, source)) from None


def parse_export_target(data: dict[str, Any], where: str) -> ExportTargetConfig:
    """Validate one export target given outside a recipe (CLI options), with the same messages."""
    try:
        return ExportTargetConfig.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_one_line(err, where)) from None


def parse_stage_options(config_cls: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    """Validate a stage config given outside a recipe (CLI options), with the recipe's one-line messages."""
    try:
        return config_cls.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as err:
        raise RecipeError(_one_line(err, where).replace(": invalid recipe", ": invalid option", 1)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; `edgeprep recipes` lists the bundled ones")
    try:
        data = yaml.safe_load(path.read_text())
        return parse_recipe(data, str(path))
    except RecursionError:
        # PyYAML's composer and pydantic both recurse per nesting level; no recipe needs more than a few
        raise RecipeError(f"{path}: nested thousands of levels deep; a recipe is a few levels of mappings "
                          "and lists (see `edgeprep recipes quickstart`)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise RecipeError(f"{path}:{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file; a recipe is UTF-8 YAML") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror}); check its permissions") from None
