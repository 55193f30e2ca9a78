"""edgeprep.measure.host: the CPU model, architecture and kernel-relevant ISA flags, parsed from
canned /proc/cpuinfo texts of the CPU families whose int8 kernels differ; the device runner parses
flags with the same code (edgeprep.cpu_flags, sent ahead of it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeprep.cpu_flags import KERNEL_FLAGS, kernel_isa, sysctl_isa
from edgeprep.measure import host
from edgeprep.remote import runner
from edgeprep.remote.session import runner_source


def _x86(model: str, flags: str, n: int) -> str:
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n"
                       for i in range(n)) + "\n"


def _arm(parts: list[int], features: str) -> str:
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
              f"CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: {p:#05x}\nCPU revision\t: 1\n"
              for i, p in enumerate(parts)]
    return "\n\n".join(blocks) + "\n\nRevision\t: d04170\nSerial\t\t: 0\nModel\t\t: Raspberry Pi 5\n"


# AMD EPYC 7B12 (Zen 2): AVX2 and FMA, no AVX-512 at all
EPYC_ROME = _x86("AMD EPYC 7B12", "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush "
                 "mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl "
                 "nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic "
                 "movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a "
                 "misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 "
                 "avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr "
                 "arat npt nrip_save umip rdpid", 4)
# Intel Xeon Platinum 8259CL (Cascade Lake): AVX-512 with VNNI, no BF16 / AMX
XEON_CLX = _x86("Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz",
                "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
                "ss ht syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon rep_good nopl xtopology nonstop_tsc "
                "cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe "
                "popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch "
                "invpcid_single pti fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid mpx avx512f avx512dq "
                "rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves ida "
                "arat pku ospke avx512_vnni", 8)
# Raspberry Pi 5, Cortex-A76: dot product (asimddp) and fp16, no i8mm
CORTEX_A76 = _arm([0xd0b] * 4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                               "lrcpc dcpop asimddp")
# AWS Graviton3, Neoverse-V1: i8mm, bf16 and SVE (its "svei8mm" / "svebf16" are other flags)
NEOVERSE_V1 = _arm([0xd40] * 2, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                                "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc "
                                "flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng")

CASES = {
    "epyc-avx2": (EPYC_ROME, {"model": "AMD EPYC 7B12", "arch": "x86_64", "cores": 4,
                              "isa": ["avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2"]},
                  "AMD EPYC 7B12 (x86_64: avx2)"),
    "xeon-vnni": (XEON_CLX, {"model": "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz", "arch": "x86_64", "cores": 8,
                             "isa": ["avx", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx512vl", "f16c", "fma",
                                     "sse4_1", "sse4_2"]},
                  "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz (x86_64: avx2, avx512f, avx512_vnni)"),
    "cortex-a76": (CORTEX_A76, {"model": "Cortex-A76", "arch": "aarch64", "cores": 4,
                                "isa": ["asimd", "asimddp", "asimdhp", "fphp"]},
                   "Cortex-A76 (aarch64: asimd, asimddp)"),
    "neoverse-v1": (NEOVERSE_V1, {"model": "Neoverse-V1", "arch": "aarch64", "cores": 2,
                                  "isa": ["asimd", "asimddp", "asimdhp", "bf16", "fphp", "i8mm", "sve"]},
                    "Neoverse-V1 (aarch64: asimd, asimddp, i8mm, bf16, sve)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpuinfo_parse_gives_the_exact_flags(case):
    text, expected, label = CASES[case]
    cpu = host.parse_cpuinfo(text)
    assert cpu == expected
    assert host.cpu_label(cpu) == label
    assert kernel_isa(text) == expected["isa"]  # the parser the device runner runs too


def test_big_little_names_each_core_type_once():
    cpu = host.parse_cpuinfo(_arm([0xd05] * 4 + [0xd0b] * 4, "fp asimd asimddp"))
    assert cpu["model"] == "Cortex-A55 + Cortex-A76" and cpu["cores"] == 8


def test_empty_and_foreign_text():
    assert host.parse_cpuinfo("") == {"model": None, "arch": None, "isa": [], "cores": None}
    assert kernel_isa("") == []
    assert host.cpu_label("x86_64") == "x86_64"  # a report from before machine.cpu was a dict
    assert host.cpu_label({"model": "M", "arch": "aarch64", "isa": []}) == "M (aarch64: no kernel-relevant ISA flags)"


def test_macos_sysctl_flags():
    text = ("hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 0\nhw.optional.arm.FEAT_BF16: 1\n"
            "hw.optional.AdvSIMD: 1\nhw.optional.floatingpoint: 1\n")
    assert sysctl_isa(text) == ["asimd", "asimddp", "bf16"]


def test_the_runner_source_sent_to_devices_parses_flags_without_edgeprep():
    """session.runner_source() is what a device executes: cpu_flags.py, then runner.py. Run it in an
    interpreter without site-packages (no edgeprep, no numpy), as a bare board's Python would."""
    program = ("import sys, json; src = sys.stdin.read(); g = {'__name__': 'probe'}; "
               "exec(compile(src, 'runner', 'exec'), g); print(json.dumps(g['describe_device']()['isa']))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", program], input=runner_source().decode(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == host.host_cpu()["isa"]


def test_this_host():
    cpu = host.host_cpu()
    assert set(cpu) == {"model", "arch", "isa", "cores"}
    assert cpu["model"] and cpu["arch"] and cpu["cores"] >= 1
    assert cpu["isa"] == sorted(cpu["isa"]) and set(cpu["isa"]) <= KERNEL_FLAGS
    assert runner.describe_device()["isa"] == cpu["isa"]
