"""The recipe: pydantic models, ``extra="forbid"`` at every level; a stage is the config of its
registered kind (``edgeprep.registry``).

Everything that can be checked without running is checked here, at load time: unknown keys (with
their path, e.g. ``stages.1.pruning_ratio``), wrong types, unknown stage kinds and targets, and the
order of stages across the recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, SerializeAsAny, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from edgeprep.errors import RecipeError
from edgeprep.exporters.options import ExportOptions
from edgeprep.recipe_stages import (  # noqa: F401  (re-exported: the stage configs are part of the recipe's API)
    AnyStage,
    BinarizeConfig,
    DistillConfig,
    FinetuneConfig,
    PruneConfig,
    QatConfig,
    QatLossWeights,
    ReparamConfig,
    StageConfig,
    Strict,
    TrainConfig,
    TrainingStageConfig,
    TrainOverrides,
    check_stage_order,
    stage_kinds,
)
from edgeprep.registry import target_spec, target_specs
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
def _dispatch_target(value: Any) -> Any:
    """An ``export:`` item -> its target's options model (``TargetSpec.options``): an option of
    another target is an unknown key at its path (``export.0.ptq``)."""
    if not isinstance(value, dict):
        return value
    names = sorted(target_specs())
    if "target" not in value:
        raise PydanticCustomError("union_tag_not_found", "export entry has no `target`; valid targets: {names}",
                                  {"names": ", ".join(names)})
    if value["target"] not in names:
        raise PydanticCustomError("union_tag_invalid", "unknown target {target}; valid targets: {names}",
                                  {"target": repr(value["target"]), "names": ", ".join(names)})
    return target_spec(value["target"]).options.model_validate(value)


# An ``export:`` entry: any registered target's options (serialised with its own fields).
AnyTarget = Annotated[SerializeAsAny[ExportOptions], BeforeValidator(_dispatch_target)]


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
    stages: list[AnyStage] = Field(default_factory=list)
    export: list[AnyTarget] = Field(default_factory=list)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    gates: GatesConfig = Field(default_factory=GatesConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        check_stage_order([s.kind for s in self.stages])
        # Every directory the exports will write, including derived ones (-baseline, -ptq-*, -int8).
        names = [n for e in self.export for n in (e.artifact_name, f"{e.artifact_name}-baseline", *e.derived_names())]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"export: artifact name(s) {', '.join(dupes)} used twice; give each a distinct `name`")
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
    return ".".join("validate" if p == "validate_" else str(p) for p in loc)


MAX_PROBLEMS_SHOWN = 8  # a recipe with more problems than this is probably the wrong file


def _problem(e: Any) -> tuple[str, str]:
    """(path in the YAML, what is wrong there and how to fix it) for one pydantic error."""
    loc = _format_loc(tuple(e["loc"]))
    msg, kind = e["msg"], e["type"]
    if kind == "extra_forbidden":
        key = loc.rsplit('.', 1)[-1]
        owners = [n for n, spec in target_specs().items() if key in spec.options.model_fields] if loc.startswith("export.") else []
        msg = (f"unknown key {key!r}; it is an option of target {', '.join(owners)} only" if owners else
               f"unknown key {key!r}; remove it or check its spelling")
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


def parse_export_target(data: dict[str, Any], where: str) -> ExportOptions:
    """Validate one export target given outside a recipe (CLI options), with the same messages."""
    try:
        return TypeAdapter(AnyTarget).validate_python(dict(data))
    except ValidationError as err:
        raise RecipeError(_one_line(err, where).replace(": invalid recipe", ": invalid option", 1)) from None


def parse_stage_options(config_cls: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    """Validate a stage config given outside a recipe (CLI options), with the recipe's one-line messages."""
    try:
        return config_cls.model_validate(dict(data))  # an explicit None (e.g. --no-distill) is a value
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
