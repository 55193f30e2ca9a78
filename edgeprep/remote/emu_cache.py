"""Preparing emulated families (emulate.py) in the cache dir, once, from package registries only.

Layout of cache_dir() (each part built in a temp dir beside it and renamed into place, so two
processes preparing at once both end with a complete part and nothing half-written is ever used):
  qemu-trixie/bin/qemu-{aarch64,x86_64}  Debian trixie's static QEMU 10, only when the system's is
                                         missing or too old (bookworm's 7.2 segfaults importing
                                         onnxruntime >= 1.2x's aarch64 wheel)
  arm64-root/                            Debian bookworm arm64: python3.11 and the C/C++ runtime
  arm64-site-<runtime>-<versions>/       aarch64 wheels for that python: numpy + the runtime, at
                                         this host's exact versions
  families/<family>.json                 the family is prepared: QEMU used, its version, probed ISA
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from edgeprep.errors import MissingDependencyError, RuntimeFailure
from edgeprep.remote.emulate import ARM_FLAGS, FAMILIES, X86_FLAGS, Family, cache_dir

APT_FIX = "install them: apt-get install qemu-user-static mmdebstrap"
QEMU_NAMES = {"x86_64": ("qemu-x86_64-static", "qemu-x86_64"), "aarch64": ("qemu-aarch64-static", "qemu-aarch64")}
# Oldest QEMU each guest works with: bookworm's 7.2 runs x86 guests fine but segfaults importing
# onnxruntime's aarch64 wheel (verified with 1.32); trixie's 10.0 runs it.
MIN_QEMU = {"x86_64": (0,), "aarch64": (8, 0)}
QEMU_SUITE = "trixie"
ROOT_SUITE = "bookworm"
ROOT_PACKAGES = "python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1,zlib1g"
ROOT_PYTHON = "usr/bin/python3.11"
ROOT_PYTHON_VERSION = "3.11"  # the wheels must match the root's Python, not the host's
# Giving only manylinux2014_aarch64 resolves onnxruntime to 1.16, its last wheel with that tag.
ARM_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64")
# runtime -> the PyPI distribution installed for it into the arm64 site (numpy always comes too)
ARM_WHEELS = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}
TCG_NOISE = re.compile(r"TCG doesn't support requested feature")  # qemu-x86_64 on models it cannot fully emulate
STEP_TIMEOUT_S = 900


class EmulatorDependencyError(MissingDependencyError):
    """QEMU (or mmdebstrap, to fetch what is missing) is not installed here (exit 4)."""

    def __init__(self, message: str):  # MissingDependencyError's message names a pip extra; this is apt
        Exception.__init__(self, message)


@dataclass(frozen=True)
class Prepared:
    """What session.py needs to spawn the runner under a family."""

    family: Family
    qemu: Path
    qemu_version: str
    python: Path  # the guest interpreter (x86: this host's sys.executable)
    root: Optional[Path]  # -L sysroot (arm64)
    sites: tuple[Path, ...]  # PYTHONPATH entries (arm64)
    isa: dict[str, bool]  # as probed under this QEMU

    def argv(self, *python_args: str) -> list[str]:
        argv = [str(self.qemu), "-cpu", self.family.qemu_cpu]
        if self.root is not None:
            argv += ["-L", str(self.root)]
        return argv + [str(self.python), *python_args]

    def env(self) -> dict[str, str]:
        if self.root is None:  # this host's own Python and venv: its environment as is
            return dict(os.environ)
        # an arm64 guest must see none of the host's Python settings (x86 packages on PYTHONPATH)
        keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "USER")}
        return {**keep, "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": os.pathsep.join(str(s) for s in self.sites)}


def clean_stderr(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not TCG_NOISE.search(ln))


# ----------------------------------------------------------------------------- QEMU
def qemu_version(path: Path) -> Optional[tuple[int, ...]]:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def _vstr(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def _system_qemu(arch: str) -> tuple[Optional[Path], Optional[tuple[int, ...]], str]:
    """(path, version, why not) of a usable qemu-<arch> on PATH."""
    found = []
    for name in QEMU_NAMES[arch]:
        path = shutil.which(name)
        if path is None:
            continue
        version = qemu_version(Path(path))
        if version is not None and version >= MIN_QEMU[arch]:
            return Path(path), version, ""
        found.append(f"{path} is {_vstr(version) if version else 'of unknown version'}")
    need = f"qemu-{arch}" + (f" {_vstr(MIN_QEMU[arch])} or newer" if MIN_QEMU[arch] > (0,) else "")
    return None, None, f"{need} ({'; '.join(found)})" if found else f"{need} (none on PATH)"


def find_qemu(arch: str, *, build: bool, log: Callable[[str], None] = lambda m: None
              ) -> tuple[Optional[Path], Optional[tuple[int, ...]]]:
    """A qemu-<arch> new enough: the system's, else the cache's trixie one, else (``build``) fetch
    trixie's with mmdebstrap. Without mmdebstrap that is a one-line EmulatorDependencyError."""
    path, version, why = _system_qemu(arch)
    if path is not None:
        return path, version
    cached = cache_dir() / f"qemu-{QEMU_SUITE}" / "bin" / f"qemu-{arch}"
    if not cached.is_file() and build:
        _need_mmdebstrap(f"emulating {arch} needs {why}")
        log(f"fetching Debian {QEMU_SUITE}'s qemu-user-static into {cached.parent.parent}")
        _build(cached.parent.parent, _extract_qemu)
    if cached.is_file():
        return cached, qemu_version(cached)
    return None, None


