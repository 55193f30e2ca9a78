"""Emulated CPU families (emu://, edgeprep/remote/emulate.py): the device runner under real QEMU.

Nothing is mocked: the runtime runs under qemu-x86_64 -cpu Haswell and qemu-aarch64 -cpu cortex-a76,
set up in the cache (EDGEPREP_CACHE, default ~/.cache/edgeprep/emu; ~30 s the first time, then
reused). Without QEMU (and mmdebstrap to fetch what is missing) these tests skip with that reason;
with EDGEPREP_REQUIRE_QEMU=1 (.ci/run sets it) they fail instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines, run_cli, run_recipe_text

from edgeprep.errors import EXIT_GATE_FAILED, GateFailedError
from edgeprep.gates import evaluate_gates, raise_for_failed_gates
from edgeprep.recipe import GatesConfig

K, M, ROWS = 64, 16, 32  # tiny int8 MatMul: 64 inputs, 16 outputs, 32 reference rows


def build_int8_matmul(path: Path, weights: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x -> QuantizeLinear(int8, scale 1/127) -> DequantizeLinear -> MatMul with a per-channel
    DequantizeLinear weight, written to ``path``; returns (x, the float64 reference of the graph).
    ``weights`` "int8": int8 weights over +-127, zero point 0 (what ORT's AVX2 U8S8 kernel saturates
    on: u8 x s8 pairs summed in int16); "uint8": the same numbers as uint8 + zero point 128."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_q = rng.integers(-127, 128, size=(K, M)).astype(np.int8)
    w_scale = (rng.uniform(0.5, 1.5, size=M) / 127).astype(np.float32)
    if weights == "uint8":
        w_store, w_zp = (w_q.astype(np.int16) + 128).astype(np.uint8), np.full(M, 128, np.uint8)
    else:
        w_store, w_zp = w_q, np.zeros(M, np.int8)
    x_scale = np.float32(1 / 127)
    inits = [numpy_helper.from_array(w_store, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(w_zp, "w_zp"), numpy_helper.from_array(np.array(x_scale), "x_scale"),
             numpy_helper.from_array(np.array(np.int8(0)), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "tiny_int8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", M])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    x = rng.uniform(-1, 1, size=(ROWS, K)).astype(np.float32)  # activations over the whole int8 range
    x_q = np.clip(np.round(x / x_scale), -128, 127)
    return x, (x_q * x_scale).astype(np.float64) @ (w_q.astype(np.float64) * w_scale)


@pytest.fixture(scope="session")
def emu():
    """x86-avx2 and arm64-a76 prepared in the cache (fetched once), or skip / fail without QEMU."""
    from edgeprep.remote.emu_cache import EmulatorDependencyError, prepare
    from edgeprep.remote.emulate import FAMILIES

    try:
        return {name: prepare(FAMILIES[name]) for name in ("x86-avx2", "arm64-a76")}
    except EmulatorDependencyError as exc:
        if os.environ.get("EDGEPREP_REQUIRE_QEMU") == "1":
            pytest.fail(f"QEMU is required (EDGEPREP_REQUIRE_QEMU=1): {exc}")
        pytest.skip(f"QEMU cannot be used here: {exc}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Both weight forms of the tiny model, their inputs and references, and the host's parity."""
    import onnxruntime as ort

    from edgeprep.measure.parity import parity

    root = tmp_path_factory.mktemp("tiny-int8")
    forms = {}
    for weights in ("int8", "uint8"):
        path = root / f"tiny_{weights}.onnx"
        x, ref = build_int8_matmul(path, weights)
        host = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        forms[weights] = (path, x, ref.astype(np.float32), parity([ref.astype(np.float32)], [host]))
    return forms


def on_device(form, family: str) -> dict:
    from edgeprep.remote.emulate import EmulatedDevice
    from edgeprep.remote.profile import device_entry
    from edgeprep.validate import artifact_from_path

    path, x, ref, _ = form
    return device_entry(artifact_from_path(path), EmulatedDevice(f"emu://{family}"), ref_inputs=[x], ref_outputs=ref,
                        labels=None, task=None, warmup=20, iters=200, threads=1, batch=1)


@pytest.fixture(scope="module")
def measured(emu, tiny):
    """The device entries the tests judge: int8 on both families, uint8 on x86-avx2 (~4 s each)."""
    return {("int8", "x86-avx2"): on_device(tiny["int8"], "x86-avx2"),
            ("uint8", "x86-avx2"): on_device(tiny["uint8"], "x86-avx2"),
            ("int8", "arm64-a76"): on_device(tiny["int8"], "arm64-a76")}


