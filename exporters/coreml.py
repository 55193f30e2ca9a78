"""Core ML exporter (target "coreml") and runtime: an ML Program (.mlpackage) run by Core ML.

Export (extra ``coreml``): the model is traced at a static batch and converted by coremltools to
an ML Program. Weights (``coreml_weights``):

  auto        the model's own compression carried over exactly: a QAT int8 / int4 Linear keeps
              its integer codes and per-channel scales (``constexpr_affine_dequantize``, or
              ``constexpr_blockwise_shift_scale`` on iOS18, which int4 needs); a ternary Linear
              becomes a 2-bit palette holding exactly {-alpha, 0, alpha}. Every other weight fp16.
  fp16 / fp32 every weight in that precision (a QAT model's weights as their dequantized values).
  int8        coremltools' per-channel symmetric int8 of every weight (post-training).
  palettize4 / palettize2
              coremltools' k-means palettization, 4 or 2 bits per weight (post-training).
  int4-block  coremltools' per-block int4 (block 32 along the input axis); needs iOS18.

Core ML compresses weights only: activations run in fp16 (fp32 with ``coreml_weights: fp32``),
so a QAT model's int8 activation quantizers are left out of the Core ML program (the manifest
says so). Binarized models are refused: Core ML has no binary activation kernels.

After saving, the package is read back (``spec_summary``): op types, weight dtypes, I/O names and
shapes, deployment target; carried weights are decompressed from the saved file and compared
with the model's own integers (``carried.codes_identical``). That is what can be checked here:
Core ML prediction exists only on macOS, so the runtime reports itself unusable elsewhere and the
pipeline records the artifact as "not run here" with that reason.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import BadInputError, ExportError, MissingDependencyError, RuntimeFailure
from edgeprep.exporters.base import (
    Exporter,
    LoadedModel,
    Runtime,
    float32_feed,
    package_version,
    short_error,
    static_example,
)
from edgeprep.exporters.options import CoreMLOptions, CoreMLWeights
from edgeprep.manifest import describe_file
from edgeprep.types import Artifact, TensorSpec

MODEL_DIR = "model.mlpackage"
INPUT_NAME, OUTPUT_NAME = "input", "output"
# Core ML specification version of each minimum deployment target we offer (ML Program needs iOS15;
# the constexpr weight ops need iOS16; int4 and per-block scales need iOS18).
SPEC_VERSIONS = {"iOS16": 7, "iOS17": 8, "iOS18": 9}
WeightsMode = CoreMLWeights
NEEDS_IOS18 = ("int4-block",)
INT4_BLOCK = 32
SMALL_CONST_ELEMENTS = 64  # consts below this are shapes / axes / pads, not weights


def _ct() -> Any:
    import importlib.util

    if importlib.util.find_spec("coremltools") is None:
        raise MissingDependencyError("the coreml target needs coremltools: pip install 'edgeprep[coreml]'")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with _quiet(), _fd2_silenced():  # its import chain prints version and torchao-library warnings
        import coremltools

    return coremltools


@contextlib.contextmanager
def _fd2_silenced() -> Any:
    """Silence file descriptor 2 (C-level and early Python prints that redirect_stderr misses)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet() -> Any:
    """coremltools prints progress bars and version warnings; an export prints one line or none."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- carried weights
@dataclass
class CarriedWeight:
    """One compressed Linear weight of the model, as integers the Core ML program must hold."""

    module: str
    mode: str  # "int8" | "int4" | "ternary"
    codes: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float32 [out]
    mil_name: Optional[str] = None  # the MIL const it became (set when found)

    @property
    def dense(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scales[:, None]


def float_copy(model: Any) -> tuple[Any, list[CarriedWeight], list[str]]:
    """A copy of ``model`` Core ML can trace: every QuantLinear becomes an nn.Linear holding its
    dequantized weight (codes * scales, exact in fp32) and every activation quantizer an identity.
    Returns (copy, the integer weights to carry, notes)."""
    import torch
    from torch import nn

    from edgeprep.binary.modules import BinaryLinear
    from edgeprep.quant.fake import LsqQuantizer
    from edgeprep.quant.linear import QuantLinear

    if any(isinstance(m, BinaryLinear) for m in model.modules()):
        raise ExportError("coreml: binarized models are not supported (Core ML has no binary activation kernels); "
                          "export them with target onnx")
    model = copy.deepcopy(model).eval()
    carried, notes, dropped = [], [], 0
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            codes, scales = m.integer_weight()
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(codes.float() * scales[:, None])
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _set(model, name, lin)
            carried.append(CarriedWeight(name, m.weight_mode, codes.numpy(), scales.numpy()))
        elif isinstance(m, LsqQuantizer):
            _set(model, name, nn.Identity())
            dropped += 1
    if dropped:
        notes.append(f"{dropped} int8 activation quantizers left out: Core ML compresses weights only, activations "
                     "run in fp16")
    return model, carried, notes


def _set(model: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _deployment_target(opts: CoreMLOptions, carried: Sequence[CarriedWeight]) -> str:
    needs18 = opts.coreml_weights in NEEDS_IOS18 or (
        opts.coreml_weights == "auto" and any(c.mode == "int4" for c in carried))
    if opts.coreml_target is None:
        return "iOS18" if needs18 else "iOS16"
    if needs18 and opts.coreml_target != "iOS18":
        what = "int4 weights" if opts.coreml_weights == "auto" else f"coreml_weights {opts.coreml_weights}"
        raise BadInputError(f"coreml: {what} need coreml_target iOS18 (got {opts.coreml_target}); set "
                            "coreml_target: iOS18 or drop it to let edgeprep choose")
    return opts.coreml_target


def _carry_pass(carried: Sequence[CarriedWeight], ios18: bool, fp16: bool) -> Any:
    """A MIL graph pass replacing each carried weight's const with a constexpr op that holds the
    model's own integers and scales (found by value: the const equals codes * scales)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    float_t = np.float16 if fp16 else np.float32
    by_shape: dict[tuple[int, ...], list[CarriedWeight]] = collections.defaultdict(list)
    for c in carried:
        by_shape[c.codes.shape].append(c)

    class CarryWeights(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for fn in prog.functions.values():
                for op in list(fn.operations):
                    if op.op_type != "const" or op.outputs[0].val is None:
                        continue
                    val = op.outputs[0].val
                    if not isinstance(val, np.ndarray) or val.shape not in by_shape:
                        continue
                    match = next((c for c in by_shape[val.shape] if c.mil_name is None
                                  and np.array_equal(val, c.dense.astype(float_t))), None)
                    if match is not None:
                        self._replace(fn, op, match)

        def _replace(self, fn: Any, op: Any, c: CarriedWeight) -> None:
            scales = c.scales.astype(float_t)
            with fn:
                if c.mode == "ternary":  # a 2-bit palette {-a, 0, a, 0}; a code c is index c + 1
                    lut = np.array([-scales[0], 0, scales[0], 0], dtype=float_t)
                    indices = (c.codes.astype(np.int16) + 1).astype(np.uint8)
                    if ios18:
                        from coremltools.converters.mil.mil import types

                        new = mb.constexpr_lut_to_dense(indices=indices.astype(types.nptype_from_builtin(types.uint2)),
                                                        lut=lut.reshape(1, 1, 4, 1), before_op=op,
                                                        name=op.name + "_carried")
                    else:
                        from coremltools.optimize import _utils as opt_utils

                        new = mb.constexpr_lut_to_dense(indices=opt_utils.pack_elements_into_bits(indices.flatten(), 2),
                                                        lut=lut, shape=np.uint32(c.codes.shape), before_op=op,
                                                        name=op.name + "_carried")
                elif ios18:
                    dtype = np.int8
                    data = c.codes.astype(dtype)
                    if c.mode == "int4":
                        from coremltools.converters.mil.mil import types

                        dtype = types.nptype_from_builtin(types.int4)
                        data = c.codes.astype(dtype)
                    new = mb.constexpr_blockwise_shift_scale(data=data, scale=scales[:, None], before_op=op,
                                                             name=op.name + "_carried")
                else:
                    new = mb.constexpr_affine_dequantize(quantized_data=c.codes.astype(np.int8),
                                                         zero_point=np.int8(0), scale=scales, axis=np.int32(0),
                                                         before_op=op, name=op.name + "_carried")
            fn.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                            no_check_var_types=True)
            fn.remove_ops([op])
            c.mil_name = new.name

    return CarryWeights()