def _need_mmdebstrap(why: str) -> None:
    if shutil.which("mmdebstrap") is None:
        raise EmulatorDependencyError(f"{why}, and mmdebstrap is not installed to fetch it; {APT_FIX}")


def _extract_qemu(dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".extract-") as tmp:
        _mmdebstrap(["--variant=extract", "--include=qemu-user-static", QEMU_SUITE, tmp])
        (dest / "bin").mkdir()
        for arch in QEMU_NAMES:  # keep the two static binaries, not the other 30 guests (450 MB)
            shutil.copy2(Path(tmp) / "usr" / "bin" / f"qemu-{arch}", dest / "bin" / f"qemu-{arch}")


# ----------------------------------------------------------------------------- cache parts
def _build(final: Path, make: Callable[[Path], None]) -> Path:
    """Make ``final`` with ``make(tmp)`` in a temp dir beside it, then rename: concurrent callers
    each build, the first rename wins and the others drop theirs."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        make(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run_step(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{what}: timed out after {STEP_TIMEOUT_S} s; check network access to the "
                             "package registry and rerun `edgeprep devices setup`") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise RuntimeFailure(f"{what} failed (exit status {done.returncode}): {lines[-1] if lines else 'no message'}; "
                             "check network access to the package registry and rerun `edgeprep devices setup`")


def _mmdebstrap(args: list[str]) -> None:
    _run_step(["mmdebstrap", "--quiet", *args], f"mmdebstrap {' '.join(a for a in args if not a.startswith('/'))}")


def arm64_root(log: Callable[[str], None]) -> Path:
    final = cache_dir() / "arm64-root"
    if not (final / ROOT_PYTHON).is_file():
        _need_mmdebstrap("emulating arm64 needs an arm64 Debian root")
        log(f"fetching Debian {ROOT_SUITE} arm64 python3.11 into {final}")
        _build(final, lambda d: _mmdebstrap(["--variant=extract", "--architectures=arm64",
                                             f"--include={ROOT_PACKAGES}", ROOT_SUITE, str(d)]))
    return final


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(dist, purpose="emulated arm64 devices install this host's version of it") from None


def arm64_site(runtime: str, log: Callable[[str], None]) -> Path:
    """numpy + ``runtime``'s aarch64 wheels at this host's versions, for the root's Python."""
    dist = ARM_WHEELS[runtime]
    pins = [f"numpy=={_host_version('numpy')}", f"{dist}=={_host_version(dist)}"]
    final = cache_dir() / ("arm64-site-" + "-".join(p.replace("==", "") for p in pins))
    if not final.is_dir():
        log(f"fetching aarch64 wheels {' '.join(pins)} into {final}")
        plats = [a for p in ARM_PLATFORMS for a in ("--platform", p)]
        _build(final, lambda d: _run_step(
            [sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--target", str(d), *plats,
             "--only-binary=:all:", "--python-version", ROOT_PYTHON_VERSION, *pins],
            f"pip install aarch64 wheels {' '.join(pins)}"))
    return final


# ----------------------------------------------------------------------------- ISA probe
# Runs in the guest (stdlib + numpy): one JSON line of the flags the family promises.
PROBE = r"""
import json, platform
try:
    from numpy._core._multiarray_umath import __cpu_features__ as f
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as f
m = platform.machine()
if m == "aarch64":  # the kernel's HWCAP words (linux/arch/arm64/include/uapi/asm/hwcap.h), as QEMU fakes them
    import ctypes
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    h1, h2 = libc.getauxval(16), libc.getauxval(26)
    bits = {"asimd": (h1, 1), "asimdhp": (h1, 10), "asimddp": (h1, 20), "sve": (h1, 22), "sve2": (h2, 1),
            "i8mm": (h2, 13), "bf16": (h2, 14)}
    flags = {k: bool(w >> b & 1) for k, (w, b) in bits.items()}
else:
    names = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F",
             "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI"}
    flags = {k: bool(f.get(v)) for k, v in names.items()}
print(json.dumps({"machine": m, "isa": flags}))
"""


