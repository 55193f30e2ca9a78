"""`edgeprep run` exporting one model to every target that runs here; one report row per artifact."""
from __future__ import annotations

import json
import platform

import pytest
from conftest import REPO, finished_run

pytest.importorskip("executorch", reason="the executorch extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
pytest.importorskip("litert_torch", reason="the litert-convert extra is not installed")
pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from edgeprep.exporters import get_runtime  # noqa: E402

TRT_USABLE = get_runtime("tensorrt").usable_here()[0]


@pytest.mark.slow
def test_all_targets_recipe_runs_and_reports_every_runtime(tmp_path_factory):
    text = (REPO / "recipes" / "all-targets.yaml").read_text()
    text = text.replace("steps: 400", "steps: 150").replace("iters: 200", "iters: 20")  # a shorter budget
    # the emulated families are tested in test_emulate.py; here they would multiply the runtime by ~4
    text = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("devices:"))
    run = finished_run(tmp_path_factory, "all-targets", text) / "run"
    report = json.loads((run / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"onnx", "onnx-ptq-static", "ort-mobile", "executorch", "executorch-int8",
                         "litert", "litert-int8", "coreml", "tensorrt", "tensorrt-int8"}
    assert {a["runtime"] for a in arts.values()} == {"onnxruntime", "executorch", "litert", "coreml", "tensorrt"}
    baseline = report["baseline"]["metric"]["value"]
    for name in ("onnx", "ort-mobile", "executorch", "litert"):  # fp32 on each runtime: parity gate >= 30 dB
        a = arts[name]
        assert a["parity"]["sqnr_db"] is None or a["parity"]["sqnr_db"] >= 30.0, name
        assert a["parity"]["top1_agreement"] == 1.0, name
        assert abs(a["metric"]["value"] - baseline) < 1e-9, name
        assert a["latency_ms"]["p50"] > 0 and a["latency_ms"]["batch"] == 1, name
    # int8 peers (each runtime's own PTQ), judged against the fp32 model: reported, not gated.
    # Measured on this 150-step model: ORT static and ExecuTorch PT2E >= 0.95; LiteRT's static
    # recipe (softmax, norms and the int8 logits included) 0.949.
    for name in ("onnx-ptq-static", "executorch-int8", "litert-int8"):
        a = arts[name]
        assert a["role"] == "ptq" and a["parity"]["top1_agreement"] >= 0.9, (name, a["parity"])
        assert a["bytes"] < arts[name.split("-")[0] if name != "onnx-ptq-static" else "onnx"]["bytes"] / 2, name
    assert arts["executorch"]["info"]["xnnpack"]["partitions"] >= 1
    assert arts["litert-int8"]["precision"]["low_precision_op_fraction"] == 1.0
    assert arts["ort-mobile"]["info"]["mobile"]["usability"]["dynamic_inputs"] == []  # fixed batch
    coreml = arts["coreml"]
    assert coreml["info"]["spec"]["deployment_target"] == "iOS16" and coreml["bytes"] > 0
    for name in ("tensorrt", "tensorrt-int8"):  # the ONNX prepared for TensorRT: every node supported
        assert arts[name]["info"]["tensorrt_support"]["all_supported"], arts[name]["info"]["tensorrt_support"]
    assert arts["tensorrt-int8"]["info"]["tensorrt_support"]["quantize_nodes"] > 0
    not_run = {n for n, a in arts.items() if a.get("not_run")}
    expected_not_run = ({"coreml"} if platform.system() != "Darwin" else set()) | (
        set() if TRT_USABLE else {"tensorrt", "tensorrt-int8"})
    assert not_run == expected_not_run
    for name in not_run:  # not run: gates skipped with the reason, never passed silently
        assert arts[name]["parity"] is None and arts[name]["latency_ms"] is None
    skipped = [g for g in report["gates"] if g.get("skipped")]
    assert {g["artifact"] for g in skipped} == not_run - {"tensorrt-int8"}  # a ptq peer is never gated
    assert len(skipped) == 2 * len(not_run - {"tensorrt-int8"})
    assert report["passed"]
    md = (run / "report.md").read_text()
    for name in arts:
        assert f"| {name} |" in md, name
    assert "## ORT Mobile usability" in md
    if platform.system() != "Darwin":
        assert "## Not run on this machine" in md and "coreml (coreml): Core ML prediction needs macOS" in md
    assert "## TensorRT preparation (static check)" in md and "## Core ML programs" in md
