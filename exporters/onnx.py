"""ONNX exporter (target "onnx", runs on "onnxruntime") and its ORT-format sibling ("ort-mobile").

The dynamo exporter (torch.export) is tried first; if it raises, or its graph fails the self-check,
the TorchScript exporter is tried, and which one produced the file is recorded. Every file is
checked before it is described: onnx.checker, a symbolic batch dim on every input, and ORT really
running it at the example batch, at batch 3 and at batch 1 (profiling runs batch 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from edgeprep.errors import ExportError
from edgeprep.exporters.base import Exporter
from edgeprep.exporters.onnxruntime_rt import OPTIMIZE_LEVELS, create_session, one_line, root_logging_kept
from edgeprep.exporters.options import OnnxOptions
from edgeprep.exporters.residual_sum import residual_adds_to_sum
from edgeprep.fsutil import sha256_file
from edgeprep.manifest import describe_file
from edgeprep.quant.cpu_family import exact_families
from edgeprep.quant.export import exporting, is_quantized, quantization_summary
from edgeprep.quant.onnx_passes import finish_quantized_onnx
from edgeprep.types import Artifact, TensorSpec

MODEL_FILE = "model.onnx"
BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"  # dim 1 of every input with >= 2 dims, with dynamic_sequence (token models)
# Protobuf caps a file at 2 GB; below 1 GB every tensor is stored inline so the artifact is one file.
EXTERNAL_DATA_MIN_BYTES = 1 << 30
CHECK_BATCH = 3  # a batch the example did not use: proves the batch dim is really symbolic

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"step (\d+/\d+)")


def _short(exc: BaseException) -> str:
    """One line naming the failing step and the root cause.

    torch.onnx wraps the real error ("step 1/3 ... Next steps:" on top of, e.g., a
    GuardOnDataDependentSymNode); the wrapper's first line alone says nothing about the model.
    """
    top = _ANSI.sub("", one_line(exc))
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root, seen = nxt, seen | {id(nxt)}
    if root is exc:
        return top[:300]
    step = _STEP.search(top)
    where = f"{type(exc).__name__} at step {step.group(1)}" if step else type(exc).__name__
    return f"{where}: {_ANSI.sub('', one_line(root))}"[:300]


@contextlib.contextmanager
def _quiet_torch() -> Iterator[list]:
    """Keep the exporters' progress prints and log lines off the CLI's output; collect warnings."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            yield caught
    finally:
        logger.setLevel(level)


def _tensor_specs(values: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """TensorSpecs from graph inputs/outputs: dim 0 symbolic -> "batch", other symbols kept."""
    from onnx import helper

    specs = []
    for v in values:
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(BATCH_DIM if i == 0 else (d.dim_param or "?"))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        specs.append(TensorSpec(name=v.name, shape=tuple(dims), dtype=dtype))
    return tuple(specs)


def _check_batch_axis(example_inputs: Sequence[Any]) -> int:
    import torch

    if not example_inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in example_inputs):
        raise ExportError("onnx export needs example inputs that are tensors with a batch dim (dim 0)")
    batches = {int(x.shape[0]) for x in example_inputs}
    if len(batches) != 1:
        raise ExportError(f"example inputs disagree on the batch size (dim 0): {sorted(batches)}")
    batch = batches.pop()
    if batch < 2:
        raise ExportError(f"example batch is {batch}; export with a batch of at least 2: a batch-1 "
                          "example bakes batch 1 into some graphs (a fixed-size reshape or a squeezed dim)")
    return batch


@contextlib.contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Silence C++ writes to file descriptor 1 (Python-level redirects do not reach them).

    torch's TorchScript exporter always enables its C++ ONNX log (``setup_onnx_logging`` tests the
    function ``_jit_is_onnx_log_enabled`` instead of calling it) and dumps the whole IR graph to
    stdout when a conversion fails.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _input_names(model: Any, n: int) -> list[str]:
    # The dynamo exporter names inputs after forward()'s parameters; give TorchScript the same.
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _dynamic_dims(example, sequence: bool) -> list[dict[int, str]]:
    """Per input: which dims are symbolic, and their names."""
    return [{0: BATCH_DIM, 1: SEQUENCE_DIM} if sequence and x.dim() >= 2 else {0: BATCH_DIM} for x in example]