def host_isa() -> dict[str, bool]:
    """This host's flags, probed the same way (for `native` in validate.devices)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["isa"]
    except (ValueError, IndexError, KeyError):
        return {}


def probe_isa(p: Prepared) -> dict[str, bool]:
    done = subprocess.run(p.argv("-c", PROBE), capture_output=True, text=True, timeout=300, env=p.env())
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        err = [ln for ln in clean_stderr(done.stderr).splitlines() if ln.strip()]
        raise RuntimeFailure(f"emu://{p.family.name}: Python does not start under {p.qemu} -cpu {p.family.qemu_cpu} "
                             f"(exit status {done.returncode}: {err[-1] if err else 'no message'}); remove "
                             f"{cache_dir()} and rerun `edgeprep devices setup {p.family.name}`")
    isa = json.loads(lines[-1])["isa"]
    wanted = {k: v for k, v in p.family.isa}
    got = {k: isa.get(k) for k in wanted}
    if got != wanted:  # a different QEMU can model the CPU differently: the family name would lie
        diff = ", ".join(f"{k} {'on' if got[k] else 'off'} (expected {'on' if v else 'off'})"
                         for k, v in wanted.items() if got[k] != v)
        raise RuntimeFailure(f"emu://{p.family.name}: {p.qemu} ({p.qemu_version}) -cpu {p.family.qemu_cpu} exposes "
                             f"another ISA than the family promises: {diff}; use QEMU 8-10 (Debian trixie's "
                             "qemu-user-static)")
    return isa


# ----------------------------------------------------------------------------- prepare
def _marker(family: Family) -> Path:
    return cache_dir() / "families" / f"{family.name}.json"


def prepared_info(family: Family) -> Optional[dict]:
    """The family's record when it is prepared and everything it names still exists, else None."""
    try:
        info = json.loads(_marker(family).read_text())
    except (OSError, ValueError):
        return None
    paths = [info.get("qemu"), info.get("python"), info.get("root"), *info.get("sites", [])]
    return info if all(p is None or Path(p).exists() for p in paths) else None


def prepare(family: Family, runtime: str = "onnxruntime", log: Callable[[str], None] = lambda m: None) -> Prepared:
    """Everything to run ``runtime`` under ``family``, fetched once into the cache, ISA checked."""
    qemu, version = find_qemu(family.arch, build=True, log=log)
    if qemu is None:
        _, _, why = _system_qemu(family.arch)
        raise EmulatorDependencyError(f"emu://{family.name} needs {why}; {APT_FIX}")
    vstr = _vstr(version) if version else "unknown"
    if family.arch == "x86_64":
        root, sites, python = None, (), Path(sys.executable)
    else:
        root = arm64_root(log)
        sites = tuple(arm64_site(rt, log) for rt in dict.fromkeys(["onnxruntime", runtime]) if rt in ARM_WHEELS)
        python = root / ROOT_PYTHON
    p = Prepared(family=family, qemu=qemu, qemu_version=vstr, python=python, root=root, sites=sites, isa={})
    info = prepared_info(family)
    same = info is not None and (info["qemu"], info["qemu_version"], info["python"]) == (str(qemu), vstr, str(python))
    if same and set(map(str, sites)) <= set(info.get("sites", [])):
        return dataclasses.replace(p, isa=info["isa"])
    isa = probe_isa(p)
    record = {"family": family.name, "qemu": str(qemu), "qemu_version": vstr, "qemu_cpu": family.qemu_cpu,
              "python": str(python), "root": str(root) if root else None,
              "sites": sorted({*map(str, sites), *((info or {}).get("sites", []) if same else [])}), "isa": isa}
    marker = _marker(family)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, marker)  # atomic: a reader sees the old record or the new one
    return dataclasses.replace(p, isa=isa)


def status(family: Family) -> dict:
    """`edgeprep devices list`: the family, its promised ISA, and whether it is prepared (no fetching)."""
    info = prepared_info(family)
    return {"family": family.name, "url": family.url, "arch": family.arch, "qemu_cpu": family.qemu_cpu,
            "cpu_model": family.cpu_model, "isa": family.isa_flags, "runtimes": list(family.runtimes),
            "prepared": info is not None, "qemu": info and info["qemu"], "qemu_version": info and info["qemu_version"]}


__all__ = ["FAMILIES", "ARM_FLAGS", "X86_FLAGS", "Prepared", "prepare", "status", "EmulatorDependencyError"]