def test_prepared_families_expose_the_promised_isa(emu):
    # probed under QEMU by prepare(); these are the families' promises (emulate.FAMILIES)
    avx2, a76 = emu["x86-avx2"].isa, emu["arm64-a76"].isa
    assert avx2["avx2"] and avx2["fma"] and not avx2["avx512f"] and not avx2["avx512_vnni"]
    assert a76["asimddp"] and not a76["i8mm"] and not a76["sve"]
    assert tuple(int(v) for v in emu["arm64-a76"].qemu_version.split(".")[:1]) >= (8,)


def test_arm64_a76_int8_is_exact(tiny, measured):
    host_sqnr = tiny["int8"][3]["sqnr_db"]  # 147.7 dB measured on this AVX-512 VNNI host
    e = measured[("int8", "arm64-a76")]
    # 146.6 dB measured (cortex-a76: NEON dot product, int8 x int8 without saturation)
    assert e["parity"]["sqnr_db"] >= 40 and host_sqnr >= 40
    assert e["emulated"] is True and e["family"] == "arm64-a76" and e["latency_is_timing"] is False
    d = e["description"]
    assert d["machine"] == "aarch64" and "cortex-a76" in d["emulated_by"] and "asimddp" in d["isa"]
    assert e["qemu"]["cpu"] == "cortex-a76" and e["latency_ms"]["iters"] == 5  # not a timing: 5 calls only


def test_x86_avx2_int8_weights_saturate_and_uint8_weights_are_exact(measured):
    int8, uint8 = measured[("int8", "x86-avx2")], measured[("uint8", "x86-avx2")]
    # 15.6 dB measured: ORT's AVX2 U8S8 kernel sums u8 x s8 pairs in int16 (vpmaddubsw), which
    # saturates with full-range int8 weights; the same numbers as uint8 + zero point 128: 146.6 dB
    assert int8["parity"]["sqnr_db"] < 25
    assert uint8["parity"]["sqnr_db"] >= 40
    d = int8["description"]
    assert d["isa_flags"]["avx2"] and not d["isa_flags"]["avx512_vnni"] and "Haswell" in d["cpu"]
    assert "avx512_vnni" not in d["isa"]  # the host's own flags are kept apart, in runner_isa


def test_device_gates_fail_on_the_emulated_family_and_latency_gates_ignore_it(tiny, measured):
    from edgeprep.validate import profile_path

    path, _, _, host_parity = tiny["int8"]
    _, stats = profile_path(path, warmup=5, iters=50, threads=1, batch=1, seq_len=2)
    devices = [measured[("int8", "x86-avx2")], measured[("int8", "arm64-a76")],
               {"device": "emu://arm64-a53", "url": "emu://arm64-a53", "error": "device emu://arm64-a53: it broke"}]
    host_p90, emu_p90 = stats.p90_ms, max(d["latency_ms"]["p90"] for d in devices[:2])
    assert emu_p90 > host_p90  # QEMU translates every instruction
    report = {"artifacts": [{"name": "tiny", "target": "onnx", "runtime": "onnxruntime", "role": "edgeprep",
                             "path": str(path), "bytes": 1, "sha256": "0" * 64, "runtime_version": None,
                             "parity": host_parity, "metric": None, "latency_ms": stats.to_report(), "memory": None,
                             "precision": None, "speedup": None, "info": {}, "devices": devices}]}
    limit = (host_p90 + emu_p90) / 2  # the host meets it, the emulated latency would not
    results = evaluate_gates(GatesConfig(min_sqnr_db=40, max_latency_ms_p90=limit, min_top1_agreement=0.5), report)
    by = {(r["name"], r["artifact"]): r for r in results}
    assert by[("min_sqnr_db", "tiny")]["passed"]
    assert not by[("min_sqnr_db", "tiny@emu://x86-avx2")]["passed"]
    assert by[("min_sqnr_db", "tiny@emu://x86-avx2")]["device"] == "emu://x86-avx2"
    assert by[("min_sqnr_db", "tiny@emu://x86-avx2")]["emulated"] is True
    assert by[("min_sqnr_db", "tiny@emu://arm64-a76")]["passed"]
    broken = by[("min_sqnr_db", "tiny@emu://arm64-a53")]
    assert not broken["passed"] and broken["value"] is None and "it broke" in broken["note"]
    assert by[("max_latency_ms_p90", "tiny")]["passed"]
    assert [r for r in results if r["name"] == "max_latency_ms_p90"] == [by[("max_latency_ms_p90", "tiny")]]
    assert ("min_top1_agreement", "tiny@emu://x86-avx2") in by  # every device, every numeric gate
    with pytest.raises(GateFailedError, match="tiny@emu://x86-avx2") as exc:
        raise_for_failed_gates(results)
    assert exc.value.exit_code == EXIT_GATE_FAILED


