"""Artifact directories: manifest.json + model file(s) + reference.npz.

The manifest makes an artifact self-describing, so ``edgeprep validate ARTIFACT_DIR`` can re-check
it with nothing else: which runtime runs it, its I/O contract, its sha256, and reference inputs and
outputs computed by the final PyTorch model.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprep.errors import BadInputError, IntegrityError
from edgeprep.fsutil import path_bytes, sha256_file, write_bytes_atomic, write_json_atomic
from edgeprep.jsonfile import JsonFileError, read_json_object
from edgeprep.types import Artifact, TensorSpec

MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.npz"
MANIFEST_SCHEMA = "edgeprep.manifest/1"
REQUIRED_KEYS = ("name", "target", "runtime", "file", "sha256", "bytes", "inputs", "outputs", "reference")


def describe_file(name: str, target: str, runtime: str, path: Path, inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], role: str = "edgeprep",
                  info: Mapping[str, Any] | None = None) -> Artifact:
    """Build an Artifact for a model file that an exporter has just written."""
    path = Path(path)
    return Artifact(name=name, target=target, runtime=runtime, path=path, inputs=tuple(inputs),
                    outputs=tuple(outputs), sha256=sha256_file(path),
                    size_bytes=path_bytes(path), role=role, info=dict(info or {}))


def write_manifest(artifact: Artifact, *, task: str, ref_inputs: Sequence[np.ndarray],
                   ref_outputs: Sequence[np.ndarray], labels: np.ndarray | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write manifest.json and reference.npz into the artifact's directory."""
    buf = io.BytesIO()
    arrays = {f"input_{i}": np.asarray(a) for i, a in enumerate(ref_inputs)}
    arrays.update({f"output_{i}": np.asarray(a) for i, a in enumerate(ref_outputs)})
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(artifact.dir / REFERENCE_NAME, buf.getvalue())
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "name": artifact.name,
        "target": artifact.target,
        "runtime": artifact.runtime,
        "role": artifact.role,
        "file": artifact.path.name,
        "sha256": artifact.sha256,
        "bytes": artifact.size_bytes,
        "inputs": [s.to_json() for s in artifact.inputs],
        "outputs": [s.to_json() for s in artifact.outputs],
        "info": dict(artifact.info),
        "reference": {"file": REFERENCE_NAME, "task": task, "samples": int(len(ref_inputs[0])),
                      "sha256": sha256_file(artifact.dir / REFERENCE_NAME)},
        "exported_on": exported_on(artifact.runtime),
        **dict(extra or {}),
    }
    write_json_atomic(artifact.dir / MANIFEST_NAME, manifest)
    return artifact.dir / MANIFEST_NAME


def exported_on(runtime: str) -> dict[str, Any]:
    """The exporting host's CPU and the version of the runtime the export was checked on: a
    self-check that passed on an AVX-512 VNNI host says little about an AVX2-only one."""
    from edgeprep.exporters import get_runtime
    from edgeprep.measure.host import host_cpu

    try:
        version = get_runtime(runtime).version()
    except BadInputError:  # an artifact of a runtime this edgeprep does not know: no version to give
        version = None
    return {"cpu": host_cpu(), "runtime": runtime, "runtime_version": version}


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BadInputError(f"{artifact_dir}: no {MANIFEST_NAME} here; pass an artifact directory "
                            "written by `edgeprep run` or `edgeprep export`")
    try:
        manifest = read_json_object(path)
    except JsonFileError as exc:
        raise IntegrityError(f"{path}: manifest is {exc}; re-export the artifact") from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise IntegrityError(f"{path}: schema {manifest.get('schema')!r} is not {MANIFEST_SCHEMA!r}; "
                             "re-export the artifact with this edgeprep version")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise IntegrityError(f"{path}: manifest lacks {', '.join(missing)}; re-export the artifact")
    return manifest


def load_artifact(artifact_dir: Path, verify: bool = True) -> Artifact:
    """Read an artifact directory; with ``verify`` refuse it when the file's sha256 differs."""
    artifact_dir = Path(artifact_dir)
    m = read_manifest(artifact_dir)
    path = artifact_dir / m["file"]
    if not (path.is_file() or path.is_dir()):  # a directory: a Core ML .mlpackage
        raise IntegrityError(f"{path}: model file named in {MANIFEST_NAME} is missing; re-export it")
    if verify:
        actual = sha256_file(path)
        if actual != m["sha256"]:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's {m['sha256'][:12]}...; "
                "the artifact is corrupted or was modified; re-export it")
    return Artifact(name=m["name"], target=m["target"], runtime=m["runtime"], path=path,
                    inputs=tuple(TensorSpec.from_json(s) for s in m["inputs"]),
                    outputs=tuple(TensorSpec.from_json(s) for s in m["outputs"]),
                    sha256=m["sha256"], size_bytes=int(m["bytes"]), role=m.get("role", "edgeprep"),
                    info=m.get("info", {}))


class Reference:
    """Reference inputs/outputs (from the final PyTorch model) stored beside an artifact."""

    def __init__(self, inputs: list[np.ndarray], outputs: list[np.ndarray],
                 labels: np.ndarray | None, task: str):
        self.inputs, self.outputs, self.labels, self.task = inputs, outputs, labels, task


def load_reference(artifact_dir: Path) -> Reference:
    artifact_dir = Path(artifact_dir)
    m = read_manifest(artifact_dir)
    ref = m["reference"]
    path = artifact_dir / ref["file"]
    if not path.is_file() or sha256_file(path) != ref["sha256"]:
        raise IntegrityError(f"{path}: reference data missing or modified; re-export the artifact")
    with np.load(path) as z:
        inputs = [z[k] for k in sorted((k for k in z.files if k.startswith("input_")),
                                       key=lambda k: int(k.split("_")[1]))]
        outputs = [z[k] for k in sorted((k for k in z.files if k.startswith("output_")),
                                        key=lambda k: int(k.split("_")[1]))]
        labels = z["labels"] if "labels" in z.files else None
    return Reference(inputs, outputs, labels, ref["task"])
