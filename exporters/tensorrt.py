"""TensorRT target: an ONNX model prepared for TensorRT, checked against TensorRT's ONNX operator
support here, and built into an engine and run where TensorRT and an NVIDIA GPU exist.

Export (works anywhere; TensorRT itself is not needed):
  - fp32 model: the ONNX export (dynamic batch, self-checked on ORT) plus an optimization profile
    (min 1, opt ``static_batch``, max ``max_batch``) recorded for the engine build.
  - int8 QAT model: the same export with our Q/DQ (explicit quantization: per-tensor symmetric
    int8 activations, per-channel symmetric int8 weights), made TensorRT-ready: TensorRT's
    DequantizeLinear takes int8 / fp8 / int4 only, so each int32 bias DQ is folded into a float
    initializer holding exactly the dequantized bias. int4 / ternary / binary models are refused
    (their weight-only MatMulNBits is an ONNX Runtime contrib op).
  - ``int8: true`` on a float model adds a peer ``<name>-int8``: ONNX Runtime's QDQ quantizer with
    the settings TensorRT's explicit quantization expects (symmetric int8 activations and weights,
    per-channel weights, Q/DQ only around MatMul / Gemm / Conv, float bias), MinMax-calibrated on
    the pipeline's calibration inputs.
  Every artifact gets ``info["tensorrt_support"]``: each node checked against the operator table in
  ``data/tensorrt_onnx_ops.json`` (TensorRT version and source inside), plus the Q/DQ rules (zero
  points 0, quantized types int8 / fp8 / int4) and the opset range.

Runtime "tensorrt" (extra ``tensorrt``: tensorrt + polygraphy; needs an NVIDIA GPU): Polygraphy
builds the engine (fp16 for fp32 artifacts unless ``tensorrt_precision: fp32``; strongly typed from
the Q/DQ for int8 ones) with the recorded profile, runs it, and ``compare_with_onnxruntime`` checks
it against ONNX Runtime on the same inputs. Elsewhere the runtime reports itself unusable and the
pipeline records the artifact as not run.
"""
from __future__ import annotations

import collections
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import ExportError, MissingDependencyError, RuntimeFailure
from edgeprep.exporters.base import Int8PeerExporter, LoadedModel, Runtime, float32_feed, short_error
from edgeprep.exporters.options import TensorRTOptions
from edgeprep.manifest import describe_file
from edgeprep.types import Artifact

SUPPORT_TABLE = Path(__file__).resolve().parent / "data" / "tensorrt_onnx_ops.json"
MODEL_FILE = "model.onnx"
QUANTIZED_TYPES = {"INT8", "FLOAT8E4M3FN", "INT4"}  # what TensorRT's DequantizeLinear takes


@lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    return json.loads(SUPPORT_TABLE.read_text())