def _export_dynamo(model, example, path: Path, opset: int, external: bool, sequence: bool = False) -> None:
    import torch

    from edgeprep.models.loaders import ExportedProgramModule

    if isinstance(model, ExportedProgramModule):  # a .pt2 source: export its graph, not the wrapper
        model = model.program
    dims = {BATCH_DIM: torch.export.Dim(BATCH_DIM), SEQUENCE_DIM: torch.export.Dim(SEQUENCE_DIM, min=2)}
    dynamic_shapes = tuple({axis: dims[name] for axis, name in d.items()} for d in _dynamic_dims(example, sequence))
    with _quiet_torch():
        program = torch.onnx.export(model, tuple(example), dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes, external_data=external, verbose=False)
        program.save(str(path), external_data=external)
    if not external:
        _strip_node_metadata(path)


def _strip_node_metadata(path: Path) -> None:
    """Drop the dynamo exporter's per-node debug metadata (FX node text, stack traces, class
    hierarchy): on a small model it is half the file, and an edge artifact ships without it."""
    import onnx

    from edgeprep.measure.census import iter_nodes

    proto = onnx.load(str(path))
    for node in iter_nodes(proto.graph):
        del node.metadata_props[:]
    onnx.save_model(proto, str(path))


def _export_torchscript(model, example, path: Path, opset: int, external: bool, sequence: bool = False) -> list[str]:
    """TorchScript (tracing) export; returns its tracer warnings (signs a trace may be wrong)."""
    import torch
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        n_out = len(tree_leaves(model(*example)))
    in_names = _input_names(model, len(example))
    out_names = [f"output_{i}" for i in range(n_out)]
    axes = {**dict(zip(in_names, _dynamic_dims(example, sequence))), **{n: {0: BATCH_DIM} for n in out_names}}
    with _quiet_torch() as caught, _c_stdout_silenced():
        torch.onnx.export(model, tuple(example), str(path), dynamo=False, opset_version=opset,
                          input_names=in_names, output_names=out_names, dynamic_axes=axes,
                          do_constant_folding=True, verbose=False)
    if external:  # the TorchScript exporter inlines everything it can; move weights out when huge
        import onnx

        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data")
    return [" ".join(str(w.message).split())[:200] for w in caught if w.category.__name__ == "TracerWarning"]


def _self_check(model, example, path: Path, external: bool, optimize: str, keep: set[Path],
                sequence: bool = False) -> dict[str, Any]:
    """Raise with a reason unless the file is valid, has a symbolic batch and runs at any batch
    (and, with ``sequence``, at a shorter sequence too, matching the model there)."""
    import onnx
    import torch

    extra = sorted(p.name for p in path.parent.iterdir() if p != path and p not in keep)
    if not external and extra:
        raise ExportError(f"exporter wrote extra files {extra} (external data?) for a model under 1 GB")
    onnx.checker.check_model(str(path), full_check=False)
    proto = onnx.load(str(path), load_external_data=False)
    fixed = [i.name for i in proto.graph.input
             if not i.type.tensor_type.shape.dim or i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if fixed:
        raise ExportError(f"inputs {fixed} have a fixed batch dim in the exported graph")
    session = create_session(path, optimize, threads=1)
    names = [i.name for i in session.get_inputs()]
    example_batch = int(example[0].shape[0])
    checked, sqnr = [], None
    for batch in (example_batch, CHECK_BATCH, 1):
        idx = torch.arange(batch) % example_batch  # real example rows, repeated as needed
        xs = [x[idx] for x in example]
        outs = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, xs)})
        if any(o.shape[:1] != (batch,) for o in outs if o.ndim):
            raise ExportError(f"ORT output batch is not {batch}: {[o.shape for o in outs]}")
        if batch == CHECK_BATCH:
            from torch.utils._pytree import tree_leaves

            from edgeprep.measure.parity import parity

            with torch.no_grad():
                ref = [t.detach().cpu().numpy() for t in tree_leaves(model(*xs))]
            if len(ref) == len(outs):
                sqnr = parity(ref, outs)["sqnr_db"]
        checked.append(batch)
    if sequence:
        sqnr_short = _check_shorter_sequence(model, example, session, names)
        sqnr = sqnr_short if sqnr is None else min(sqnr, sqnr_short)
    return {"checked_batches": checked, "check_sqnr_db": sqnr, "opset": _opset(proto),
            "inputs": _tensor_specs(proto.graph.input), "outputs": _tensor_specs(proto.graph.output)}


