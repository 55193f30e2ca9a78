"""When parity fails, say where: the first diverging heavy layer, by the module's name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprep.exporters.onnx import OnnxExporter, OnnxOptions
from edgeprep.measure.localize import (
    Divergence,
    _first_bad_bisect,
    heavy_layers,
    host_runner,
    localize,
    torch_layer_outputs,
)
from edgeprep.models.vit import ViT
from edgeprep.quant.convert import quantize_model
from edgeprep.stages.qat import calibrate

CORRUPTED = "blocks.1.mlp.fc1"


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def int8_vit(tmp_path_factory):
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=2, dim=32, depth=2, heads=2, mlp_ratio=2.0).eval()
    quantize_model(model, "int8", "int8", reduced_range=True)
    calibrate(model, _x(64, seed=1))
    art = OnnxExporter().export(model, (_x(4, seed=2),), tmp_path_factory.mktemp("vit") / "onnx", OnnxOptions())
    return model, art


def _corrupt_scale(path, layer: str, factor: float) -> None:
    """The planted fault: one layer's weight scale in the exported file multiplied by ``factor``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{layer}.qweight")
    init = next(i for i in proto.graph.initializer if i.name == dq.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save_model(proto, str(path))


def test_heavy_layers_are_named_after_the_modules_whose_weights_they_read(int8_vit):
    import onnx

    layers = heavy_layers(onnx.load(str(int8_vit[1].path)))
    named = [layer.name for layer in layers if layer.module]
    assert named == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                     "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"]
    # the patch embedding (float Conv) and the attention matmuls have no quantized weight
    assert [layer.op_type for layer in layers if not layer.module] == ["Conv"] + ["MatMul"] * 4


def test_a_corrupted_weight_scale_is_localized_to_its_layer_by_name(int8_vit, tmp_path):
    import onnx

    model, art = int8_vit
    path = tmp_path / "model.onnx"
    path.write_bytes(art.path.read_bytes())
    _corrupt_scale(path, CORRUPTED, 10.0)
    proto = onnx.load(str(path))
    x = _x(32, seed=9)
    layers = heavy_layers(proto)
    refs = torch_layer_outputs(model, x, layers)
    assert set(refs) == {layer.name for layer in layers if layer.module}
    div = localize(proto, ["x"], [x.numpy()], host_runner(), threshold_db=40, torch_outputs=refs)
    assert div.layer is not None and div.layer.name == CORRUPTED
    assert div.sqnr_before_db > 40  # blocks.1.attn.proj: measured 138.9 dB
    assert div.sqnr_after_db < 5  # the x10 scale: measured -19.1 dB
    assert "first diverging layer blocks.1.mlp.fc1 (Gemm)" in div.describe()
    # The file's own float semantics share the fault: against them alone nothing diverges, which
    # is why the pipeline compares with the PyTorch model's layers when it has the model.
    alone = localize(proto, ["x"], [x.numpy()], host_runner(), threshold_db=40)
    assert alone.layer is None and alone.reference == "unfused host"


def test_the_unfaulted_file_has_no_diverging_layer(int8_vit):
    import onnx

    model, art = int8_vit
    proto = onnx.load(str(art.path))
    x = _x(32, seed=9)
    div = localize(proto, ["x"], [x.numpy()], host_runner(), threshold_db=40,
                   torch_outputs=torch_layer_outputs(model, x, heavy_layers(proto)))
    assert div.layer is None
    assert min(div.measured.values()) > 40  # measured >= 55 dB on every layer (float rounding vs torch)


@pytest.mark.parametrize("values, expected", [
    ([50, 50, 10, 10], 2), ([10, 10, 10], 0), ([50, 50, 50], None), ([50, 10, 50, 10], 1), ([50], None), ([], None)])
def test_bisection_finds_a_good_to_bad_boundary(values, expected):
    calls = []

    def sqnr_at(k):
        calls.append(k)
        return values[k]
    got = _first_bad_bisect(len(values), sqnr_at, 40)
    assert got == expected
    if got is not None:
        assert values[got] < 40 and (got == 0 or values[got - 1] >= 40)
    assert len(calls) <= 1 + max(1, int(np.ceil(np.log2(max(len(values), 1)))))


def test_divergence_json_is_plain_data():
    import json

    d = Divergence(None, None, None, "unfused host", {"a": 70.0}, 40.0)
    assert json.loads(json.dumps(d.to_json()))["layer"] is None
    assert "every heavy layer stays >= 40 dB" in d.describe()


def test_what_can_fail_while_localizing_is_a_typed_one_line_error(int8_vit):
    """A diagnosis that cannot run says why in one line (RuntimeFailure, exit 3), never 'unexpected'."""
    import onnx

    from edgeprep.errors import RuntimeFailure
    from edgeprep.measure.localize import HeavyLayer, prefix_model

    proto = onnx.load(str(int8_vit[1].path))
    prefix = prefix_model(proto, heavy_layers(proto)[1])
    with pytest.raises(RuntimeFailure, match="the graph cut at .*: ONNX Runtime failed to run it: "):
        host_runner()(prefix, {"x": np.zeros((2, 1, 8, 8), np.float64)})  # float64 into a float graph
    with pytest.raises(RuntimeFailure, match=r"cannot cut the graph after ghost \(Gemm\) to localize"):
        prefix_model(proto, HeavyLayer(0, "Gemm", "no_such_tensor", "ghost", None))
