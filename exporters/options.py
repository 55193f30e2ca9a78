"""Each built-in target's options: the one declaration of every export option. A recipe's
``export:`` entry is validated as the model of its ``target`` (registered in ``edgeprep.builtin``),
the ``edgeprep export`` command's options are generated from these models, and each exporter
reads its own model. Kept apart from the exporters so that reading them (the CLI, recipe
validation) imports pydantic only, not torch or a runtime.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

OptimizeLevel = Literal["disable", "basic", "extended", "all"]
CoreMLWeights = Literal["auto", "fp16", "fp32", "int8", "palettize4", "palettize2", "int4-block"]


class ExportOptions(BaseModel):
    """Options common to every target; a target subclasses this with ``target: Literal[...]`` and
    its own fields. Unknown keys are errors, so an option of another target is refused by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    # artifact directory name under artifacts/; defaults to the target
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                description="artifact directory name (default: the target)")

    @property
    def artifact_name(self) -> str:
        return self.name or self.target

    def derived_names(self) -> list[str]:
        """The artifact directories this entry writes besides ``artifact_name`` and its -baseline."""
        return []

    @classmethod
    def of(cls, options: Any) -> "ExportOptions":
        """This target's options from an instance of it, None (defaults), or another target's options
        (its fields of the same names; e.g. ort-mobile reusing an onnx entry)."""
        if isinstance(options, cls):
            return options
        target = cls.model_fields["target"].default
        if options is None:
            return cls(target=target)
        fields = {k: getattr(options, k) for k in cls.model_fields
                  if k != "target" and getattr(options, k, None) is not None}
        return cls(target=target, **fields)


class OrtOptions(ExportOptions):
    """What every ONNX Runtime target (onnx, ort-mobile) exports and runs with."""
    opset: int = Field(20, ge=18, description="ONNX opset (20: Gelu is one op; at 18 it is 5 that ORT does not fuse back)")
    dynamo: bool = Field(True, description="torch.export-based exporter first, TorchScript as the fallback")
    optimize: OptimizeLevel = Field("extended", description="ORT graph optimization level used to run and profile")
    mobile_fixed_batch: Optional[int] = Field(None, ge=1, description=".ort with its batch axis fixed (ORT Mobile EPs)")
    binary_storage: Literal["packed1", "int2"] = Field(
        "packed1", description="binarized weights: 1 bit each on disk (unpacked at load) or INT2 (MatMulNBits)")
    dynamic_sequence: bool = Field(False, description="token models: the sequence axis is symbolic too")
    # residual Add -> LayerNormalization written as Sum, so ORT does not fuse it into its slow
    # SkipLayerNormalization kernel (edgeprep.exporters.residual_sum)
    residual_sum: bool = Field(True, description="post-LN residual Add written as Sum (ORT's SkipLayerNorm is slower)")
    # int8 Gemm / MatMul weights as trained, or uint8 + zero point 128 (the same numbers; exact on
    # AVX2 x86 kernels even for full-range weights, slower on VNNI: edgeprep.quant.cpu_family)
    int8_weights: Literal["s8", "u8"] = Field("s8", description="int8 weights as trained (s8) or as uint8 + "
                                              "zero point 128 (u8: exact on AVX2 x86, slower on VNNI)")
    u8_weight_layers: list[str] = Field(default_factory=list, description="only these Linears' int8 weights as "
                                        "uint8 (the fix a failed parity check names)")


class OnnxOptions(OrtOptions):
    target: Literal["onnx"] = "onnx"
    mobile: bool = Field(False, description="also write ORT's .ort format")
    ptq: list[Literal["dynamic", "static"]] = Field(default_factory=list, description="ORT's own PTQ of the fp32 "
                                                    "baseline as peers")

    def derived_names(self) -> list[str]:
        return [f"{self.artifact_name}-ptq-{kind}" for kind in self.ptq]


class OrtMobileOptions(OrtOptions):
    """The .ort file is the artifact; ORT's PTQ peers come from an onnx entry."""

    target: Literal["ort-mobile"] = "ort-mobile"


class Int8PeerOptions(ExportOptions):
    """An edge target with a fixed input shape and, optionally, its own runtime's int8 PTQ peer."""

    static_batch: int = Field(1, ge=1, description="the batch the program is built for (edge programs have "
                                                   "fixed shapes)")
    int8: bool = Field(False, description="also the target's own int8 PTQ of the fp32 baseline as a peer")

    def derived_names(self) -> list[str]:
        return [f"{self.artifact_name}-int8", f"{self.artifact_name}-baseline-int8"] if self.int8 else []


class ExecuTorchOptions(Int8PeerOptions):
    target: Literal["executorch"] = "executorch"


class LiteRTOptions(Int8PeerOptions):
    target: Literal["litert"] = "litert"


class CoreMLOptions(ExportOptions):
    target: Literal["coreml"] = "coreml"
    static_batch: int = Field(1, ge=1, description="the batch the program is built for")
    coreml_weights: CoreMLWeights = Field("auto", description="weights as carried from the model (auto) or "
                                          "compressed anew")
    coreml_target: Optional[Literal["iOS16", "iOS17", "iOS18"]] = Field(
        None, description="minimum deployment target (default: the lowest the weights allow)")


class TensorRTOptions(Int8PeerOptions):
    target: Literal["tensorrt"] = "tensorrt"
    opset: int = Field(20, ge=18, description="ONNX opset of the engine's source graph")
    max_batch: int = Field(32, ge=1, description="the optimization profile's max batch (static_batch is its opt)")
    tensorrt_precision: Literal["fp16", "fp32"] = Field("fp16", description="engine precision of a float artifact")

    @model_validator(mode="after")
    def _batches(self) -> "TensorRTOptions":
        if self.static_batch > self.max_batch:
            raise ValueError(f"static_batch {self.static_batch} exceeds max_batch {self.max_batch}")
        return self
