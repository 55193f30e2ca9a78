"""Which int8 form is exact, and which is fastest, on each CPU family's integer kernels.

ONNX Runtime (MLAS) picks its int8 GEMM kernel by CPU. On x86 it first turns int8 activations into
uint8 (+128, ``session.qdq_is_int8_allowed`` defaults to 0 there) and runs U8S8 (uint8 activations
x int8 weights):
  - AVX-512 VNNI / AVX-VNNI: ``vpdpbusd`` accumulates u8 x s8 products straight into int32: exact.
  - AVX2 (and AVX-512 without VNNI): ``vpmaddubsw`` adds two u8 x s8 products into a *saturating*
    int16 first. With weights on the full [-127, 127] grid two products reach 2 * 255 * 127 =
    64,770 > 32,767 and clip; measured on the quickstart artifact under ``qemu-x86_64 -cpu
    Haswell``: 23.9 dB vs 76.3 dB with the fusions off (BENCHMARKS.md, "int8 on every CPU family").
  - SSE4.1 (``pmaddwd`` on values widened to int16) and ARM64 (``sdot`` / ``udot`` or widening
    multiplies) accumulate in int32: exact.
Two forms are exact everywhere:
  - reduced range: int8 weights on [-63, 63] (QAT trains on that grid): 2 * 255 * 63 = 32,130 fits
    int16, so the fast U8S8 kernels stay in use (measured: same speed as full range on VNNI);
  - uint8 weights with zero point 128 (export option ``int8_weights: u8``, no retraining): ORT runs
    U8U8, which widens to int16 before multiplying; exact, but 1.76x slower on a VNNI host (vit-bench).
"""
from __future__ import annotations

from typing import Literal

TargetCpu = Literal["portable", "x86-avx2", "x86-vnni", "x86-sse4", "arm64"]

# target_cpu -> does QAT train int8 weights on the reduced [-63, 63] grid?
# portable: exact on every family with the fast kernels, at the cost of one bit of weight precision.
# x86-avx2: the only exact form that keeps AVX2's fast U8S8 kernel. The others run full range exactly.
REDUCED_RANGE: dict[str, bool] = {
    "portable": True,
    "x86-avx2": True,
    "x86-vnni": False,
    "x86-sse4": False,
    "arm64": False,
}

# Families whose kernels compute the artifact's integers exactly, by weight grid and storage.
ALL_FAMILIES = ("x86-avx2", "x86-vnni", "x86-sse4", "arm64")
SATURATING_FAMILIES = ("x86-avx2",)  # AVX2 without VNNI, and AVX-512 without VNNI (same vpmaddubsw path)

INT8_WEIGHT_STORAGES = ("s8", "u8")


def exact_families(reduced_range: bool, storage: str = "s8") -> list[str]:
    """The CPU families on which ORT's integer kernels reproduce the artifact's integers exactly."""
    if reduced_range or storage == "u8":
        return list(ALL_FAMILIES)
    return [f for f in ALL_FAMILIES if f not in SATURATING_FAMILIES]


def host_family(isa_flags: set[str], machine: str) -> str:
    """The family (as in ``REDUCED_RANGE``) of a CPU with these /proc/cpuinfo flags."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if {"avx512_vnni", "avx_vnni"} & isa_flags:
        return "x86-vnni"
    if {"avx2", "avx512bw"} & isa_flags:
        return "x86-avx2"
    return "x86-sse4"
