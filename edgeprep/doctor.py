"""`edgeprep doctor`: each runtime / extra: installed?, version, usable here?; and this CPU's ISA flags."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
import platform
from dataclasses import dataclass
from typing import Callable, Optional

# What importing or probing a broken install raises: a missing shared library or symbol (ImportError,
# OSError), a wrong-ABI build (RuntimeError, AttributeError, ValueError), a probe's wrong result.
BROKEN_INSTALL_ERRORS = (ImportError, OSError, RuntimeError, AttributeError, ValueError, TypeError, AssertionError)


@dataclass(frozen=True)
class Component:
    name: str  # what the user knows it as
    module: str  # import name
    dist: str  # distribution name for the version
    extra: Optional[str]  # edgeprep extra that installs it (None: core dependency)
    targets: str  # export targets that need it
    probe: Optional[Callable[[], tuple[bool, str]]] = None  # does it really work on this machine?


def _ort_probe() -> tuple[bool, str]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0]
    ok = bool(np.allclose(out, [2.0, 4.0]))
    return ok, f"ran a test graph on {', '.join(ort.get_available_providers())}" if ok else "wrong result"


def _coreml_probe() -> tuple[bool, str]:
    if platform.system() != "Darwin":
        return True, "conversion only; CoreML prediction needs macOS"
    return True, "conversion and prediction (macOS)"


def _tensorrt_probe() -> tuple[bool, str]:
    import tensorrt  # noqa: F401  (import succeeds only with its libraries)

    return True, "imported; needs an NVIDIA GPU to build engines"


# What every target needs; each target's own packages (and their probes) are in its TargetSpec.
CORE: tuple[Component, ...] = (
    Component("torch", "torch", "torch", None, "all"),
    Component("onnx", "onnx", "onnx", None, "onnx"),
    Component("onnxscript", "onnxscript", "onnxscript", None, "onnx (dynamo exporter)"),
    Component("transformers", "transformers", "transformers", "hf", "Hugging Face models"),
)
ORT = Component("onnxruntime", "onnxruntime", "onnxruntime", None, "", _ort_probe)
COREMLTOOLS = Component("coremltools", "coremltools", "coremltools", "coreml", "", _coreml_probe)
EXECUTORCH = Component("executorch", "executorch", "executorch", "executorch", "")
LITERT = Component("ai-edge-litert", "ai_edge_litert", "ai-edge-litert", "litert", "interpreter")
LITERT_TORCH = Component("litert-torch", "litert_torch", "litert-torch", "litert-convert", "converter")
TENSORRT = Component("tensorrt", "tensorrt", "tensorrt", "tensorrt", "engine build, needs a GPU", _tensorrt_probe)
POLYGRAPHY = Component("polygraphy", "polygraphy", "polygraphy", "tensorrt", "runs and compares engines")


def components() -> list[Component]:
    """The core packages, then every registered target's, each once, naming the targets that need it."""
    from edgeprep.registry import target_specs

    users: dict[str, list[str]] = {}
    found: dict[str, Component] = {}
    for spec in target_specs().values():
        for c in spec.components:
            found.setdefault(c.name, c)
            users.setdefault(c.name, []).append(spec.name)
    per_target = [dataclasses.replace(c, targets=", ".join(users[c.name]) + (f" ({c.targets})" if c.targets else ""))
                  for c in found.values()]
    return [*CORE[:3], *per_target, *CORE[3:]]


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def diagnose() -> list[dict]:
    rows = []
    for c in components():
        installed = importlib.util.find_spec(c.module) is not None
        row = {"name": c.name, "installed": installed, "version": _version(c.dist) if installed else None,
               "extra": c.extra, "targets": c.targets, "usable": False, "note": ""}
        if not installed:
            row["note"] = f"pip install 'edgeprep[{c.extra}]'" if c.extra else "core dependency missing: reinstall edgeprep"
        else:
            try:
                importlib.import_module(c.module)
                row["usable"], row["note"] = c.probe() if c.probe else (True, "imports")
            except BROKEN_INSTALL_ERRORS as exc:  # a broken install must show here, not crash doctor
                row["note"] = f"installed but fails: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        rows.append(row)
    rows.append(_ssh_row())
    rows.append(_cpu_row())
    return rows


def _cpu_row() -> dict:
    """This machine's CPU and its kernel-relevant ISA flags: int8 kernels (and so parity and
    latency) differ per CPU family, e.g. AVX2-only vs AVX-512 VNNI."""
    from edgeprep.measure.host import cpu_label, host_cpu

    cpu = host_cpu()
    return {"name": "cpu", "installed": True, "version": None, "extra": None,
            "targets": "all (int8 kernels differ per CPU family)", "usable": True,
            "note": f"{cpu_label(cpu, all_flags=True)}, {cpu['cores']} cores", "cpu": cpu}


def _ssh_row() -> dict:
    """The OpenSSH client `profile --device` uses (a system program, not a Python package)."""
    import shutil
    import subprocess

    path = shutil.which("ssh")
    version = None
    if path:  # `ssh -V` prints "OpenSSH_9.2p1 Debian-2, OpenSSL ..." on stderr
        probe = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, check=False)
        version = (probe.stderr or probe.stdout).split(",")[0].strip() or None
    return {"name": "ssh client", "installed": bool(path), "version": version, "extra": None,
            "targets": "profile --device ssh://", "usable": bool(path),
            "note": "system OpenSSH client" if path else "install OpenSSH's client (apt-get install openssh-client)"}