# ----------------------------------------------------------------------------- static checks
def _initializer_values(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _elem_type_name(proto: Any, name: str) -> Optional[str]:
    """ONNX element type of a tensor (initializer or typed value), e.g. "INT8"; None if unknown."""
    from onnx import TensorProto

    for t in proto.graph.initializer:
        if t.name == name:
            return TensorProto.DataType.Name(t.data_type)
    for vi in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            return TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
    return None


def tensorrt_support(path: Path) -> dict[str, Any]:
    """Check every node of the ONNX file at ``path`` against TensorRT's ONNX operator table."""
    import onnx

    from edgeprep.measure.census import iter_nodes

    table = support_table()
    proto = onnx.load(str(path))
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # types of Q/DQ outputs are then read from initializers only
        pass
    inits = _initializer_values(proto)
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = table["onnx_opsets"]
    problems: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    nodes = supported = 0
    counts: collections.Counter = collections.Counter()
    for node in iter_nodes(proto.graph):
        nodes += 1
        counts[node.op_type] += 1
        why = _node_problem(node, table["ops"], inits, proto)
        if why is None:
            supported += 1
        else:
            problems[node.op_type][why] += 1
    unsupported = [{"op": op, "count": sum(c.values()), "why": "; ".join(sorted(c))} for op, c in sorted(problems.items())]
    return {"tensorrt_version": table["tensorrt_version"], "source": table["source"], "opset": opset,
            "opset_supported": lo <= opset <= hi, "nodes": nodes, "supported_nodes": supported,
            "unsupported_ops": [u["op"] for u in unsupported], "unsupported": unsupported,
            "quantize_nodes": counts["QuantizeLinear"], "dequantize_nodes": counts["DequantizeLinear"],
            "all_supported": supported == nodes and lo <= opset <= hi}


def _node_problem(node: Any, ops: dict[str, Any], inits: dict[str, np.ndarray], proto: Any) -> Optional[str]:
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain} op (not in the ONNX standard; TensorRT needs a plugin)"
    entry = ops.get(node.op_type)
    if entry is None:
        return "not in TensorRT's operator table"
    if not entry["supported"]:
        return "marked unsupported by TensorRT"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and np.any(zp != 0):
            return "non-zero zero point (TensorRT quantization is symmetric)"
        qname = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
        qtype = _elem_type_name(proto, qname) or (
            _elem_type_name(proto, node.input[2]) if len(node.input) > 2 and node.input[2] else None)
        if qtype is not None and qtype not in QUANTIZED_TYPES:
            return f"{qtype} quantized type (TensorRT takes {', '.join(sorted(QUANTIZED_TYPES))})"
    return None