def _compress(ct: Any, mlmodel: Any, mode: str) -> Any:
    """coremltools' own post-training weight compression of a float model."""
    opt = ct.optimize.coreml
    if mode == "int8":
        cfg = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg))
    if mode == "int4-block":
        cfg = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                          block_size=INT4_BLOCK)
        return opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg))
    if mode in ("palettize4", "palettize2"):
        cfg = opt.OpPalettizerConfig(mode="kmeans", nbits=int(mode[-1]))
        return opt.palettize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg))
    return mlmodel


class CoreMLExporter(Exporter):
    target = "coreml"
    runtime = "coreml"
    options_model = CoreMLOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        import torch

        ct = _ct()
        opts = CoreMLOptions.of(options)
        if len(example_inputs) != 1:
            raise ExportError(f"coreml: models with {len(example_inputs)} inputs are not supported yet (one tensor)")
        fmodel, carried, notes = float_copy(model)
        if opts.coreml_weights != "auto" and carried:
            notes.append(f"coreml_weights {opts.coreml_weights}: the model's own integer weights are not carried "
                         "over; their dequantized values are compressed anew")
            carried = []
        target = _deployment_target(opts, carried)
        fp16 = opts.coreml_weights != "fp32"
        (example,) = static_example(example_inputs, opts.static_batch)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet(), torch.no_grad():
                traced = torch.jit.trace(fmodel, (example,))
                mlmodel = ct.convert(
                    traced, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape), dtype=np.float32)],
                    outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)], convert_to="mlprogram",
                    minimum_deployment_target=getattr(ct.target, target),
                    compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
                if carried:
                    from coremltools.models.utils import _apply_graph_pass

                    mlmodel = _apply_graph_pass(mlmodel, _carry_pass(carried, target == "iOS18", fp16),
                                                spec_version=SPEC_VERSIONS[target], skip_model_load=True)
                mlmodel = _compress(ct, mlmodel, opts.coreml_weights)
                mlmodel.save(str(out_dir / MODEL_DIR))
        except (BadInputError, ExportError):
            raise
        except Exception as exc:
            raise ExportError(f"Core ML conversion failed: {short_error(exc)}") from None
        missing = [c.module for c in carried if c.mil_name is None]
        if missing:
            raise ExportError(f"coreml: the quantized weights of {', '.join(missing[:5])} were not found in the Core ML "
                              "program (a graph rewrite changed them); export with coreml_weights: fp16")
        summary = spec_summary(out_dir / MODEL_DIR)
        if summary["deployment_target"] != target:
            raise ExportError(f"coreml: saved package targets {summary['deployment_target']}, expected {target}")
        info = {"batch": opts.static_batch, "weights": opts.coreml_weights, "deployment_target": target,
                "compute_precision": "fp16" if fp16 else "fp32", "spec": summary, "notes": notes,
                "coremltools": package_version("coremltools"), "torch": torch.__version__}
        if carried:
            info["carried"] = check_carried(out_dir / MODEL_DIR, carried, fp16)
        shape = tuple(int(s) for s in example.shape)
        with torch.no_grad():
            out_shape = tuple(int(s) for s in fmodel(example).shape)
        return describe_file(opts.name or self.target, self.target, self.runtime, out_dir / MODEL_DIR,
                             [TensorSpec(INPUT_NAME, shape, "float32")], [TensorSpec(OUTPUT_NAME, out_shape, "float32")],
                             info=info)