def _check_sequence_axis(example: Sequence[Any]) -> int:
    """The example's sequence length (dim 1), long enough that a shorter one can be checked."""
    lengths = {int(x.shape[1]) for x in example if x.dim() >= 2}
    if len(lengths) != 1:
        raise ExportError(f"dynamic_sequence: the inputs with a sequence axis (dim 1) disagree on its length: "
                          f"{sorted(lengths) or 'none has one'}")
    length = lengths.pop()
    if length < 4:
        raise ExportError(f"dynamic_sequence: export with a sequence of at least 4 (got {length}), "
                          "so a shorter one can be checked")
    return length


def _check_shorter_sequence(model, example, session, names) -> float:
    """Run the first half of the example's sequence (dim 1) through ORT and the model: a graph
    with the example's length baked in fails here instead of on the first shorter input."""
    import torch
    from torch.utils._pytree import tree_leaves

    from edgeprep.measure.parity import parity

    length = _check_sequence_axis(example)
    xs = [x[:, :length // 2] if x.dim() >= 2 else x for x in example]
    outs = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, xs)})
    with torch.no_grad():
        ref = [t.detach().cpu().numpy() for t in tree_leaves(model(*xs))]
    if [r.shape for r in ref] != [o.shape for o in outs]:
        raise ExportError(f"at sequence {length // 2} ORT gives shapes {[o.shape for o in outs]}, the model "
                          f"{[r.shape for r in ref]}: the sequence axis is not dynamic in the graph")
    return parity(ref, outs)["sqnr_db"]


def _opset(proto: Any) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _clear(out_dir: Path, keep: set[Path]) -> None:
    """Remove what a failed attempt wrote (never a file that was there before the export)."""
    for p in out_dir.iterdir():
        if p.is_file() and p not in keep:
            p.unlink()


