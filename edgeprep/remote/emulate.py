"""Emulated CPU families: `emu://<family>` devices that run the device runner under QEMU user mode.

Why: ONNX Runtime (and XNNPACK, MLAS...) pick their int8 kernels by CPU features at run time, and
those kernels round and saturate differently: a model exact on this AVX-512 VNNI host can lose
accuracy on an AVX2 laptop or an Arm board. QEMU user mode runs the same Python and the same runtime
on another family's instruction set, so parity and the task metric are measured on that family's
kernels without the hardware. Only numerics: QEMU translates every instruction, so the milliseconds
it reports are not a timing of any real CPU and no latency or speedup gate ever reads them.

Families (FAMILIES below). The ISA flags are what the guest sees, probed under QEMU 10.0 (x86:
numpy's CPUID-based feature table; arm64: the kernel's HWCAP / HWCAP2 as QEMU reports them), and
re-checked by `edgeprep devices setup` (see emu_cache.probe_isa), so a family never silently means
another ISA:
  x86-avx2   qemu-x86_64 -cpu Haswell      sse4_2 avx avx2 fma; no avx512f, avx512bw, avx512_vnni
             (nor AVX-VNNI, which Haswell predates)
  x86-sse4   qemu-x86_64 -cpu Westmere     sse4_2 only: no avx, avx2, fma, avx512
  arm64-a53  qemu-aarch64 -cpu cortex-a53  asimd only: no asimdhp, asimddp (dot product), i8mm, sve
  arm64-a76  qemu-aarch64 -cpu cortex-a76  asimd asimdhp asimddp; no i8mm, bf16, sve
  arm64-max  qemu-aarch64 -cpu max         everything QEMU implements: asimddp i8mm bf16 sve sve2 (and sme)

What runs: x86 families run this host's own Python (sys.executable) under qemu-x86_64, so every
runtime installed here (onnxruntime, ai-edge-litert, executorch) runs emulated. arm64 families run
Debian bookworm's python3.11 from an arm64 root with aarch64 wheels of numpy and this host's exact
onnxruntime version; ai-edge-litert's aarch64 wheel also installs and imports there (prepared on
first use for a LiteRT artifact). ExecuTorch is not offered on arm64: its runner needs torch's
aarch64 wheel, hundreds of MB for a path nothing tests.

Setup (emu_cache.py) lives in a cache dir, `$EDGEPREP_CACHE/emu` (default ~/.cache/edgeprep/emu),
made once by `edgeprep devices setup` or on first use, from Debian packages (mmdebstrap) and PyPI
wheels only.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from edgeprep.errors import BadInputError

SCHEME = "emu"
NATIVE = "native"  # validate.devices: the host itself, already measured in the artifact's own entry
# Emulated latency is not a timing, so iterations only cost time: enough calls to show the runner
# works end to end, no more (ProfileConfig's minimum is 5).
EMULATED_WARMUP = 1
EMULATED_ITERS = 5
LATENCY_NOTE = ("emulated under QEMU: every instruction is translated, so these milliseconds are not a timing "
                "of any real CPU; only parity and the metric are measured on this family's kernels")


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # the guest's machine: "x86_64" or "aarch64" (also the qemu-<arch> binary)
    qemu_cpu: str  # the -cpu model
    cpu_model: str  # what the report calls it
    isa: tuple[tuple[str, bool], ...]  # the flags the guest sees, as probed (see module docstring)
    runtimes: tuple[str, ...]  # artifact runtimes that run under this family

    @property
    def isa_flags(self) -> dict[str, bool]:
        return dict(self.isa)

    @property
    def url(self) -> str:
        return f"{SCHEME}://{self.name}"


# The flags probed on each architecture, in report order (emu_cache.PROBE reads them).
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")
ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")
HOST_RUNTIMES = ("onnxruntime", "litert", "executorch")  # x86 guests run this host's own venv
ARM_RUNTIMES = ("onnxruntime", "litert")


def _flags(names: tuple[str, ...], *on: str) -> tuple[tuple[str, bool], ...]:
    return tuple((n, n in on) for n in names)


FAMILIES: dict[str, Family] = {
    "x86-avx2": Family("x86-avx2", "x86_64", "Haswell", "Intel Haswell (QEMU model Haswell): AVX2, no AVX-512/VNNI",
                       _flags(X86_FLAGS, "sse4_2", "avx", "avx2", "fma"), HOST_RUNTIMES),
    "x86-sse4": Family("x86-sse4", "x86_64", "Westmere", "Intel Westmere (QEMU model Westmere): SSE4.2, no AVX",
                       _flags(X86_FLAGS, "sse4_2"), HOST_RUNTIMES),
    "arm64-a53": Family("arm64-a53", "aarch64", "cortex-a53", "Arm Cortex-A53 (QEMU model cortex-a53): NEON, "
                        "no dot product", _flags(ARM_FLAGS, "asimd"), ARM_RUNTIMES),
    "arm64-a76": Family("arm64-a76", "aarch64", "cortex-a76", "Arm Cortex-A76 (QEMU model cortex-a76): NEON + "
                        "dot product, no i8mm/SVE", _flags(ARM_FLAGS, "asimd", "asimdhp", "asimddp"), ARM_RUNTIMES),
    "arm64-max": Family("arm64-max", "aarch64", "max", "Armv9 (QEMU model max): dot product, i8mm, bf16, SVE2",
                        _flags(ARM_FLAGS, *ARM_FLAGS), ARM_RUNTIMES),
}


def family_from_url(url: str) -> Family:
    """emu://<family> -> its Family; anything else is a one-line BadInputError naming the valid ones."""
    valid = ", ".join(f"{SCHEME}://{n}" for n in FAMILIES)
    parts = urlsplit(str(url))
    name = parts.netloc
    if parts.scheme != SCHEME or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadInputError(f"device {url!r}: not an emulated family URL; write emu://<family>, one of {valid}")
    if name not in FAMILIES:
        raise BadInputError(f"device {url!r}: unknown emulated CPU family {name!r}; valid: {valid}")
    return FAMILIES[name]


