"""LiteRT target: .tflite converted by litert-torch, run by the LiteRT interpreter on this CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed: pip install 'edgeprep[litert]'")
pytest.importorskip("litert_torch", reason="the litert-convert extra is not installed: pip install 'edgeprep[litert-convert]'")

from edgeprep.errors import RuntimeFailure  # noqa: E402
from edgeprep.exporters import get_exporter, get_runtime  # noqa: E402
from edgeprep.exporters.litert import (  # noqa: E402
    LiteRTModel,
    LiteRTOptions,
    dequantize_output,
    quantize_input,
    quantize_int8,
)
from edgeprep.measure.parity import sqnr_db  # noqa: E402
from edgeprep.validate import run_batched  # noqa: E402


@pytest.fixture(scope="module")
def trained(digits_mlp):
    return digits_mlp


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory):
    model, x, _, _ = trained
    art = get_exporter("litert").export(model, (torch.from_numpy(x[:2]),), tmp_path_factory.mktemp("lt") / "fp32",
                                        LiteRTOptions())
    return art


def test_fp32_tflite_matches_pytorch(trained, fp32):
    model, _, xt, _ = trained
    assert fp32.path.name == "model.tflite" and fp32.inputs[0].shape == (1, 64)
    assert fp32.info["ops"]["FULLY_CONNECTED"] == 2
    loaded = get_runtime("litert").load(fp32)
    assert loaded.fixed_batch == 1
    with torch.no_grad():
        ref = model(torch.from_numpy(xt)).numpy()
    assert sqnr_db(ref, run_batched(loaded, xt)) >= 30.0  # measured ~130 dB
    with pytest.raises(RuntimeFailure, match="static shapes"):
        loaded.run([xt[:3]])
    census = loaded.precision_census()
    assert census["heavy_ops"] == 2 and census["low_precision_ops"] == 0
    assert fp32.info["xnnpack_partitions"] == census["xnnpack_partitions"] == 1  # XNNPACK took the whole graph


def test_int8_peer_takes_int8_inputs_runs_int8_and_agrees(trained, fp32):
    model, x, xt, yt = trained
    q = quantize_int8(fp32, [x], fp32.dir.parent / "int8")
    assert q.role == "ptq" and q.info["calibration_rows"] == len(x)
    loaded = get_runtime("litert").load(q)
    assert loaded.inputs[0]["dtype"] == np.int8  # the caller's float input is quantized for it
    census = loaded.precision_census()
    assert census["low_precision_op_fraction"] == 1.0 and census["heavy_ops"] == 2
    assert census["xnnpack_partitions"] == q.info["xnnpack_partitions"] >= 1
    got = run_batched(loaded, xt)
    with torch.no_grad():
        ref = model(torch.from_numpy(xt)).numpy()
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.97
    # against its quantized reference (the same int8 model on TFLite's reference kernels): >= 99%
    qref = run_batched(LiteRTModel(q, reference_kernels=True), xt)
    assert np.mean(got.argmax(-1) == qref.argmax(-1)) >= 0.99 and sqnr_db(qref, got) >= 30.0
    # int8 output too: logits beyond the calibrated range saturate (min/max over the training rows)
    assert 10.0 <= sqnr_db(ref, got) < 60.0
    assert q.size_bytes < fp32.size_bytes / 2


def test_input_quantization_follows_the_tensor_parameters():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    x = np.array([-100.0, -1.25, -0.25, 0.25, 0.75, 1.0, 100.0], dtype=np.float32)
    # x / 0.5 = -200, -2.5, -0.5, 0.5, 1.5, 2, 200: half to even, plus the zero point, clipped
    np.testing.assert_array_equal(quantize_input(x, detail), np.array([-128, -5, -3, -3, -1, -1, 127], np.int8))
    np.testing.assert_allclose(dequantize_output(np.array([-3, 1], np.int8), detail), [0.0, 2.0])
    assert quantize_input(x, {"dtype": np.float32}).dtype == np.float32
