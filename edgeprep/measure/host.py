"""The measuring host's CPU: model, architecture, kernel-relevant ISA flags, core count.

Why: a runtime picks its int8 / fp16 kernels per CPU family (the same ONNX Runtime int8 artifact
measured 74 dB SQNR on an AVX-512 VNNI Xeon and 23 dB on an AVX2-only EPYC), so every parity and
latency number in a report carries the CPU it was measured on.

Which flags matter, and how they are read, is edgeprep/cpu_flags.py: the one parser the device
runner uses too. ``parse_cpuinfo`` is a pure function of the /proc/cpuinfo text so it is testable
on canned texts from other machines.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Mapping, Optional

from edgeprep.cpu_flags import kernel_isa, sysctl, sysctl_isa

# The few flags a one-line label shows: the ones that separate int8 / bf16 kernel tiers.
LABEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
               "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")

# /proc/cpuinfo on ARM names no model, only "CPU implementer" / "CPU part" numbers (as lscpu maps them).
ARM_PARTS = {
    (0x41, 0xd03): "Cortex-A53", (0x41, 0xd04): "Cortex-A35", (0x41, 0xd05): "Cortex-A55",
    (0x41, 0xd07): "Cortex-A57", (0x41, 0xd08): "Cortex-A72", (0x41, 0xd09): "Cortex-A73",
    (0x41, 0xd0a): "Cortex-A75", (0x41, 0xd0b): "Cortex-A76", (0x41, 0xd0c): "Neoverse-N1",
    (0x41, 0xd0d): "Cortex-A77", (0x41, 0xd40): "Neoverse-V1", (0x41, 0xd41): "Cortex-A78",
    (0x41, 0xd42): "Cortex-A78AE", (0x41, 0xd44): "Cortex-X1", (0x41, 0xd46): "Cortex-A510",
    (0x41, 0xd47): "Cortex-A710", (0x41, 0xd48): "Cortex-X2", (0x41, 0xd49): "Neoverse-N2",
    (0x41, 0xd4f): "Neoverse-V2", (0x41, 0xd80): "Cortex-A520", (0x41, 0xd81): "Cortex-A720",
    (0x41, 0xd82): "Cortex-X4", (0x41, 0xd8e): "Neoverse-N3", (0x41, 0xd84): "Neoverse-V3",
}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """{"model", "arch", "isa", "cores"} from /proc/cpuinfo text; fields it lacks are None
    (``isa`` is then []). ``isa``: the kernel-relevant flags of the first processor, sorted."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    fields = [_fields(b) for b in blocks]
    # the first processor that lists flags (an old ARM kernel puts a header block first)
    first = next((f for f in fields if "flags" in f or "Features" in f), fields[0] if fields else {})
    flags = set((first.get("flags") or first.get("Features") or "").split())
    cores = sum(1 for f in fields if "processor" in f and f["processor"].isdigit()) or None
    arch = None
    if "flags" in first:
        arch = "x86_64" if "lm" in flags else "i686"  # "lm" (long mode): a 64-bit x86 CPU
    elif "Features" in first:
        arch = {"8": "aarch64", "7": "armv7l"}.get(first.get("CPU architecture", ""), "arm")
    return {"model": _model(fields), "arch": arch, "isa": kernel_isa(text), "cores": cores}


def _fields(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _model(fields: list[dict[str, str]]) -> Optional[str]:
    # ARM: the core's part name beats a 32-bit kernel's generic "ARMv7 Processor rev 3 (v7l)"
    names: list[str] = []  # big.LITTLE: each core type once, in order ("Cortex-A55 + Cortex-A76")
    for f in fields:
        try:
            part = (int(f["CPU implementer"], 16), int(f["CPU part"], 16))
        except (KeyError, ValueError):
            continue
        name = ARM_PARTS.get(part, f"ARM implementer {part[0]:#x} part {part[1]:#05x}")
        if name not in names:
            names.append(name)
    if names:
        return " + ".join(names)
    return next((f[k] for k in ("model name", "Hardware", "cpu model") for f in fields if f.get(k)), None)


def host_cpu() -> dict[str, Any]:
    """This machine's {"model", "arch", "isa", "cores"}; best effort, never raises."""
    cpu: dict[str, Any] = {"model": None, "arch": None, "isa": [], "cores": None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = parse_cpuinfo(f.read())
    except OSError:
        if sys.platform == "darwin":
            cpu["model"] = sysctl("-n", "machdep.cpu.brand_string").strip() or None
            cpu["isa"] = sysctl_isa(sysctl("hw.optional"))
    cpu["arch"] = platform.machine() or cpu["arch"]  # what the running kernel says wins over a guess
    cpu["model"] = cpu["model"] or platform.processor() or cpu["arch"]
    cpu["cores"] = cpu["cores"] or os.cpu_count()
    return cpu


def cpu_label(cpu: Any, all_flags: bool = False) -> str:
    """One line: "AMD EPYC (x86_64: avx2, avx512f, avx512_vnni)". Without ``all_flags`` only the
    flags that separate kernel tiers (``LABEL_FLAGS``); a CPU with none of them lists all it has.
    A plain string (a report written before ``cpu`` was a dict) is returned as it is."""
    if not isinstance(cpu, Mapping):
        return str(cpu) if cpu else "unknown CPU"
    isa = [str(f) for f in cpu.get("isa") or []]
    shown = isa if all_flags else ([f for f in LABEL_FLAGS if f in isa] or isa)
    arch = cpu.get("arch") or "?"
    return f"{cpu.get('model') or 'unknown CPU'} ({arch}: {', '.join(shown) or 'no kernel-relevant ISA flags'})"
