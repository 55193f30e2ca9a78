"""ORT runtime: load/run/profile, ORT's own PTQ peers, and the precision census on real sessions."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeprep.errors import RuntimeFailure
from edgeprep.exporters import get_exporter, get_runtime
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.measure.parity import parity, sqnr_db
from edgeprep.types import Artifact, TensorSpec

pytestmark = pytest.mark.slow


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, 2-head attention, GELU MLP (Linear-heavy)."""

    def __init__(self, dim: int = 64, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(att)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.embed = nn.Linear(16, dim)  # 16 patches of 4x4 pixels from a 16x16 image
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(b, 16, 16)
        x = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


def _data(n: int, seed: int) -> np.ndarray:
    # Smooth images in [0, 1] (like the digits data), not white noise: calibration ranges matter.
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 1, 4, 4)).astype(np.float32)
    return np.ascontiguousarray(coarse.repeat(4, axis=2).repeat(4, axis=3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyViT().eval()
    root = tmp_path_factory.mktemp("artifacts")
    exporter = get_exporter("onnx")
    opts = OnnxOptions(mobile=True, ptq=["dynamic", "static"])
    handlers = list(logging.getLogger().handlers)
    art = exporter.export(model, (torch.from_numpy(_data(2, 0)),), root / "onnx", opts)
    peers = exporter.derived(art, [_data(64, 1)], root, opts)
    # onnxruntime.tools / .quantization call logging.basicConfig on first use; the CLI's stderr
    # would then carry every library's log lines. Exporting must leave the root logger as it was.
    assert logging.getLogger().handlers == handlers
    return model, art, {p.info["ptq"]: p for p in peers}


def _torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_runs_matches_pytorch_and_census_is_zero(exported):
    model, art, _ = exported
    loaded = get_runtime("onnxruntime").load(art, threads=1)
    assert loaded.input_names == ("x",) and loaded.threads == 1
    x = _data(5, 2)
    out = loaded.run([x.astype(np.float64)])  # inputs are cast to the graph's dtype
    assert len(out) == 1 and out[0].shape == (5, 10)
    assert sqnr_db(_torch(model, x), out[0]) >= 40.0  # measured ~136 dB
    census = loaded.precision_census()
    assert census["low_precision_op_fraction"] == 0.0 and census["low_precision_ops"] == 0
    assert census["float_ops"] >= 10 and census["optimization_level"] == "extended"


def test_profile_stats_are_ordered(exported):
    _, art, _ = exported
    stats = get_runtime("onnxruntime").load(art, threads=1).profile([_data(1, 3)], warmup=3, iters=30)
    assert stats.iters == 30 and stats.batch == 1 and stats.threads == 1
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.ci95_p50_ms[0] <= stats.p50_ms <= stats.ci95_p50_ms[1]


def test_ptq_peers_are_written_and_run(exported, tmp_path):
    model, art, peers = exported
    assert set(peers) == {"dynamic", "static"}
    x = _data(32, 4)
    ref = _torch(model, x)
    for kind, peer in peers.items():
        assert peer.name == f"onnx-ptq-{kind}" and peer.role == "ptq" and peer.dir.name == peer.name
        assert sorted(p.name for p in peer.dir.iterdir()) == ["model.onnx"]
        assert peer.size_bytes < art.size_bytes * 0.6  # int8 weights
        assert peer.inputs == art.inputs and peer.info["optimize"] == "extended"
        out = get_runtime("onnxruntime").load(peer).run([x])[0]
        p = parity([ref], [out])
        # measured: dynamic ~38 dB, static ~34 dB, top-1 1.0 (random weights, 32 samples)
        assert p["sqnr_db"] >= 15.0 and p["top1_agreement"] >= 0.8


def test_census_of_ptq_peers_shows_integer_kernels(exported):
    _, _, peers = exported
    rt = get_runtime("onnxruntime")
    static = rt.load(peers["static"]).precision_census()
    # ORT fuses every DQ -> MatMul/Gemm -> Q at "extended": all heavy ops run QLinearMatMul/QGemm
    assert static["low_precision_op_fraction"] >= 0.9, static
    assert static["ops"].get("QLinearMatMul", 0) >= 6
    dynamic = rt.load(peers["dynamic"]).precision_census()
    # weights are int8, but activation x activation matmuls (attention) stay float
    assert dynamic["ops"].get("DynamicQuantizeMatMul", 0) + dynamic["ops"].get("MatMulInteger", 0) >= 6
    assert 0.5 <= dynamic["low_precision_op_fraction"] < 1.0, dynamic


def test_static_ptq_agrees_with_its_quantized_reference(exported):
    """The int8 kernels (QLinearMatMul at "extended") against the same QDQ graph with every graph
    optimization off, where ORT runs Q / DQ as written in float: the quantized reference."""
    _, _, peers = exported
    x = _data(64, 5)
    fast = get_runtime("onnxruntime").load(peers["static"]).run([x])[0]
    reference = dataclasses.replace(peers["static"], info={**peers["static"].info, "optimize": "disable"})
    ref = get_runtime("onnxruntime").load(reference).run([x])[0]
    assert np.mean(fast.argmax(-1) == ref.argmax(-1)) >= 0.99
    assert sqnr_db(ref, fast) >= 30.0


def test_census_sees_unfused_qdq_as_float(exported):
    """At "basic" ORT does not fuse QDQ: the quantized file runs its matmuls in float."""
    _, _, peers = exported
    basic = dataclasses.replace(peers["static"], info={**peers["static"].info, "optimize": "basic"})
    census = get_runtime("onnxruntime").load(basic).precision_census()
    assert census["low_precision_op_fraction"] == 0.0 and census["optimization_level"] == "basic"
    assert census["float_ops_fed_by_dequantize"] >= 6 and census["ops"]["DequantizeLinear"] > 0


def test_ort_format_file_loads_and_matches_onnx(exported):
    _, art, _ = exported
    ort_path = art.dir / art.info["mobile"]["file"]
    mobile = dataclasses.replace(art, path=ort_path)
    rt = get_runtime("onnxruntime")
    x = _data(7, 5)
    ref = rt.load(art).run([x])[0]
    got = rt.load(mobile).run([x])[0]
    assert sqnr_db(ref, got) >= 60.0  # measured: identical outputs (inf dB)
    census = rt.load(mobile).precision_census()
    assert census["float_ops"] > 0 and census["low_precision_ops"] == 0


def test_ort_mobile_target(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    art = get_exporter("ort-mobile").export(model, (torch.randn(2, 16),), tmp_path, OnnxOptions())
    assert art.target == "ort-mobile" and art.path.suffix == ".ort" and art.info["format"] == "ort"
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    got = get_runtime(art.runtime).load(art).run([x])[0]
    assert sqnr_db(_torch(model, x), got) >= 40.0  # measured ~140 dB


def _vit_small() -> nn.Module:
    from edgeprep.models.vit import ViT

    torch.manual_seed(0)
    return ViT(image_size=16, patch_size=4, in_chans=1, num_classes=5, dim=32, depth=1, heads=2, mlp_ratio=2).eval()


def test_ort_mobile_usability_verdict_and_fixed_batch(tmp_path):
    """ORT's own mobile checker runs on the converted model; fixing the batch axis removes the
    nodes NNAPI refused for dynamic shapes, and the fixed .ort still matches PyTorch through the
    validator's chunked runs (7 rows through a batch-2 model: the last chunk is padded)."""
    from edgeprep.validate import run_batched

    model = _vit_small()
    example = (torch.randn(2, 1, 16, 16),)
    dyn = get_exporter("ort-mobile").export(model, example, tmp_path / "dyn", OnnxOptions())
    fixed = get_exporter("ort-mobile").export(model, example, tmp_path / "fixed", OnnxOptions(mobile_fixed_batch=2))
    u_dyn, u_fixed = dyn.info["mobile"]["usability"], fixed.info["mobile"]["usability"]
    assert u_dyn["dynamic_inputs"] == ["x"] and u_fixed["dynamic_inputs"] == []
    assert set(u_dyn["eps"]) == {"nnapi", "coreml_neuralnetwork", "coreml_mlprogram"}
    for key, entry in u_dyn["eps"].items():
        assert entry["verdict"] in ("YES", "MAYBE", "NO") and 0 <= entry["supported_nodes"] <= entry["nodes"]
        assert entry["nodes_unsupported_due_to_dynamic_shapes"] > 0  # the dynamic batch keeps EPs off
        after = u_fixed["eps"][key]
        assert after["nodes_unsupported_due_to_dynamic_shapes"] == 0
        assert after["supported_nodes"] / after["nodes"] > entry["supported_nodes"] / entry["nodes"]
        assert entry["if_inputs_fixed"]["verdict"] in ("YES", "MAYBE", "NO")
    assert fixed.inputs[0].shape[0] == 2 and dyn.inputs[0].shape[0] == "batch"
    loaded = get_runtime("onnxruntime").load(fixed)
    assert loaded.fixed_batch == 2 and get_runtime("onnxruntime").load(dyn).fixed_batch is None
    x = np.random.default_rng(1).standard_normal((7, 1, 16, 16)).astype(np.float32)
    assert sqnr_db(_torch(model, x), run_batched(loaded, x)) >= 40.0
    with pytest.raises(RuntimeFailure):  # really fixed: another batch size is refused by ORT
        loaded.run([x[:3]])


def test_load_and_run_failures_are_one_line_runtime_failures(exported, tmp_path):
    _, art, _ = exported
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    broken = Artifact(name="b", target="onnx", runtime="onnxruntime", path=bad,
                      inputs=(TensorSpec("x", ("batch", 4), "float32"),), outputs=(), sha256="0", size_bytes=17)
    with pytest.raises(RuntimeFailure, match="cannot load") as err:
        get_runtime("onnxruntime").load(broken)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    loaded = get_runtime("onnxruntime").load(art)
    with pytest.raises(RuntimeFailure, match="failed on inputs") as err:
        loaded.run([np.zeros((2, 1, 8, 8), np.float32)])  # wrong image size
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeFailure, match="expected 1 inputs"):
        loaded.run([])
    with pytest.raises(RuntimeFailure, match="do not match"):
        get_runtime("onnxruntime").load(dataclasses.replace(art, inputs=(TensorSpec("y", (1,), "float32"),)))
