"""Each artifact, judged on its runtime (parametrized over the run's artifacts by conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprep.exporters import get_runtime
from edgeprep.fsutil import path_bytes
from edgeprep.manifest import load_artifact, load_reference, read_manifest
from edgeprep.measure.metrics import metric_for
from edgeprep.measure.parity import parity
from edgeprep.validate import run_batched

FP32_MIN_SQNR_DB = 40.0  # an fp32 export must match PyTorch to float rounding
DEFAULT_MAX_METRIC_DROP = 0.01


@pytest.fixture
def artifact(artifact_dir):
    return load_artifact(artifact_dir, verify=True)  # raises IntegrityError on a sha256 mismatch


@pytest.fixture
def loaded(artifact):
    runtime = get_runtime(artifact.runtime)
    usable, why = runtime.usable_here()
    if not usable:  # e.g. Core ML off macOS: its spec checks ran at export (report "Not run on this machine")
        pytest.skip(f"{artifact.name}: {why}")
    return runtime.load(artifact, threads=1)


@pytest.fixture
def reference(artifact_dir):
    return load_reference(artifact_dir)


def test_integrity_matches_report(artifact, report):
    entries = {a["name"]: a for a in report.get("artifacts", [])}
    if artifact.name not in entries:
        pytest.skip("artifact not in report.json (exported outside a run)")
    assert entries[artifact.name]["sha256"] == artifact.sha256
    assert entries[artifact.name]["bytes"] == path_bytes(artifact.path)


def test_io_contract(artifact, loaded, reference):
    assert tuple(loaded.input_names) == tuple(s.name for s in artifact.inputs)
    outputs = loaded.run([reference.inputs[0][:3]])
    assert len(outputs) == len(artifact.outputs)
    for out, spec in zip(outputs, artifact.outputs):
        assert str(out.dtype) == spec.dtype, f"{spec.name}: dtype {out.dtype} != manifest {spec.dtype}"
        assert out.ndim == len(spec.shape)
        for got, want in zip(out.shape, spec.shape):
            assert got == (3 if isinstance(want, str) else want), f"{spec.name}: shape {out.shape} vs {spec.shape}"


def test_dynamic_batch(artifact, loaded, reference):
    x = reference.inputs[0]
    one = loaded.run([x[:1]])[0]
    many = loaded.run([x[:5]])[0]
    assert many.shape[0] == 5
    if artifact.role == "ptq":
        # ORT dynamic quantization picks activation scales per call from the whole batch, so a
        # sample's output legitimately depends on its batch-mates; only the shape is checked.
        return
    np.testing.assert_allclose(one[0], many[0], rtol=1e-4, atol=1e-4)


def test_parity(artifact, loaded, reference, gates):
    result = parity([reference.outputs[0]], [run_batched(loaded, reference.inputs[0])])
    if artifact.role == "ptq":
        # Peers show what ORT's own PTQ gives; their parity is reported, not gated. Still sane:
        assert result["top1_agreement"] >= 0.5, result
        return
    limit = FP32_MIN_SQNR_DB if artifact.role == "baseline" else gates.get("min_sqnr_db")
    if limit is None:
        pytest.skip("recipe sets no min_sqnr_db gate")
    assert result["sqnr_db"] is None or result["sqnr_db"] >= limit, result


def test_metric_on_runtime(artifact, loaded, reference, gates):
    if reference.labels is None:
        pytest.skip("artifact has no labelled reference data")
    name, fn = metric_for(reference.task)
    torch_value = fn(reference.outputs[0], reference.labels)
    runtime_value = fn(run_batched(loaded, reference.inputs[0]), reference.labels)
    if artifact.role == "ptq":
        pytest.skip(f"peer baseline: {name} {runtime_value:.4f} on the runtime vs {torch_value:.4f} (not gated)")
    drop = gates.get("max_metric_drop")
    drop = DEFAULT_MAX_METRIC_DROP if drop is None else drop
    assert torch_value - runtime_value <= drop, f"{name}: runtime {runtime_value:.4f} vs PyTorch {torch_value:.4f}"


def test_latency_budget(artifact, loaded, reference, gates):
    budget = gates.get("max_latency_ms_p90")
    if budget is None or artifact.role != "edgeprep":
        pytest.skip("recipe sets no max_latency_ms_p90 gate for this artifact")
    stats = loaded.profile([reference.inputs[0][:1]], warmup=10, iters=100)
    assert stats.p90_ms <= budget, f"p90 {stats.p90_ms:.3f} ms > budget {budget} ms"


def test_manifest_schema(artifact_dir):
    m = read_manifest(artifact_dir)
    assert m["schema"] == "edgeprep.manifest/1"
    assert m["role"] in ("edgeprep", "baseline", "ptq")
