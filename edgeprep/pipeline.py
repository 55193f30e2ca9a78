"""Run a recipe: load, the stages (a checkpoint after each), then ``edgeprep.finish`` (export, judge, report).

Run directory layout (README; report.json: docs/report-schema.md):
  recipe.yaml                      the resolved recipe
  stages/<i>-<kind>/checkpoint/    checkpoint.json + model.safetensors (atomic)
  stages/<i>-<kind>/done.json      marker with the stage's report entry; a stage is done only then
  artifacts/<name>/                exported files + manifest.json + reference.npz (atomic)
  report.json, report.md, report.html, plots/
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from edgeprep.context import Context, StageReport
from edgeprep.data import BUILTIN_SOURCES
from edgeprep.errors import BadInputError, RuntimeFailure
from edgeprep.finish import finish
from edgeprep.fsutil import write_json_atomic, write_text_atomic
from edgeprep.jsonfile import JsonFileError, read_json_object
from edgeprep.measure.metrics import extra_metrics, metric_for, torch_outputs
from edgeprep.recipe import Recipe, load_recipe
from edgeprep.text_data import TEXT_SOURCES

DONE_MARKER = "done.json"
REPORT_FILES = ("report.json", "report.md", "report.html")
# Stage kinds that keep the model a plain fp32 model of the same structure: the fp32 baseline is
# the model after the leading run of these (e.g. the quickstart's training), before compression.
NON_COMPRESSING_KINDS = frozenset({"finetune"})

Log = Callable[[str], None]


@dataclass
class RunOptions:
    out_dir: Optional[Path] = None
    resume: bool = False
    force: bool = False
    trust_pickle: bool = False
    progress: bool = True
    log: Log = print


def run_recipe(recipe_path: Path, opts: RunOptions) -> dict[str, Any]:
    recipe = load_recipe(recipe_path)
    return run(recipe, Path(recipe_path).resolve().parent, opts)


def run(recipe: Recipe, base_dir: Path, opts: RunOptions) -> dict[str, Any]:
    from edgeprep.train import is_main_process

    run_dir = Path(opts.out_dir) if opts.out_dir else Path("runs") / recipe.name
    main = is_main_process()
    state = _load_inputs(recipe, base_dir, opts)  # bad model/data fail before anything is written
    for dcfg in recipe.validate_.devices:  # and a device's missing key file, before hours of training
        dcfg.to_device(base_dir)
    if main:
        _prepare_run_dir(run_dir, recipe, opts)
    model, baseline_model, stage_entries = _run_stages(recipe, state, run_dir, opts, main)
    _check_ranks_agree(model, opts)
    if not main:  # under torchrun only rank 0 exports, validates and reports
        return {}
    compressed = _first_compression(recipe) < len(recipe.stages)
    return finish(recipe, state, run_dir, model, baseline_model, stage_entries, compressed, opts)


# ----------------------------------------------------------------------------- run dir
def _prepare_run_dir(run_dir: Path, recipe: Recipe, opts: RunOptions) -> None:
    recipe_yaml = recipe.to_yaml()
    stored = run_dir / "recipe.yaml"
    if _holds_results(run_dir):
        if opts.force:
            if not stored.is_file():  # never rmtree a folder edgeprep did not create
                raise BadInputError(f"{run_dir} holds results but no recipe.yaml, so it is not an edgeprep run "
                                    "directory; --force will not delete it; choose another --out")
            shutil.rmtree(run_dir)
        elif opts.resume:
            if stored.is_file() and stored.read_text() != recipe_yaml:
                raise BadInputError(f"{run_dir}: the recipe changed since this run started; "
                                    "resume needs the same recipe (use --force to start over)")
            for name in REPORT_FILES:  # rewritten at the end; a stale one must not outlive new artifacts
                (run_dir / name).unlink(missing_ok=True)
            _remove_temporaries(run_dir)
        else:
            raise BadInputError(f"{run_dir} already holds a run; pass --resume to continue it, "
                                "--force to start over, or --out DIR for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stored, recipe_yaml)


def _remove_temporaries(run_dir: Path) -> None:
    """Drop what a killed run was writing (fsutil's ``.<name>.*.tmp`` files and directories)."""
    for p in sorted(run_dir.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _holds_results(run_dir: Path) -> bool:
    """A completed stage, artifact or report: something a user would not want silently replaced."""
    return run_dir.is_dir() and (any(run_dir.glob(f"stages/*/{DONE_MARKER}")) or (run_dir / "report.json").exists()
                                 or any(run_dir.glob("artifacts/*/manifest.json")))


@dataclass
class _Inputs:
    data: Any
    data_cfg: Any  # the resolved DataConfig (source filled in, paths absolute)
    base_dir: Path  # the recipe's folder: relative paths and local factories resolve against it
    trust_pickle: bool  # recipe.model.trust_pickle or --trust-pickle
    model: torch.nn.Module
    model_name: str
    example_inputs: tuple[torch.Tensor, ...]
    eval_x: torch.Tensor
    eval_y: torch.Tensor


def _load_inputs(recipe: Recipe, base_dir: Path, opts: RunOptions) -> _Inputs:
    from edgeprep.data import load_data
    from edgeprep.models import load_model

    handle = load_model(recipe.model, base_dir=base_dir, trust_pickle=opts.trust_pickle)
    data_cfg = recipe.data
    if data_cfg.source is None:
        if not handle.data:
            raise BadInputError(f"model {recipe.model.source!r} has no default data set; set data.source "
                                "(digits, digits32, a .npz file or an image folder)")
        data_cfg = data_cfg.model_copy(update={"source": handle.data})
    if data_cfg.source not in BUILTIN_SOURCES + TEXT_SOURCES and (base_dir / data_cfg.source).exists():  # a path: make it absolute so checkpoints are portable
        data_cfg = data_cfg.model_copy(update={"source": str((base_dir / data_cfg.source).resolve())})
    if data_cfg.source in TEXT_SOURCES:
        from edgeprep.text_data import load_text_data

        data = load_text_data(data_cfg, handle)
    else:
        if handle.tokenizer is not None:
            raise BadInputError(f"model {handle.name} is a text model; its data.source must be text "
                                f"({', '.join(TEXT_SOURCES)}), not {data_cfg.source!r}")
        data = load_data(data_cfg, base_dir=base_dir)
    if handle.input_shape is not None and tuple(handle.input_shape) != tuple(data.input_shape):
        raise BadInputError(f"model {handle.name} expects inputs of shape {tuple(handle.input_shape)} but data "
                            f"{data.name} gives {tuple(data.input_shape)}; choose matching data.source")
    split = data.split(recipe.validate_.split)
    n = recipe.validate_.max_samples or len(split)
    # A real batch of 2: exporting with batch 1 bakes batch 1 into some graphs.
    example = (split.x[:2].clone(),)
    trust = opts.trust_pickle or recipe.model.trust_pickle
    return _Inputs(data, data_cfg, base_dir, trust, handle.module, handle.name, example, split.x[:n], split.y[:n])


# ----------------------------------------------------------------------------- stages
def _stage_dir(run_dir: Path, i: int, kind: str) -> Path:
    return run_dir / "stages" / f"{i}-{kind}"


def _done_entry(marker: Path, i: int) -> dict[str, Any]:
    """A completed stage's report entry, as ``done.json`` stored it on the earlier run."""
    try:
        return read_json_object(marker)
    except JsonFileError as exc:
        raise BadInputError(f"{marker}: {exc}; delete that file to rerun stage {i} with --resume") from None


def _first_compression(recipe: Recipe) -> int:
    for i, st in enumerate(recipe.stages):
        if st.kind not in NON_COMPRESSING_KINDS:
            return i
    return len(recipe.stages)


def _run_stages(recipe: Recipe, state: _Inputs, run_dir: Path, opts: RunOptions, main: bool):
    from edgeprep.checkpoint import load_checkpoint, save_checkpoint
    from edgeprep.stages import run_stage

    model = state.model.eval()
    decisions: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    first_compression = _first_compression(recipe)
    baseline_model = frozen_copy(model) if first_compression == 0 < len(recipe.stages) else (
        model if not recipe.stages else None)
    metric_name, metric_fn = metric_for(state.data.task)
    for i, cfg in enumerate(recipe.stages):
        sdir = _stage_dir(run_dir, i, cfg.kind)
        marker = sdir / DONE_MARKER
        if opts.resume and marker.is_file():
            ckpt = load_checkpoint(sdir / "checkpoint", trust_pickle=state.trust_pickle)
            model, decisions = ckpt.model.eval(), list(ckpt.decisions)
            entries.append(_done_entry(marker, i))
            opts.log(f"stage {i} ({cfg.kind}): done in an earlier run, loaded its checkpoint")
        else:
            opts.log(f"stage {i} ({cfg.kind}): running")
            ctx = Context(data=state.data, train=recipe.train, example_inputs=state.example_inputs,
                          seed=recipe.seed + i, report=StageReport(kind=cfg.kind),
                          teacher=frozen_copy(model), run_dir=run_dir, stage_dir=sdir,
                          progress=opts.progress, decisions=decisions)
            if main:
                sdir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            model = run_stage(cfg, model, ctx)
            seconds = time.perf_counter() - t0
            decisions = ctx.decisions
            entry = _stage_entry(cfg.kind, seconds, model, state, ctx.report, metric_name, metric_fn)
            if main:
                meta = {"stage": i, "kind": cfg.kind, "input_shape": list(state.data.input_shape),
                        "data": state.data_cfg.model_dump(mode="json"), "task": state.data.task}
                save_checkpoint(sdir / "checkpoint", model, recipe.model, decisions, meta, base_dir=state.base_dir)
                write_json_atomic(marker, entry)  # after the checkpoint: the marker means "complete"
            entries.append(entry)
            opts.log(f"stage {i} ({cfg.kind}): {metric_name} {entry['metric']['value']:.4f} "
                     f"in {seconds:.1f} s")
        if i + 1 == first_compression:
            # Later stages change the model in place: keep the fp32 baseline as its own copy.
            baseline_model = frozen_copy(model) if first_compression < len(recipe.stages) else model
    if baseline_model is None:
        baseline_model = model
    return model, baseline_model, entries


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_ranks_agree(model: torch.nn.Module, opts: RunOptions) -> None:
    """Under torchrun, every rank must end with bit-identical weights; rank 0 is the one exported."""
    from edgeprep.train import init_distributed, world_info

    if world_info()[1] <= 1 or not init_distributed():
        return
    import torch.distributed as dist

    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeFailure(f"DDP ranks disagree on the final weights (sha256 {', '.join(d[:12] for d in digests)}); "
                             "rerun with --debug and report it")
    opts.log(f"{len(digests)} ranks agree on the final weights (sha256 {digests[0][:12]})")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with no gradients: the teacher of a stage, or the kept fp32 baseline."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _stage_entry(kind, seconds, model, state: _Inputs, report: StageReport, metric_name, metric_fn):
    from edgeprep.measure.cost import count_macs, count_params

    outputs, labels = torch_outputs(model, state.eval_x), state.eval_y.numpy()
    metric = {"name": metric_name, "value": metric_fn(outputs, labels),
              **extra_metrics(state.data.task, outputs, labels)}
    return {"kind": kind, "seconds": round(seconds, 3), "params": count_params(model),
            "macs": count_macs(model, (state.example_inputs[0][:1],)),
            "metric": metric, "notes": list(report.notes),
            "details": dict(report.metrics)}
