"""Quantization-aware training with Teacher Intervention, and export that keeps the integers.

  fake.py          integer grids, clipped STE, per-channel / TWN weights, LSQ activation quantizer
  linear.py        QuantLinear (int8 / int4 / ternary weights, int8 input, int32 bias on the int8 path)
  attention.py     ViT and BERT-style attention with int8 Q/K/V/probs and taps for intervention
  convert.py       float model -> QAT model (a replayable "qat" decision); tapped teachers
  intervention.py  TI-M / TI-C / TI-O / TI-G schedule, the teacher-first wrapper, distillation losses
  export.py        the export form (quantized_decomposed Q/DQ ops, integer weight buffers)
  onnx_passes.py   after export: weight-only int4 / ternary -> INT4 / INT2 for MatMulNBits (nbits.py)
  nbits.py         the INT4 / INT2 rewrite, ORT's fusion conditions and accuracy level

The stage that uses them is ``edgeprep.stages.qat``.
"""
