"""Each artifact's own memory (edgeprep/measure/memory.py): its load and inference measured in a
subprocess of its own, not the high-water mark of the process that judges every artifact."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprep.measure.memory import load_and_run_bytes, measure_memory
from edgeprep.report import build_document, render_markdown
from edgeprep.types import Artifact, TensorSpec

MIB = 2**20
BALLAST_BYTES = 256 * MIB  # makes this process far bigger than any artifact's own process
LARGE_IN, LARGE_OUT = 2048, 4096  # a MatMul weight of 32 MiB (fp32)


def _matmul_artifact(path: Path, d_in: int, d_out: int) -> Artifact:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((d_in, d_out)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return Artifact(name=path.stem, target="onnx", runtime="onnxruntime", path=path,
                    inputs=(TensorSpec("x", ("batch", d_in), "float32"),),
                    outputs=(TensorSpec("y", ("batch", d_out), "float32"),), sha256="", size_bytes=path.stat().st_size)


@pytest.fixture(scope="module")
def ballast():
    """256 MiB touched in this process, as edgeprep's own process holds torch and the data."""
    block = np.ones(BALLAST_BYTES, dtype=np.uint8)
    yield block
    del block


@pytest.fixture(scope="module")
def measured(tmp_path_factory, ballast):
    tmp = tmp_path_factory.mktemp("memory")
    small = _matmul_artifact(tmp / "small.onnx", 64, 64)
    large = _matmul_artifact(tmp / "large.onnx", LARGE_IN, LARGE_OUT)
    return {a.name: (a, measure_memory(a, [np.ones((1, a.inputs[0].shape[1]), np.float32)], threads=1))
            for a in (small, large)}


def test_artifacts_of_different_size_measure_their_own_memory(measured):
    m_small, m_large = measured["small"][1], measured["large"][1]
    for m in (m_small, m_large):
        assert m["method"] == "subprocess" and "error" not in m, m
        assert m["batch"] == 1 and m["iters"] == 3 and m["threads"] == 1
        assert m["load_and_run_bytes"] == m["peak_rss_bytes"] - m["rss_before_load_bytes"]
        assert 0 < m["rss_before_load_bytes"] < m["peak_rss_bytes"]
        if sys.platform.startswith("linux"):
            assert m["rss_source"] == "VmHWM" and m["peak_reset"] is True
    weights = LARGE_IN * LARGE_OUT * 4
    # measured on a 2-core EPYC, ORT 1.x: small 10.3 MiB (the session's own overhead), large 73.6 MiB
    # (the weights parsed from the file, then copied and prepacked for MLAS: ~2x)
    assert m_small["load_and_run_bytes"] < 32 * MIB
    extra = m_large["load_and_run_bytes"] - m_small["load_and_run_bytes"]
    assert weights * 0.9 <= extra <= weights * 4, (extra / MIB, weights / MIB)


def test_the_subprocess_is_not_charged_with_this_process_memory(measured, ballast):
    # this process holds the ballast; the subprocess's numbers must not include it (the old
    # latency_ms.peak_rss_bytes was this process's mark, and a child's ru_maxrss inherits it)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert own_peak > BALLAST_BYTES
    for _, m in measured.values():
        assert m["peak_rss_bytes"] < 200 * MIB < own_peak  # measured 58 and 121 MiB
        assert m["rss_before_load_bytes"] < 100 * MIB  # Python, numpy and onnxruntime: measured 48 MiB


def test_rss_probe_ignores_the_parent_mark_and_restarts(ballast):
    """The runner's probe (rss.py), as sent to a device: a child of this 256+ MiB process reports its
    own peak (ru_maxrss would report ours), and a restart forgets a freed 64 MiB block."""
    source = (Path(__file__).parents[1] / "edgeprep" / "remote" / "rss.py").read_text()
    program = ("import json, resource, sys; g = {}; exec(compile(sys.stdin.read(), 'rss', 'exec'), g)\n"
               "inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
               "first = g['peak_rss_bytes']()\n"
               "block = bytearray(64 << 20)\n"
               "for i in range(0, len(block), 4096): block[i] = 1\n"
               "grown = g['peak_rss_bytes'](); del block\n"
               "reset = g['reset_peak_rss'](); after = g['peak_rss_bytes']()\n"
               "print(json.dumps([inherited, first, grown, reset, after, g['rss_source']()]))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", program], input=source, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    inherited, first, grown, reset, after, src = json.loads(proc.stdout)
    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM and clear_refs are Linux's")
    assert src == "VmHWM" and reset is True
    assert inherited > BALLAST_BYTES > 16 * MIB > first  # the kernel carried our mark into the child's ru_maxrss
    assert grown - first >= 60 * MIB
    assert after < grown - 60 * MIB  # the freed block is no longer in the restarted mark


