"""When parity fails, say where: the first heavy layer (Gemm / MatMul / Conv) whose output diverges.

How: for heavy layer k, the artifact's graph cut at that layer's output (a *prefix model*). The
prefix runs exactly as the artifact does on the target (ORT's default fusions, so the same fused
integer kernels; on a device, through the same device runner) and is compared with a reference of
the same tensor:
  - ``unfused_reference``: the same prefix on this host with ORT's QDQ fusions off: the graph's own
    float semantics (what the PyTorch fake-quant model computes, up to float rounding). It finds a
    kernel that computes the artifact's integers wrongly (e.g. AVX2's saturating U8S8 kernel).
  - ``torch_reference``: the PyTorch model's module outputs, for layers named after a module
    (``<module path>.qweight`` initializers). It also finds a fault in the file itself (a corrupted
    scale), which the file's own float semantics share.
Why prefixes and not one model with every layer exposed as an output: an intermediate graph output
changes which nodes ORT fuses (a Q whose output is a graph output is not folded into the kernel before
it), and with it the kernels under test. A prefix ends at the layer, so everything up to it fuses as
in the artifact.

The first layer whose SQNR falls below the threshold is the divergence; on a host every prefix runs
(cheap), on a device a bisection finds a good -> bad boundary in log2(N) runs.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeprep.errors import RuntimeFailure
from edgeprep.measure.parity import SQNR_CAP_DB, sqnr_db
from edgeprep.quant.weight_storage import weight_layer_name

HEAVY_OPS = ("Gemm", "MatMul", "Conv")
WEIGHT_INPUT_OPS = ("DequantizeLinear", "Transpose", "Reshape", "Identity")  # between a weight and its op
SAMPLES = 64  # rows of the reference inputs a localization runs: enough for a stable SQNR, cheap on QEMU


@dataclass(frozen=True)
class HeavyLayer:
    index: int  # position among the graph's heavy ops, in graph order
    op_type: str
    output: str  # the op's output tensor in the artifact's graph
    name: str  # the module path when a quantized weight names it (blocks.0.mlp.fc1), else "<op> #<index>"
    module: Optional[str]  # the PyTorch module path, when known

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "index": self.index, "output": self.output}


@dataclass(frozen=True)
class Divergence:
    layer: Optional[HeavyLayer]  # None: every heavy layer is within the threshold
    sqnr_before_db: Optional[float]  # the heavy layer before it (None: it is the first)
    sqnr_after_db: Optional[float]
    reference: str  # "unfused host" | "pytorch"
    measured: dict[str, float]  # layer name -> SQNR dB, for every prefix that ran
    threshold_db: float

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer.to_json() if self.layer else None, "sqnr_before_db": self.sqnr_before_db,
                "sqnr_after_db": self.sqnr_after_db, "reference": self.reference, "threshold_db": self.threshold_db,
                "measured_db": self.measured}

    def describe(self) -> str:
        if self.layer is None:
            return (f"every heavy layer stays >= {self.threshold_db:g} dB vs the {self.reference} reference; "
                    "the loss is in the ops after the last one")
        before = "the input" if self.sqnr_before_db is None else f"{_db(self.sqnr_before_db)} before it"
        return (f"first diverging layer {self.layer.name} ({self.layer.op_type}): {before}, "
                f"{_db(self.sqnr_after_db)} after it (vs the {self.reference} reference)")


def _db(x: Optional[float]) -> str:
    return "n/a" if x is None else ("identical" if x >= SQNR_CAP_DB else f"{x:.1f} dB")


def heavy_layers(proto: Any) -> list[HeavyLayer]:
    """The graph's Gemm / MatMul / Conv nodes in order, named by the quantized weight they read."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = []
    for node in proto.graph.node:
        if node.op_type not in HEAVY_OPS:
            continue
        module = None
        for tensor in node.input[1:]:  # the weight operand: walk back over DQ / Transpose / Reshape
            seen = 0
            while tensor and seen < 4:
                module = weight_layer_name(tensor)
                prev = producer.get(tensor)
                if module or prev is None or prev.op_type not in WEIGHT_INPUT_OPS:
                    break
                tensor, seen = prev.input[0], seen + 1
            if module:
                break
        index = len(layers)
        layers.append(HeavyLayer(index, node.op_type, node.output[0], module or f"{node.op_type} #{index}", module))
    return layers


def prefix_model(proto: Any, layer: HeavyLayer) -> Any:
    """The graph cut at ``layer``'s output (inputs it does not use are dropped), reshaped to
    [batch, -1]: a 2-D Gemm sees [batch * tokens, features], and runners split outputs by batch."""
    import onnx.checker
    import onnx.shape_inference
    import onnx.utils
    from onnx import TensorProto, helper

    try:
        prefix = onnx.utils.Extractor(proto).extract_model([i.name for i in proto.graph.input], [layer.output])
    except (ValueError, KeyError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeFailure(f"cannot cut the graph after {layer.name} ({layer.op_type}) to localize: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
                             "the artifact itself is unchanged") from None
    g = prefix.graph
    first = g.input[0].name
    out = "edgeprep_localize_out"
    g.node.extend([
        helper.make_node("Shape", [first], ["edgeprep_localize_shape"], start=0, end=1),
        helper.make_node("Constant", [], ["edgeprep_localize_rest"],
                         value=helper.make_tensor("rest", TensorProto.INT64, [1], [-1])),
        helper.make_node("Concat", ["edgeprep_localize_shape", "edgeprep_localize_rest"], ["edgeprep_localize_2d"],
                         axis=0),
        helper.make_node("Reshape", [layer.output, "edgeprep_localize_2d"], [out])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "features"]))
    return prefix