# ----------------------------------------------------------------------------- reading the saved spec
def _tensor_dtype(value_type: Any) -> Optional[str]:
    from coremltools.proto import MIL_pb2

    if not value_type.HasField("tensorType"):
        return None
    return MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def _elements(value_type: Any) -> int:
    dims = [d.constant.size for d in value_type.tensorType.dimensions]
    return int(np.prod(dims)) if dims else 1


def spec_summary(package: Path) -> dict[str, Any]:
    """What the saved .mlpackage holds, read from its spec (works on any OS): deployment target,
    I/O names and shapes, op counts, and the weights by dtype (consts and constexpr inputs)."""
    ct = _ct()
    with _quiet():
        spec = ct.utils.load_spec(str(package))
    versions = {v: k for k, v in SPEC_VERSIONS.items()}
    io_ = {kind: [{"name": f.name, "shape": [int(d) for d in f.type.multiArrayType.shape],
                   "dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType)}
                  for f in getattr(spec.description, kind)] for kind in ("input", "output")}
    if not spec.HasField("mlProgram"):
        raise ExportError(f"{package}: not an ML Program (model type {spec.WhichOneof('Type')})")
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    op_counts = collections.Counter(op.type for op in ops)
    weights: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"tensors": 0, "elements": 0})
    for op in ops:
        if op.type == "const" or op.type.startswith("constexpr_"):
            # a const holds its value as an attribute; an iOS18 constexpr takes inline values as inputs
            values = [v for k, v in op.attributes.items() if k != "name"]
            values += [a.value for arg in op.inputs.values() for a in arg.arguments if a.HasField("value")]
            for value in values:
                dtype = _tensor_dtype(value.type)
                if dtype and _elements(value.type) >= SMALL_CONST_ELEMENTS:
                    weights[dtype]["tensors"] += 1
                    weights[dtype]["elements"] += _elements(value.type)
    return {"spec_version": int(spec.specificationVersion),
            "deployment_target": versions.get(int(spec.specificationVersion), f"spec {spec.specificationVersion}"),
            "opset": fn.opset, "inputs": io_["input"], "outputs": io_["output"],
            "ops": dict(sorted(op_counts.items())), "weights": {k: dict(v) for k, v in sorted(weights.items())},
            "compressed_weight_ops": sum(n for t, n in op_counts.items() if t.startswith("constexpr_"))}