def test_a_broken_model_or_a_runtime_without_runner_is_recorded_not_raised(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    art = Artifact(name="bad", target="onnx", runtime="onnxruntime", path=bad,
                   inputs=(TensorSpec("x", ("batch", 4), "float32"),), outputs=(), sha256="", size_bytes=11)
    m = measure_memory(art, [np.ones((1, 4), np.float32)], threads=1)
    assert m["method"] == "subprocess" and "bad.onnx" in m["error"] and load_and_run_bytes(m) is None
    coreml = Artifact(name="cm", target="coreml", runtime="coreml", path=tmp_path / "m.mlpackage", inputs=(),
                      outputs=(), sha256="", size_bytes=0)
    m = measure_memory(coreml, [np.ones((1, 4), np.float32)], threads=1)
    assert m["method"] is None and "coreml has no standalone runner" in m["not_measured"]


def test_load_and_run_bytes_reads_old_and_new_entries():
    assert load_and_run_bytes({"method": "subprocess", "load_and_run_bytes": 5 * MIB}) == 5 * MIB
    # device entries written before the field had peak and before only
    assert load_and_run_bytes({"peak_rss_bytes": 90 * MIB, "rss_before_load_bytes": 60 * MIB}) == 30 * MIB
    assert load_and_run_bytes(None) is None and load_and_run_bytes({"error": "x"}) is None


def _report(arts):
    return {"recipe": "r", "passed": True, "gates": [], "artifacts": arts}


def _lat(**extra):
    return {"p50": 1.0, "p90": 1.1, "p99": 1.2, "mean": 1.0, "ci95_p50": [0.9, 1.1], "iters": 30, "warmup": 5,
            "threads": 1, "batch": 1, **extra}


def test_report_shows_each_artifact_memory_labelled():
    arts = [{"name": "small", "role": "edgeprep", "latency_ms": _lat(),
             "memory": {"method": "subprocess", "load_and_run_bytes": int(10.25 * MIB), "peak_rss_bytes": 58 * MIB,
                        "rss_before_load_bytes": int(47.75 * MIB)}},
            {"name": "large", "role": "baseline", "latency_ms": _lat(),
             "memory": {"method": "subprocess", "load_and_run_bytes": int(73.5 * MIB), "peak_rss_bytes": 121 * MIB,
                        "rss_before_load_bytes": int(47.5 * MIB)}},
            {"name": "broken", "role": "ptq", "latency_ms": _lat(), "memory": {"method": "subprocess",
                                                                              "error": "it broke"}}]
    md = render_markdown(build_document(_report(arts)))
    assert "| name | p50 ms |" in md and "load+run MiB (own process) | process peak MiB (own process) |" in md
    assert "| 1 | 10.2 | 58.0 |" in md and "| 1 | 73.5 | 121.0 |" in md and "| 1 | — | — |" in md
    assert "peak RSS minus its RSS right before the load" in md and "broken: memory not measured: it broke" in md


def test_an_old_report_renders_without_the_process_wide_rss():
    arts = [{"name": "onnx", "role": "edgeprep", "latency_ms": _lat(peak_rss_bytes=656_000_000)}]
    md = render_markdown(build_document(_report(arts)))
    assert "625.6" not in md and "| 1 | — | — |" in md
    assert "recorded only the whole edgeprep process's peak RSS" in md


def test_console_summary_has_the_memory_column():
    from edgeprep.cli import run as run_cli_module
    from edgeprep.cli.app import out

    report = {"recipe": "r", "passed": True, "gates": [], "baseline": {"metric": {"name": "accuracy", "value": 0.9}},
              "artifacts": [{"name": "onnx", "role": "edgeprep", "runtime": "onnxruntime", "bytes": 1000,
                             "metric": {"value": 0.9}, "parity": {"sqnr_db": 50.0}, "latency_ms": _lat(),
                             "precision": {"low_precision_op_fraction": 0.0}, "speedup": 1.0,
                             "memory": {"method": "subprocess", "load_and_run_bytes": int(10.25 * MIB)}},
                            {"name": "cm", "role": "edgeprep", "runtime": "coreml", "bytes": 10, "not_run": "macOS",
                             "memory": None}]}
    with out.capture() as cap:
        run_cli_module._print_summary(report, Path("runs/r"))
    text = cap.get()
    assert "load+run MiB*" in text and "10.2" in text and "* load+run MiB: memory the artifact's load" in text