# ----------------------------------------------------------------------------- export
def fold_int32_bias_dq(path: Path) -> int:
    """Replace each DequantizeLinear of an int32 initializer (our QAT bias) by a float initializer
    holding its exact dequantized values; returns how many were folded."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(path))
    by_name = {t.name: t for t in proto.graph.initializer}
    folded, keep = 0, []
    for node in proto.graph.node:
        src = by_name.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if src is None or src.data_type != TensorProto.INT32:
            keep.append(node)
            continue
        codes = numpy_helper.to_array(src).astype(np.float64)
        scale = numpy_helper.to_array(by_name[node.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(by_name[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        value = ((codes - zero) * scale).astype(np.float32)  # scalar or per-axis, as ONNX defines it
        proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    if not folded:
        return 0  # nothing to do: the file stays byte for byte as it was
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    unused = [t for t in proto.graph.initializer if t.name not in used]
    for t in unused:
        proto.graph.initializer.remove(t)
    onnx.save_model(proto, str(path))
    return folded


def _fold_checked(art: Artifact, example_inputs: tuple[Any, ...]) -> dict[str, Any]:
    """Fold the int32 bias DQs and check on ORT that the outputs did not move (beyond fp32
    rounding of the folded bias: the fold is computed in float64 and rounded once)."""
    import shutil

    from edgeprep.exporters.onnxruntime_rt import create_session

    feed = [x.detach().cpu().numpy() for x in example_inputs]

    def run(path: Path) -> np.ndarray:
        session = create_session(path, "disable", threads=1)
        return session.run(None, dict(zip([i.name for i in session.get_inputs()], feed)))[0]

    with tempfile.TemporaryDirectory(prefix="edgeprep-trt-") as tmp:
        before = Path(tmp) / MODEL_FILE
        shutil.copyfile(art.path, before)
        folded = fold_int32_bias_dq(art.path)
        diff = float(np.abs(run(before) - run(art.path)).max())
    if diff > 1e-4:
        raise ExportError(f"tensorrt: folding the int32 bias DequantizeLinear moved the outputs by {diff:.3g}")
    return {"bias_dq_folded": folded, "bias_fold_max_abs_change": diff}


def _refuse_non_int8(model: Any) -> None:
    from edgeprep.binary.modules import BinaryLinear
    from edgeprep.quant.linear import QuantLinear

    for name, m in model.named_modules():
        if isinstance(m, BinaryLinear) or (isinstance(m, QuantLinear) and m.weight_mode != "int8"):
            mode = "binary" if isinstance(m, BinaryLinear) else m.weight_mode
            raise ExportError(f"tensorrt: {name} has {mode} weights; only int8 QAT maps to TensorRT's explicit "
                              "quantization here (export it with target onnx)")


def _profile(inputs: Sequence[Any], opts: TensorRTOptions) -> dict[str, list[list[int]]]:
    """min / opt / max shapes per input: the batch axis varies, every other axis is fixed."""
    for spec in inputs:
        dynamic = [d for d in spec.shape[1:] if not isinstance(d, int)]
        if dynamic:
            raise ExportError(f"tensorrt: input {spec.name} has dynamic axes {dynamic} besides the batch; only the "
                              "batch axis gets an optimization profile so far (export with target onnx)")

    def at(spec: Any, batch: int) -> list[int]:
        return [batch, *[int(d) for d in spec.shape[1:]]]

    return {s.name: [at(s, 1), at(s, min(opts.static_batch, opts.max_batch)), at(s, opts.max_batch)] for s in inputs}


class TensorRTExporter(Int8PeerExporter):
    target = "tensorrt"
    runtime = "tensorrt"
    options_model = TensorRTOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Path, options: Any) -> Artifact:
        from edgeprep.exporters.onnx import OnnxExporter, OnnxOptions
        from edgeprep.quant.export import is_quantized

        opts = TensorRTOptions.of(options)
        _refuse_non_int8(model)
        onnx_art = OnnxExporter().export(model, example_inputs, out_dir, OnnxOptions(opset=opts.opset))
        info = {k: v for k, v in onnx_art.info.items() if k not in ("mobile",)}
        if is_quantized(model):
            info.update(_fold_checked(onnx_art, example_inputs))
        info.update(precision="int8 (explicit Q/DQ from QAT)" if is_quantized(model) else opts.tensorrt_precision,
                    strongly_typed=is_quantized(model), tensorrt_profile=_profile(onnx_art.inputs, opts),
                    tensorrt_support=tensorrt_support(onnx_art.path))
        return describe_file(opts.name or self.target, self.target, self.runtime, onnx_art.path, onnx_art.inputs,
                             onnx_art.outputs, info=info)

    def int8_peer(self, artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
        return quantize_for_tensorrt(artifact, calib_inputs, out_dir)


def quantize_for_tensorrt(artifact: Artifact, calib_inputs: Sequence[np.ndarray], out_dir: Path) -> Artifact:
    """ORT's QDQ quantizer with TensorRT's explicit-quantization conventions (see the module doc)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgeprep.exporters.onnx_ptq import _calibration_reader, _quiet, pre_process

    if not calib_inputs or len(calib_inputs[0]) == 0:
        raise ExportError("tensorrt int8 needs calibration inputs; set data.calibration_samples >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"format": "QDQ", "activation_type": "QInt8 symmetric", "weight_type": "QInt8 symmetric",
                "per_channel": True, "op_types": ["MatMul", "Gemm", "Conv"], "bias": "float",
                "calibrate_method": "MinMax", "calibration_samples": int(len(calib_inputs[0]))}
    with tempfile.TemporaryDirectory(prefix="edgeprep-trt-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        how = pre_process(artifact.path, pre)
        try:
            with _quiet():
                quantize_static(str(pre), str(out_dir / MODEL_FILE),
                                _calibration_reader([s.name for s in artifact.inputs], calib_inputs),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, op_types_to_quantize=settings["op_types"],
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                               "QuantizeBias": False,
                                               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
        except Exception as exc:
            raise ExportError(f"tensorrt int8 quantization of {artifact.path} failed: {short_error(exc)}") from None
    for extra in [p for p in out_dir.iterdir() if p.name != MODEL_FILE]:
        extra.unlink()  # calibration scratch files
    info = {"precision": "int8 (explicit Q/DQ, ORT quantizer with TensorRT settings)", "strongly_typed": True,
            "source": artifact.name, "pre_process": how, "quantizer": settings,
            "tensorrt_profile": artifact.info.get("tensorrt_profile"),
            "tensorrt_support": tensorrt_support(out_dir / MODEL_FILE)}
    return describe_file(f"{artifact.name}-int8", artifact.target, artifact.runtime, out_dir / MODEL_FILE,
                         artifact.inputs, artifact.outputs, role="ptq", info=info)


# ----------------------------------------------------------------------------- runtime (NVIDIA GPU)
def _engine(artifact: Artifact) -> Any:
    """A Polygraphy engine loader for the artifact: precision and profile from its manifest."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    profile = Profile()
    for name, (lo, opt, hi) in (artifact.info.get("tensorrt_profile") or {}).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    strongly_typed = bool(artifact.info.get("strongly_typed"))
    network = NetworkFromOnnxPath(str(artifact.path), strongly_typed=strongly_typed)
    fp16 = not strongly_typed and artifact.info.get("precision") == "fp16"
    return EngineFromNetwork(network, CreateConfig(fp16=fp16, profiles=[profile]))


class TensorRTModel(LoadedModel):
    def __init__(self, artifact: Artifact, threads: int = 1):
        from polygraphy.backend.trt import TrtRunner

        self.artifact, self.threads = artifact, int(threads)
        self.input_names = tuple(s.name for s in artifact.inputs)
        self.output_names = tuple(s.name for s in artifact.outputs)
        try:
            self.runner = TrtRunner(_engine(artifact))
            self.runner.activate()  # builds the engine
        except Exception as exc:
            raise RuntimeFailure(f"{artifact.path}: TensorRT engine build failed: {short_error(exc)}") from None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = float32_feed(self.input_names, inputs)
        try:
            out = self.runner.infer(feed)
        except Exception as exc:
            raise RuntimeFailure(f"{self.artifact.path}: TensorRT inference failed: {short_error(exc)}") from None
        return [np.asarray(out[n], dtype=np.float32) for n in self.output_names]

    def precision_census(self, save_graph_to: Optional[Path] = None) -> dict[str, Any]:
        support = self.artifact.info.get("tensorrt_support") or {}
        return {"ops": {"QuantizeLinear": support.get("quantize_nodes", 0),
                        "DequantizeLinear": support.get("dequantize_nodes", 0)},
                "optimization_level": f"TensorRT engine, {self.artifact.info.get('precision')}"}


def compare_with_onnxruntime(artifact: Artifact, inputs: Sequence[np.ndarray], atol: float, rtol: float) -> dict[str, Any]:
    """Polygraphy's comparator: the TensorRT engine vs ONNX Runtime (CPU) on the same inputs."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    names = [s.name for s in artifact.inputs]
    feeds = [float32_feed(names, inputs)]
    runners = [TrtRunner(_engine(artifact)), OnnxrtRunner(SessionFromOnnx(str(artifact.path),
                                                                         providers=["CPUExecutionProvider"]))]
    results = Comparator.run(runners, data_loader=feeds)
    passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
    return {"passed": passed, "atol": atol, "rtol": rtol, "runners": [r.name for r in runners]}


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    package = "tensorrt"
    extra = "tensorrt"

    def usable_here(self) -> tuple[bool, str]:
        import importlib.util

        for module in ("tensorrt", "polygraphy"):
            if importlib.util.find_spec(module) is None:
                return False, (f"{module} is not installed (pip install 'edgeprep[tensorrt]'; TensorRT needs an "
                               "NVIDIA GPU); here the ONNX prepared for it is checked against TensorRT's op table")
        try:
            import tensorrt as trt

            if trt.Builder(trt.Logger(trt.Logger.ERROR)) is None:  # it needs a CUDA device
                return False, "TensorRT cannot create a builder here (no usable NVIDIA GPU)"
        except Exception as exc:
            return False, f"TensorRT cannot start here: {short_error(exc, 160)}"
        return True, f"tensorrt {trt.__version__}"

    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        usable, why = self.usable_here()
        if not usable:
            if "not installed" in why:
                raise MissingDependencyError(f"the tensorrt runtime: {why}")
            raise RuntimeFailure(f"{artifact.path}: {why}")
        return TensorRTModel(artifact, threads)