def test_cli_profile_on_an_emulated_family(emu, tiny):
    proc = run_cli("profile", str(tiny["int8"][0]), "--device", "emu://x86-avx2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["emulated"] is True and out["family"] == "x86-avx2" and out["latency_is_timing"] is False
    assert "Haswell" in out["description"]["emulated_by"] and out["parity"] is None  # a bare file: no reference


def test_unknown_family_is_one_line_exit_2(tmp_path):
    proc = run_cli("profile", str(tmp_path / "m.onnx"), "--device", "emu://x86-avx9")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "unknown emulated CPU family 'x86-avx9'" in proc.stderr and "emu://arm64-a76" in proc.stderr


def test_missing_qemu_is_one_line_exit_4(tmp_path):
    # no qemu and no mmdebstrap on PATH, and an empty cache: nothing to run QEMU with
    path, _ = tmp_path / "m.onnx", build_int8_matmul(tmp_path / "m.onnx", "int8")
    (tmp_path / "bin").mkdir()
    proc = run_cli("profile", str(path), "--device", "emu://x86-avx2",
                   env={"PATH": str(tmp_path / "bin"), "EDGEPREP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert len(error_lines(proc)) == 1
    assert "qemu-x86_64" in proc.stderr and "apt-get install qemu-user-static mmdebstrap" in proc.stderr


# QAT with full-range int8 weights (target_cpu x86-vnni): exact on this host, saturating on AVX2.
GATED_RECIPE = """\
name: emu-gates
seed: 0
model: {source: vit-tiny-digits}
data: {source: digits, calibration_samples: 64}
stages:
  - {kind: qat, weights: int8, target_cpu: x86-vnni, intervention: none, steps: 10, train: {lr: 0.0003}}
export:
  - target: onnx
validate:
  split: test
  parity_samples: 64
  max_samples: 128
  profile: {warmup: 2, iters: 10}
  devices: [native, {url: emu://x86-avx2, name: avx2}]
gates:
  min_sqnr_db: 45
  max_metric_drop: 1.0
  max_latency_ms_p90: 50
"""


@pytest.mark.slow
def test_recipe_fails_on_the_emulated_family_while_the_host_passes(emu, tmp_path):
    from edgeprep.check import load_report

    proc = run_recipe_text(tmp_path, GATED_RECIPE, "--quiet")
    report = load_report(tmp_path / "run")  # typed: edgeprep.report/2, devices and diagnosis included
    gates = {g.artifact: g for g in report.gates if g.name == "min_sqnr_db"}
    # measured: host 60.0 dB, AVX2 34.6 dB (int16 saturation in the U8S8 kernel)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert gates["onnx"].passed and not gates["onnx@avx2"].passed and gates["onnx@avx2"].emulated
    assert "onnx@avx2" in error_lines(proc)[0] and len(error_lines(proc)) == 1
    assert "onnx@native" not in gates  # native is the host's entry: judged once, as "onnx"
    drop = {g.artifact: g for g in report.gates if g.name == "max_metric_drop"}
    rows = report.baseline.metric_on_parity_rows  # a device's metric is on the 64 parity rows
    assert rows.samples == 64 and drop["onnx@avx2"].passed
    art = next(a for a in report.artifacts if a.name == "onnx")
    native, avx2 = art.devices
    assert drop["onnx@avx2"].value == pytest.approx(rows.value - avx2.metric.value)
    latency = [g for g in report.gates if g.name == "max_latency_ms_p90"]
    assert [g.artifact for g in latency] == ["onnx"] and latency[0].passed
    assert native.native and native.parity == art.parity and native.latency_ms == art.latency_ms
    assert avx2.emulated and avx2.family == "x86-avx2" and avx2.speedup is None
    assert avx2.latency_is_timing is False and "not a timing" in avx2.latency_note
    md = (tmp_path / "run" / "report.md").read_text()
    assert "emulated CPUs" in md and "NOT a timing" in md
    # where it broke, found on the emulated family itself, and the fix re-validated there
    diagnosis = avx2.diagnosis
    layer = diagnosis.divergence["layer"]
    assert layer["name"].startswith("blocks.") and layer["op_type"] == "Gemm"
    assert diagnosis.divergence["sqnr_after_db"] < 45 <= (diagnosis.divergence["sqnr_before_db"] or 1e9)
    fixes = {f["option"]: f for f in diagnosis.fixes}
    assert fixes["int8_weights: u8"]["passes"] and fixes["int8_weights: u8"]["sqnr_db"] > 45  # measured ~60 dB
    assert fixes["int8_weights: u8"]["bytes_delta"] > 0  # one uint8 zero point per output channel
    assert art.diagnosis is None  # the host passed: nothing to localize there
    line = error_lines(proc)[0]
    assert f"first diverging layer {layer['name']} (Gemm)" in line and "export int8_weights: u8 ->" in line
    assert "qat target_cpu: portable" in line
    assert "## Where parity breaks" in md and "## Fixes measured on the failing target" in md