def is_emulated_url(url: str) -> bool:
    return str(url).startswith(f"{SCHEME}://")


def cache_dir() -> Path:
    """Where prepared families live: $EDGEPREP_CACHE/emu, default ~/.cache/edgeprep/emu."""
    root = os.environ.get("EDGEPREP_CACHE") or Path.home() / ".cache" / "edgeprep"
    return Path(root).expanduser() / "emu"


@dataclass(frozen=True)
class EmulatedDevice:
    """A device the runner reaches by running under QEMU on this host (session.py spawns it)."""

    url: str
    name: str = ""
    timeout_s: int = 600  # whole run: QEMU start, runtime import, copy, load, parity pass
    connect_timeout_s: int = 60  # importing a runtime under emulation takes seconds, not ms
    remote_tmp: Optional[str] = None  # the runner's temp dir: the host's (QEMU shares the file system)

    def __post_init__(self) -> None:
        family_from_url(self.url)  # raises BadInputError early

    @property
    def family(self) -> Family:
        return family_from_url(self.url)

    @property
    def label(self) -> str:
        return self.name or self.url

    @property
    def remote_python(self) -> str:  # what error messages call the runner's interpreter
        fam = self.family
        py = sys.executable if fam.arch == "x86_64" else "arm64 Debian python3.11"
        return f"{py} under qemu-{fam.arch} -cpu {fam.qemu_cpu}"


@dataclass(frozen=True)
class NativeDevice:
    """`native` in validate.devices: the host itself. Nothing runs again; the artifact's own entry
    is its measurement, listed among the devices so a recipe can name a set of CPU families."""

    url: str = NATIVE
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or NATIVE
