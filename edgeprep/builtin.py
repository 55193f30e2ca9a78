"""The built-in stage kinds and export targets: the one place each is registered.

Heavy parts (stage classes, replayers, report sections) are named with ``Lazy("module:attr")`` so
that reading the registry imports only the pydantic configs.
"""
from __future__ import annotations

from edgeprep import doctor
from edgeprep.exporters import options
from edgeprep.recipe_stages import BinarizeConfig, FinetuneConfig, PruneConfig, QatConfig, ReparamConfig
from edgeprep.registry import Lazy, StageSpec, TargetSpec, register_stage, register_target

_PRUNE_REPLAY = Lazy("edgeprep.pruning.surgery:apply_decision")
_BERT_REPLAY = Lazy("edgeprep.pruning.bert:apply_bert_decision")

register_stage(StageSpec(
    "finetune", FinetuneConfig, Lazy("edgeprep.stages.finetune:FinetuneStage"),
    help="Train (or distill into) a checkpoint's model with the shared training loop."))
register_stage(StageSpec(
    "prune", PruneConfig, Lazy("edgeprep.stages.prune:PruneStage"), rank=1,
    replayers={"vit_heads": _PRUNE_REPLAY, "vit_mlp": _PRUNE_REPLAY, "bert_heads": _BERT_REPLAY,
               "bert_mlp": _BERT_REPLAY, "conv_channels": Lazy("edgeprep.pruning.conv:apply_channels_decision")},
    sections=Lazy("edgeprep.report_prune:prune_sections"), cli_flags={"pruning_ratio": ("--ratio",)},
    help="Prune heads / MLP neurons / conv channels physically (Adapt-Pruner), with recovery training."))
register_stage(StageSpec(
    "reparam", ReparamConfig, Lazy("edgeprep.stages.reparam:ReparamStage"), rank=2,
    replayers={"reparam": Lazy("edgeprep.reparam.surgery:replay_reparam"),
               "reparam_fold": Lazy("edgeprep.reparam.fold:replay_fold")},
    sections=Lazy("edgeprep.report_reparam:reparam_sections"),
    help="PRepBN (LayerNorm -> BatchNorm, folded away at export) and optional SLA, distilled from the checkpoint."))
register_stage(StageSpec(
    "qat", QatConfig, Lazy("edgeprep.stages.qat:QatStage"), rank=3, conflicts=frozenset({"binarize"}),
    replayers={"qat": Lazy("edgeprep.quant.convert:replay_qat")}, sections=Lazy("edgeprep.report_qat:qat_sections"),
    help="Quantization-aware training with Teacher Intervention, distilled from the checkpoint's model."))
register_stage(StageSpec(
    "binarize", BinarizeConfig, Lazy("edgeprep.stages.binarize:BinarizeStage"), rank=3, conflicts=frozenset({"qat"}),
    replayers={"binarize": Lazy("edgeprep.binary.convert:replay_binarize")},
    sections=Lazy("edgeprep.report_binarize:binarize_sections"),
    help="BiPFT binarization (binary weights and activations, residual estimators), distilled from the checkpoint."))

# ----------------------------------------------------------------------------- export targets
_ORT_RUNTIME = Lazy("edgeprep.exporters.onnxruntime_rt:OrtRuntime")
_ORT_PARTS = (doctor.ORT,)

register_target(TargetSpec(
    "onnx", options.OnnxOptions, Lazy("edgeprep.exporters.onnx:OnnxExporter"), "onnxruntime", _ORT_RUNTIME,
    components=_ORT_PARTS, cli_flags={"u8_weight_layers": ("--u8-weight-layer",)},
    help="ONNX, judged on ONNX Runtime (+ ORT's own PTQ peers with `ptq`)."))
register_target(TargetSpec(
    "ort-mobile", options.OrtMobileOptions, Lazy("edgeprep.exporters.onnx:OrtMobileExporter"), "onnxruntime",
    _ORT_RUNTIME, components=_ORT_PARTS, sections=Lazy("edgeprep.report_targets:mobile_sections"),
    help="ORT's .ort format (ORT Mobile), judged as that file."))
register_target(TargetSpec(
    "executorch", options.ExecuTorchOptions, Lazy("edgeprep.exporters.executorch:ExecuTorchExporter"),
    "executorch", Lazy("edgeprep.exporters.executorch:ExecuTorchRuntime"), extra="executorch",
    components=(doctor.EXECUTORCH,), help="ExecuTorch with XNNPACK (+ its PT2E int8 peer with `int8`)."))
register_target(TargetSpec(
    "litert", options.LiteRTOptions, Lazy("edgeprep.exporters.litert:LiteRTExporter"), "litert",
    Lazy("edgeprep.exporters.litert:LiteRTRuntime"), extra="litert", components=(doctor.LITERT, doctor.LITERT_TORCH),
    help="LiteRT (.tflite) (+ ai-edge-quantizer's int8 peer with `int8`)."))
register_target(TargetSpec(
    "coreml", options.CoreMLOptions, Lazy("edgeprep.exporters.coreml:CoreMLExporter"), "coreml",
    Lazy("edgeprep.exporters.coreml:CoreMLRuntime"), extra="coreml", components=(doctor.COREMLTOOLS,),
    sections=Lazy("edgeprep.report_targets:coreml_sections"), help="Core ML (.mlpackage); prediction on macOS."))
register_target(TargetSpec(
    "tensorrt", options.TensorRTOptions, Lazy("edgeprep.exporters.tensorrt:TensorRTExporter"), "tensorrt",
    Lazy("edgeprep.exporters.tensorrt:TensorRTRuntime"), extra="tensorrt",
    components=(doctor.TENSORRT, doctor.POLYGRAPHY), sections=Lazy("edgeprep.report_targets:tensorrt_sections"),
    help="A TensorRT engine (+ explicit-quantization int8 with `int8`); needs an NVIDIA GPU."))