def feeds(prefix: Any, names: Sequence[str], inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The prefix's inputs, by name, from the artifact's inputs."""
    by_name = dict(zip(names, inputs))
    return {i.name: by_name[i.name] for i in prefix.graph.input}


# A runner takes (prefix model, its feeds) and returns the prefix's one output.
Runner = Callable[[Any, dict[str, np.ndarray]], np.ndarray]


def host_runner(optimize: str = "extended", fused: bool = True) -> Runner:
    """Run a prefix on this machine's ONNX Runtime, with the artifact's fusions (or QDQ fusions off)."""
    from edgeprep.exporters.onnxruntime_rt import one_line, ort_errors, session_from_proto

    def run(prefix: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
        what = f"the graph cut at {prefix.graph.output[0].name}" + ("" if fused else " (QDQ fusions off)")
        sess = session_from_proto(prefix, what, optimize,
                                  disabled_optimizers=[] if fused else ["QDQSelectorActionTransformer"])
        try:
            return sess.run(None, inputs)[0]
        except ort_errors() as exc:
            raise RuntimeFailure(f"{what}: ONNX Runtime failed to run it: {one_line(exc)}") from None
    return run


def device_runner(device: Any, artifact: Any, log: Callable[[str], None] = lambda m: None) -> Runner:
    """Run a prefix on a device (ssh:// or emu://) through the device runner."""
    import dataclasses

    from edgeprep.remote.session import run_on_device
    from edgeprep.types import TensorSpec

    def run(prefix: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import onnx

        with tempfile.TemporaryDirectory(prefix="edgeprep-prefix-") as tmp:
            path = Path(tmp) / "prefix.onnx"
            onnx.save_model(prefix, str(path))
            specs = tuple(TensorSpec(n, tuple(x.shape), x.dtype.name) for n, x in inputs.items())
            art = dataclasses.replace(artifact, path=path, inputs=specs, outputs=(), size_bytes=path.stat().st_size,
                                      info={**dict(artifact.info), "optimize": artifact.info.get("optimize")})
            res = run_on_device(art, device, list(inputs.values()), warmup=0, iters=1, threads=1,
                                batch=1, parity=True, log=log)
        return res.outputs[0]
    return run


def torch_layer_outputs(model: Any, x: Any, layers: Sequence[HeavyLayer]) -> dict[str, np.ndarray]:
    """Each named layer's PyTorch output on ``x`` (the model's packed input), by layer name."""
    import torch

    outs: dict[str, np.ndarray] = {}
    hooks = []
    modules = dict(model.named_modules())
    for layer in layers:
        if not layer.module:
            continue  # an activation x activation MatMul or a float op: no module output to compare
        # the exported graph names modules from the model edgeprep exports; a wrapper may prefix them
        mod = modules.get(layer.module) or next((m for n, m in modules.items() if n.endswith("." + layer.module)), None)
        if mod is not None:
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, name=layer.name: outs.__setitem__(name, out.detach().cpu().numpy())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def localize(proto: Any, input_names: Sequence[str], inputs: Sequence[np.ndarray], run: Runner, *,
             threshold_db: float, torch_outputs: Optional[dict[str, np.ndarray]] = None,
             bisect: bool = False, layers: Optional[Sequence[HeavyLayer]] = None) -> Divergence:
    """The first heavy layer whose output on ``run`` is below ``threshold_db`` against the reference
    (PyTorch module outputs where ``torch_outputs`` has the layer, else this host with QDQ fusions off)."""
    layers = list(layers if layers is not None else heavy_layers(proto))
    reference = host_runner(fused=False)
    measured: dict[str, float] = {}
    used = set()

    def sqnr_at(k: int) -> float:
        layer = layers[k]
        if layer.name in measured:
            return measured[layer.name]
        prefix = prefix_model(proto, layer)
        fed = feeds(prefix, input_names, inputs)
        got = np.asarray(run(prefix, fed), dtype=np.float64)
        if torch_outputs is not None and layer.name in torch_outputs:
            ref = np.asarray(torch_outputs[layer.name], dtype=np.float64)
            used.add("pytorch")
        else:
            ref = np.asarray(reference(prefix, fed), dtype=np.float64)
            used.add("unfused host")
        measured[layer.name] = min(SQNR_CAP_DB, float(sqnr_db(ref.reshape(-1), got.reshape(-1))))
        return measured[layer.name]

    bad = _first_bad_bisect(len(layers), sqnr_at, threshold_db) if bisect else \
        next((k for k in range(len(layers)) if sqnr_at(k) < threshold_db), None)
    label = " + ".join(sorted(used)) or "unfused host"
    if bad is None:
        return Divergence(None, None, None, label, measured, threshold_db)
    before = sqnr_at(bad - 1) if bad > 0 else None
    return Divergence(layers[bad], before, measured[layers[bad].name], label, measured, threshold_db)


def _first_bad_bisect(n: int, sqnr_at: Callable[[int], float], threshold_db: float) -> Optional[int]:
    """A k with layer k below the threshold and layer k - 1 (or the input) above it: log2(n) runs."""
    if n == 0 or sqnr_at(n - 1) >= threshold_db:
        return None
    lo, hi = -1, n - 1  # lo: good (the input), hi: bad
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sqnr_at(mid) >= threshold_db:
            lo = mid
        else:
            hi = mid
    return hi