def write_ort_format(onnx_path: Path, fixed_batch: Optional[int] = None) -> dict[str, Any]:
    """Convert to ORT's mobile format (fixed "all" optimizations, portable: no NCHWc layout), next
    to ``onnx_path``, with ORT's mobile usability verdict of what was converted. ``fixed_batch``:
    convert a copy whose batch axis is fixed to that size (edgeprep.exporters.ort_mobile)."""
    from edgeprep.exporters.ort_mobile import fix_batch, mobile_usability

    with root_logging_kept():  # import first: the handler it installs must be gone before it logs
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir = onnx_path.parent
    # Its logger is set to DEBUG and announces "Created config in <tmp path>" through any handler.
    chatty = logging.getLogger("ort_format_model.utils")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgeprep-ort-") as tmp:
        source = onnx_path
        if fixed_batch is not None:  # same file name, so the .ort and its config keep the model's stem
            source = fix_batch(onnx_path, Path(tmp) / onnx_path.name, fixed_batch)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(source, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:
            raise ExportError(f"ORT-format conversion of {onnx_path.name} failed: {_short(exc)}") from None
        finally:
            chatty.setLevel(level)
        usability = mobile_usability(source)
    ort_file = onnx_path.with_suffix(".ort")
    config = onnx_path.with_suffix(".required_operators.config")
    if not ort_file.is_file() or not config.is_file():
        raise ExportError(f"ORT-format conversion did not write {ort_file.name} and {config.name}")
    return {"file": ort_file.name, "config": config.name, "sha256": sha256_file(ort_file),
            "fixed_batch": fixed_batch, "usability": usability}


class OnnxExporter(Exporter):
    target = "onnx"
    runtime = "onnxruntime"
    options_model = OnnxOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        import torch

        opts = OnnxOptions.of(options)
        if opts.optimize not in OPTIMIZE_LEVELS:
            raise ExportError(f"optimize {opts.optimize!r} is not one of {', '.join(OPTIMIZE_LEVELS)}")
        example = tuple(example_inputs)
        _check_batch_axis(example)
        if opts.dynamic_sequence:
            _check_sequence_axis(example)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # The contract says out_dir is empty; still, never delete a file this export does not own.
        keep = {p for p in out_dir.iterdir() if p.name not in (MODEL_FILE, MODEL_FILE + ".data")}
        size_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        external = size_bytes >= EXTERNAL_DATA_MIN_BYTES
        was_training = model.training
        model.eval()
        try:
            # A QAT model exports its integer form (Q/DQ, int8 weights); a float model is unchanged.
            with exporting(model) as quantized:
                info = self._first_working(model, example, out_dir / MODEL_FILE, opts, external, keep)
                if quantized:
                    info["quantization"] = quantization_summary(model)
                    storage = "u8" if (info.get("quantized_graph") or {}).get("u8_weights") else "s8"
                    partial = storage == "u8" and opts.int8_weights != "u8"
                    info["quantization"].update(
                        int8_weight_storage="mixed" if partial else storage,
                        exact_on_cpu_families=exact_families(info["quantization"]["reduced_range"],
                                                             "s8" if partial else storage))
        finally:
            model.train(was_training)
        path = out_dir / MODEL_FILE
        inputs, outputs = info.pop("inputs"), info.pop("outputs")
        info.update({"optimize": opts.optimize, "external_data": external, "torch": torch.__version__,
                     "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs]})
        if opts.mobile or opts.mobile_fixed_batch is not None:
            info["mobile"] = write_ort_format(path, opts.mobile_fixed_batch)
        return describe_file(opts.name or self.target, self.target, self.runtime, path, inputs, outputs,
                             info=info)

    @staticmethod
    def _first_working(model, example, path: Path, opts: OnnxOptions, external: bool,
                       keep: set[Path]) -> dict[str, Any]:
        """Dynamo first, then TorchScript; the first file that passes the self-check wins."""
        attempts = (["dynamo"] if opts.dynamo else []) + ["torchscript"]
        reasons: dict[str, str] = {}
        for exporter in attempts:
            _clear(path.parent, keep)
            try:
                if exporter == "dynamo":
                    _export_dynamo(model, example, path, opts.opset, external, opts.dynamic_sequence)
                    warns: list[str] = []
                else:
                    warns = _export_torchscript(model, example, path, opts.opset, external, opts.dynamic_sequence)
                passes = (finish_quantized_onnx(path, model, opts.binary_storage, opts.int8_weights,
                                                opts.u8_weight_layers) if is_quantized(model) else None)
                residual_sums = residual_adds_to_sum(path) if opts.residual_sum else 0
                check = _self_check(model, example, path, external, opts.optimize, keep, opts.dynamic_sequence)
                if passes is not None:
                    check["quantized_graph"] = passes
            except Exception as exc:  # any exporter failure: try the next one, keep the reason
                reasons[exporter] = _short(exc)
                continue
            if "dynamo" in reasons:
                fallback = f"dynamo export failed: {reasons['dynamo']}"
            else:
                fallback = None if opts.dynamo else "dynamo disabled in the recipe (dynamo: false)"
            return {"exporter": exporter, "fallback_reason": fallback, "tracer_warnings": warns[:3],
                    "residual_sums": residual_sums, **check}
        _clear(path.parent, keep)
        why = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        raise ExportError(f"ONNX export failed with every exporter ({why})")

    def derived(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_root: Path,
                options: Any) -> list[Artifact]:
        """ORT's own post-training quantization of ``artifact`` (``options.ptq``), role "ptq"."""
        from edgeprep.exporters.onnx_ptq import ptq_peers

        opts = OnnxOptions.of(options)
        if not opts.ptq or artifact.path.suffix != ".onnx":
            return []
        return ptq_peers(artifact, calib_inputs, Path(out_root), kinds=opts.ptq)


class OrtMobileExporter(OnnxExporter):
    """Target "ort-mobile": the same export, judged as the .ort file ORT Mobile would ship."""

    target = "ort-mobile"

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        opts = OnnxOptions.of(options).model_copy(update={"mobile": True})
        art = super().export(model, example_inputs, out_dir, opts)
        info = {**dict(art.info), "format": "ort", "source_onnx": art.path.name}
        fixed = opts.mobile_fixed_batch
        inputs, outputs = art.inputs, art.outputs
        if fixed is not None:  # the .ort takes exactly that many rows
            inputs, outputs = ([dataclasses.replace(t, shape=(fixed, *t.shape[1:])) for t in specs]
                               for specs in (art.inputs, art.outputs))
        return describe_file(art.name, self.target, self.runtime, art.dir / info["mobile"]["file"],
                             inputs, outputs, info=info)

    def derived(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_root: Path,
                options: Any) -> list[Artifact]:
        return []  # PTQ peers are made from the .onnx target
