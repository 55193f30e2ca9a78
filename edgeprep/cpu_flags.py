"""Kernel-relevant CPU flags: which ones matter, and reading them from /proc/cpuinfo or macOS sysctl.

Why: a runtime picks its int8 / fp16 kernels per CPU family, so every parity or latency number
carries the flags of the CPU that made it (edgeprep.measure.host on this machine, the device runner
on a device).

One copy for both sides: standard library only, Python 3.8 syntax and no ``from __future__``
import, because edgeprep/remote/session.py sends this file's source to a device ahead of
runner.py's, and the runner (which must not import edgeprep there) uses the functions below.
"""
import subprocess
import sys

# Flags that change which kernels a runtime can use (others, e.g. "sse" or "aes", never matter here).
X86_KERNEL_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                    "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_KERNEL_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "fphp", "asimdhp")
KERNEL_FLAGS = frozenset(X86_KERNEL_FLAGS + ARM_KERNEL_FLAGS)

# macOS has no /proc/cpuinfo; `sysctl hw.optional` answers "<key>: 1" per feature it has.
SYSCTL_FLAGS = {
    "hw.optional.neon": "asimd", "hw.optional.AdvSIMD": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FP16": "asimdhp", "hw.optional.neon_fp16": "asimdhp",
    "hw.optional.sse4_1": "sse4_1", "hw.optional.sse4_2": "sse4_2", "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma", "hw.optional.f16c": "f16c",
    "hw.optional.avx512f": "avx512f", "hw.optional.avx512bw": "avx512bw", "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512vnni": "avx512_vnni",
}


def kernel_isa(cpuinfo_text):
    """Sorted kernel-relevant flags of the first processor in /proc/cpuinfo text that lists any
    (x86 "flags", ARM "Features"; an old ARM kernel puts a header block first)."""
    for block in cpuinfo_text.split("\n\n"):
        for line in block.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return sorted(set(value.split()) & KERNEL_FLAGS)
    return []


def sysctl_isa(text):
    """Sorted kernel-relevant flags from `sysctl hw.optional` output (macOS)."""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip() == "1" and key.strip() in SYSCTL_FLAGS:
            flags.add(SYSCTL_FLAGS[key.strip()])
    return sorted(flags)


def sysctl(*args):
    """`sysctl ARGS` output, or "" where there is no sysctl (not macOS) or it fails."""
    try:
        return subprocess.run(["sysctl"] + list(args), capture_output=True, text=True, timeout=5,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def device_isa():
    """This machine's kernel-relevant flags: /proc/cpuinfo (Linux), sysctl (macOS), else []."""
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            return kernel_isa(f.read())
    except OSError:
        pass
    return sysctl_isa(sysctl("hw.optional")) if sys.platform == "darwin" else []