def _load_program(package: Path) -> Any:
    ct = _ct()
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    with _quiet():
        mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
        return _convert_model_spec_to_pymil_prog(mlmodel, mlmodel.get_spec().specificationVersion,
                                                 _pymil_loader())


def _pymil_loader() -> Any:
    from coremltools.converters.mil.frontend.milproto.load import load

    return load


def check_carried(package: Path, carried: Sequence[CarriedWeight], fp16: bool) -> dict[str, Any]:
    """Decompress each carried weight from the saved package and compare it with the model's."""
    prog = _load_program(package)
    by_name = {op.outputs[0].name: op for fn in prog.functions.values() for op in fn.operations}
    worst, identical, modes = 0.0, True, collections.Counter()
    for c in carried:
        op = by_name.get(c.mil_name)
        if op is None or not op.op_type.startswith("constexpr_"):
            raise ExportError(f"{package}: carried weight {c.module} ({c.mil_name}) is not a constexpr op in the saved file")
        dense = np.asarray(op.materialized_val_inference(), dtype=np.float64)
        want = c.dense.astype(np.float64)
        if op.op_type == "constexpr_affine_dequantize":
            stored = op.quantized_data.val
        elif op.op_type == "constexpr_blockwise_shift_scale":
            stored = op.data.val
        else:  # a palette: the dense values are the palette's entries, exactly +-scale or 0
            stored = np.round(dense / c.scales.astype(np.float16 if fp16 else np.float32)[:, None])
        identical &= bool(np.array_equal(np.asarray(stored).astype(np.int64), c.codes.astype(np.int64)))
        worst = max(worst, float(np.abs(dense - want).max()))
        modes[f"{c.mode} ({op.op_type})"] += 1
    return {"weights": len(carried), "modes": dict(modes), "codes_identical": identical,
            "max_abs_weight_error": worst,
            "note": "decompressed from the saved package; the error is the " + ("fp16" if fp16 else "fp32")
                    + " rounding of the per-channel scales and of the dequantized values"}


# ----------------------------------------------------------------------------- runtime (macOS only)
class CoreMLModel(LoadedModel):
    def __init__(self, artifact: Artifact, threads: int = 1):
        ct = _ct()
        self.artifact, self.threads = artifact, int(threads)
        try:
            self.model = ct.models.MLModel(str(artifact.path), compute_units=ct.ComputeUnit.CPU_ONLY)
        except Exception as exc:
            raise RuntimeFailure(f"{artifact.path}: Core ML cannot load it: {short_error(exc)}") from None
        self.input_names = tuple(s.name for s in artifact.inputs)
        self.output_names = tuple(s.name for s in artifact.outputs)
        self.fixed_batch = int(artifact.inputs[0].shape[0]) if artifact.inputs else None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = float32_feed(self.input_names, inputs)
        try:
            out = self.model.predict(feed)
        except Exception as exc:
            raise RuntimeFailure(f"{self.artifact.path}: Core ML prediction failed: {short_error(exc)}") from None
        return [np.asarray(out[n], dtype=np.float32) for n in self.output_names]

    def precision_census(self, save_graph_to: Optional[Path] = None) -> dict[str, Any]:
        spec = self.artifact.info.get("spec") or spec_summary(self.artifact.path)
        return {"ops": spec["ops"], "weights": spec["weights"],
                "optimization_level": "Core ML chooses CPU / GPU / Neural Engine per op at load"}


class CoreMLRuntime(Runtime):
    name = "coreml"
    package = "coremltools"
    extra = "coreml"

    def usable_here(self) -> tuple[bool, str]:
        if platform.system() != "Darwin":
            return False, "Core ML prediction needs macOS; here the saved spec is validated instead"
        return True, ""

    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        ok, why = self.usable_here()
        if not ok:
            raise RuntimeFailure(f"{artifact.path}: {why}")
        return CoreMLModel(artifact, threads)
