"""One stage on a checkpoint (`finetune`, `prune`, `reparam`, `qat`, `binarize`) and `export`: the
commands for chaining the pipeline by hand."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from edgeprep.cli.app import JSON_HELP, app, emit_json, err, out
from edgeprep.errors import EXIT_GATE_FAILED


@app.command()
def finetune(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
             output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
             steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
             batch_size: Optional[int] = typer.Option(None, help="Batch size."),
             distill: bool = typer.Option(False, help="Distill from the checkpoint's own model."),
             seed: int = typer.Option(0, help="Seed."),
             trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Train (or distill into) a checkpoint's model with the shared training loop."""
    from edgeprep.recipe import DistillConfig, FinetuneConfig, TrainOverrides
    from edgeprep.single_stage import apply_stage

    cfg = FinetuneConfig(train=TrainOverrides(steps=steps, lr=lr, batch_size=batch_size),
                         distill=DistillConfig() if distill else None)
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    out.print(f"finetune: {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def prune(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
          output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
          ratio: float = typer.Option(..., "--ratio", help="Fraction of params (or MACs) to remove, e.g. 0.5."),
          budget: str = typer.Option("params", help="What the ratio counts: params | macs."),
          allocation: str = typer.Option("adaptive", help="Per-layer sparsity: adaptive | uniform | erk."),
          schedule: str = typer.Option("incremental", help="incremental (prune/train stages) | one-shot."),
          importance: str = typer.Option("taylor", help="Unit scores: taylor | magnitude | random."),
          units: Optional[list[str]] = typer.Option(None, "--units", help="Repeat: heads, mlp, channels (default: all)."),
          ratio_per_stage: float = typer.Option(0.05, help="Incremental: share removed per stage."),
          steps: Optional[int] = typer.Option(None, help="Training steps in total, split over the stages."),
          steps_per_stage: Optional[int] = typer.Option(None, help="Training steps after each stage (overrides --steps)."),
          lr: Optional[float] = typer.Option(None, help="Peak learning rate of the recovery training."),
          amplitude: float = typer.Option(0.02, help="Adaptive amplitude A (0 = uniform)."),
          distill: bool = typer.Option(True, help="Distill from the unpruned model while training."),
          seed: int = typer.Option(0, help="Seed."),
          trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Prune heads / MLP neurons / conv channels physically (Adapt-Pruner), with recovery training."""
    from edgeprep.recipe import PruneConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(PruneConfig, {
        "pruning_ratio": ratio, "budget": budget, "allocation": allocation, "schedule": schedule,
        "importance": importance, "units": units or None, "ratio_per_stage": ratio_per_stage,
        "steps_per_stage": steps_per_stage, "amplitude": amplitude,
        "train": {k: v for k, v in {"steps": steps, "lr": lr}.items() if v is not None},
        "distill": {} if distill else None}, where="edgeprep prune")
    if not distill:
        cfg = cfg.model_copy(update={"distill": None})
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"prune: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def reparam(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
            output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
            norm: str = typer.Option("prepbn", help="LayerNorm replacement: prepbn | repbn | bn."),
            attention: str = typer.Option("keep", help="Attention: keep | sla (Simplified Linear Attention)."),
            warmup_steps: Optional[int] = typer.Option(None, help="Steps of pure LayerNorm (default: 10%)."),
            decay_steps: Optional[int] = typer.Option(None, help="Steps for lam 1 -> 0 (default: 50%)."),
            steps: int = typer.Option(300, help="Training steps."),
            lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
            hidden_loss: float = typer.Option(1.0, help="Weight of the block-output MSE to the teacher."),
            seed: int = typer.Option(0, help="Seed."),
            trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """PRepBN (LayerNorm -> BatchNorm, folded away at export) and optional SLA, distilled from the checkpoint."""
    from edgeprep.recipe import ReparamConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(ReparamConfig, {
        "norm": norm, "attention": attention, "warmup_steps": warmup_steps, "decay_steps": decay_steps,
        "steps": steps, "hidden_loss": hidden_loss, "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep reparam")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    notes = "; ".join(entry["notes"])
    out.print(f"reparam: {notes}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def qat(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
        output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
        weights: str = typer.Option("int8", help="Weight precision: int8 | int4 | ternary."),
        activations: str = typer.Option("int8", help="Activation precision: int8 | none."),
        intervention: str = typer.Option("gradual", help="Teacher Intervention: none | m | c | o | gradual."),
        intervention_steps: Optional[int] = typer.Option(None, help="Steps with intervention (default: 10%)."),
        steps: int = typer.Option(300, help="Training steps in total."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
        label_loss: float = typer.Option(0.0, help="Weight of the ground-truth loss (0: distillation only)."),
        smoothing: Optional[float] = typer.Option(
            None, help="SmoothQuant migration strength in (0, 1] for int8 Linear inputs (e.g. 0.85 for BERT)."),
        embeddings: str = typer.Option("float", help="Embedding tables: float | int8 (per-row int8 weights)."),
        target_cpu: str = typer.Option(
            "portable", help="CPU family the int8 artifact ships to: portable | x86-avx2 | x86-vnni | x86-sse4 | "
                             "arm64 (portable / x86-avx2: int8 weights on [-63, 63], exact on every family)."),
        seed: int = typer.Option(0, help="Seed."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """Quantization-aware training with Teacher Intervention, distilled from the checkpoint's model."""
    from edgeprep.recipe import QatConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(QatConfig, {
        "weights": weights, "activations": activations, "intervention": intervention,
        "intervention_steps": intervention_steps, "steps": steps, "label_loss": label_loss,
        "smoothing": smoothing, "embeddings": embeddings, "target_cpu": target_cpu,
        "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep qat")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"qat: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def binarize(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
             output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
             activations: str = typer.Option("binary", help="Activation precision: binary | int8 | none."),
             estimator_rank: int = typer.Option(1, help="Rank of the residual estimators (0: off)."),
             intervention: str = typer.Option("none", help="Teacher Intervention: none | m | c | o | gradual."),
             steps: int = typer.Option(300, help="Training steps."),
             lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
             label_loss: float = typer.Option(0.0, help="Weight of the ground-truth loss (0: distillation only)."),
             seed: int = typer.Option(0, help="Seed."),
             trust_pickle: bool = typer.Option(False, "--trust-pickle")) -> None:
    """BiPFT binarization (binary weights and activations, residual estimators), distilled from the checkpoint."""
    from edgeprep.recipe import BinarizeConfig, parse_stage_options
    from edgeprep.single_stage import apply_stage

    cfg = parse_stage_options(BinarizeConfig, {
        "activations": activations, "estimator_rank": estimator_rank, "intervention": intervention,
        "steps": steps, "label_loss": label_loss, "train": {"lr": lr} if lr is not None else {}},
        where="edgeprep binarize")
    entry = apply_stage(ckpt, output, cfg, seed=seed, trust_pickle=trust_pickle)
    note = entry["notes"][-1] if entry["notes"] else ""
    out.print(f"binarize: {note}; {entry['metric']['name']} {entry['metric']['value']:.4f} -> {output}")


@app.command()
def export(ckpt: Path = typer.Argument(..., help="Stage checkpoint directory."),
           target: str = typer.Option(..., "--target", "-t", help="Export target, e.g. onnx."),
           output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
           opset: int = typer.Option(20, help="ONNX opset (>= 18)."),
           optimize: str = typer.Option("extended", help="ORT graph optimization level."),
           mobile: bool = typer.Option(False, help="Also write ORT's .ort format."),
           static_batch: int = typer.Option(1, min=1, help="Batch the edge targets (executorch, litert, coreml, "
                                                          "tensorrt) are built for."),
           coreml_weights: str = typer.Option("auto", help="coreml: auto (the model's own compression), fp16, fp32, "
                                                          "int8, palettize4, palettize2 or int4-block."),
           coreml_target: Optional[str] = typer.Option(None, help="coreml: iOS16, iOS17 or iOS18 (default: the "
                                                                  "lowest the weights allow)."),
           dynamic_sequence: bool = typer.Option(False, "--dynamic-sequence",
                                                 help="onnx: token models take any sequence length (axis 1)."),
           int8_weights: str = typer.Option(
               "s8", help="onnx: int8 Gemm/MatMul weights as trained (s8) or as uint8 + zero point 128 (u8: same "
                          "numbers, exact on AVX2 x86 kernels for full-range weights, slower on VNNI)."),
           u8_weight_layer: list[str] = typer.Option(
               [], "--u8-weight-layer", help="onnx: store only this Linear's int8 weights as uint8 (repeatable); "
                                             "the fix a failed parity check names."),
           min_sqnr_db: float = typer.Option(
               40.0, help="The export's self-check (ONNX Runtime vs the PyTorch model, on this machine) must "
                          "reach this SQNR, else exit 1; recorded in the manifest for `validate`."),
           trust_pickle: bool = typer.Option(False, "--trust-pickle"),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Export a checkpoint to one target (artifact dir with manifest and reference data)."""
    from edgeprep.single_stage import export_checkpoint

    options: dict[str, Any] = {"target": target, "opset": opset, "optimize": optimize, "mobile": mobile,
                               "static_batch": static_batch}
    if target == "coreml":
        options.update(coreml_weights=coreml_weights, coreml_target=coreml_target)
    if dynamic_sequence:
        options["dynamic_sequence"] = True
    if int8_weights != "s8" or u8_weight_layer:
        options.update(int8_weights=int8_weights, u8_weight_layers=list(u8_weight_layer))
    art = export_checkpoint(ckpt, output, options, trust_pickle=trust_pickle, min_sqnr_db=min_sqnr_db)
    check = art.info.get("check_sqnr_db")  # the exporter's own run on this machine's runtime (ONNX)
    if as_json:
        emit_json({"name": art.name, "target": art.target, "path": str(art.path), "bytes": art.size_bytes,
                    "sha256": art.sha256, "check_sqnr_db": check,
                    "passed": check is None or check >= min_sqnr_db})
    else:
        out.print(f"exported {art.target}: {art.path} ({art.size_bytes:,} bytes, sha256 {art.sha256[:12]})"
                  + (f"; self-check {check:.1f} dB" if check is not None else ""))
    if check is not None and check < min_sqnr_db:  # a failed self-check is a failure, never a silent pass
        err.print(f"[red]error:[/red] {escape(str(output))}: the export's self-check on this machine reached SQNR "
                  f"{check:.2f} dB, below the {min_sqnr_db:g} dB expected; the artifact is kept for inspection: "
                  f"`edgeprep validate {escape(str(output))}` names the first diverging layer and the fix",
                  soft_wrap=True)
        raise typer.Exit(EXIT_GATE_FAILED)


