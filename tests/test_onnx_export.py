"""ONNX exporter: real torch.onnx exports checked by real ONNX Runtime sessions (no mocks)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from edgeprep.errors import ExportError
from edgeprep.exporters import get_exporter
from edgeprep.exporters.onnx import OnnxExporter
from edgeprep.exporters.options import OnnxOptions
from edgeprep.fsutil import sha256_file
from edgeprep.measure.parity import sqnr_db
from edgeprep.registry import target_specs

pytestmark = pytest.mark.slow


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(att.transpose(1, 2).reshape(b, n, d))


class TinyViT(nn.Module):
    """Patch embed (Conv), one pre-norm block (LayerNorm, attention, GELU MLP), mean-pool head."""

    def __init__(self, dim: int = 32, heads: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


class DataDependent(nn.Module):
    """torch.export refuses a Python branch on a tensor's value; the TorchScript tracer records
    the branch taken for the example (a TracerWarning), so the fallback path is really exercised."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        scale = 2 if bool(x.abs().sum().item() > 0) else 1
        return self.fc(x.flatten(1)) * scale


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _ort_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyViT().eval()
    out = tmp_path_factory.mktemp("vit")
    art = OnnxExporter().export(model, (_images(2),), out, OnnxOptions())
    return model, art


def test_registry_has_onnx_targets():
    assert {"onnx", "ort-mobile"} <= set(target_specs())
    assert get_exporter("onnx").runtime == "onnxruntime"


def test_vit_dynamo_export_matches_pytorch_at_other_batches(vit_export):
    model, art = vit_export
    assert art.info["exporter"] == "dynamo" and art.info["fallback_reason"] is None
    assert art.info["opset"] >= 18
    assert art.path.name == "model.onnx" and art.sha256 == sha256_file(art.path)
    # Everything inline: the directory holds the one model file, no external .data.
    assert sorted(p.name for p in art.dir.iterdir()) == ["model.onnx"]
    assert art.inputs[0].shape == ("batch", 1, 16, 16) and art.inputs[0].dtype == "float32"
    assert art.outputs[0].shape == ("batch", 10)
    assert art.info["checked_batches"] == [2, 3, 1]
    graph_dim = onnx.load(str(art.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert graph_dim.dim_param and not graph_dim.HasField("dim_value")
    for batch in (3, 5):  # exported with batch 2
        x = _images(batch, seed=batch)
        with torch.no_grad():
            ref = model(x).numpy()
        got = _ort_run(art.path, x.numpy())
        assert got.shape == (batch, 10)
        assert sqnr_db(ref, got) >= 40.0  # measured ~134 dB


def test_cnn_export_with_mobile_format(tmp_path):
    torch.manual_seed(1)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is really tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    art = OnnxExporter().export(model, (_images(4),), tmp_path, OnnxOptions(mobile=True, optimize="all"))
    mobile = art.info["mobile"]
    assert mobile["file"] == "model.ort" and (tmp_path / mobile["config"]).is_file()
    assert sha256_file(tmp_path / "model.ort") == mobile["sha256"]
    assert not list(tmp_path.glob("*.data"))
    x = _images(3, seed=7)
    with torch.no_grad():
        ref = model(x).numpy()
    assert sqnr_db(ref, _ort_run(art.path, x.numpy())) >= 40.0  # measured ~135 dB
    config_text = (tmp_path / mobile["config"]).read_text()
    assert "Conv" in config_text  # the required-operators list names what the .ort needs


def test_batch_one_example_is_refused(tmp_path):
    with pytest.raises(ExportError, match="batch of at least 2") as err:
        OnnxExporter().export(TinyCNN().eval(), (_images(1),), tmp_path, OnnxOptions())
    assert err.value.exit_code == 3 and "\n" not in str(err.value)


def test_dynamo_failure_falls_back_to_torchscript(tmp_path):
    torch.manual_seed(2)
    model = DataDependent().eval()
    x = torch.randn(2, 16)
    art = OnnxExporter().export(model, (x,), tmp_path, OnnxOptions())
    assert art.info["exporter"] == "torchscript"
    reason = art.info["fallback_reason"]
    assert reason.startswith("dynamo export failed:") and "\n" not in reason and "\x1b" not in reason
    assert art.info["tracer_warnings"]  # the tracer said the trace may not generalize
    assert art.inputs[0].name == "x" and art.inputs[0].shape == ("batch", 16)
    x3 = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x3).numpy()
    assert sqnr_db(ref, _ort_run(art.path, x3.numpy())) >= 40.0  # measured ~140 dB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_failure_is_one_line_export_error(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # no ONNX symbolic in either exporter

    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(ExportError, match="every exporter") as err:
        OnnxExporter().export(Broken().eval(), (torch.randn(2, 3, 3),), tmp_path, OnnxOptions())
    assert "\n" not in str(err.value) and "dynamo:" in str(err.value) and "torchscript:" in str(err.value)
    # nothing half-written left behind, and nothing we did not write removed
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_dynamo_disabled_uses_torchscript(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).train()
    art = OnnxExporter().export(model, (torch.randn(2, 8),), tmp_path, OnnxOptions(dynamo=False))
    assert art.info["exporter"] == "torchscript" and "dynamo: false" in art.info["fallback_reason"]
    assert art.outputs[0].shape == ("batch", 3) and art.info["checked_batches"] == [2, 3, 1]
    assert model.training  # the caller's mode is restored
