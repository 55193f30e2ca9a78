"""Core ML target: coremltools converts here (any OS); the saved .mlpackage's spec is read back and
checked (op types, weight dtypes, I/O, deployment target, carried integer weights). Prediction
needs macOS: that test runs there and is skipped elsewhere with the reason."""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="the coreml extra is not installed: pip install 'edgeprep[coreml]'")

from edgeprep.errors import BadInputError, ExportError, RuntimeFailure  # noqa: E402
from edgeprep.exporters import get_exporter, get_runtime  # noqa: E402
from edgeprep.exporters.coreml import CoreMLOptions  # noqa: E402
from edgeprep.fsutil import path_bytes, sha256_file  # noqa: E402
from edgeprep.models import ZOO  # noqa: E402
from edgeprep.quant.convert import quantize_model  # noqa: E402
from edgeprep.quant.linear import QuantLinear  # noqa: E402
from edgeprep.validate import judge  # noqa: E402

LINEARS = 13  # vit-tiny-digits: 3 blocks x (qkv, proj, fc1, fc2) + head
FP16_HALF_ULP = 2.0 ** -11  # relative rounding of a value stored as fp16


def _model(weights: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ZOO["vit-tiny-digits"].factory().eval()
    if weights:
        quantize_model(model, weights, "int8")
        model.train()(torch.randn(16, 1, 8, 8))  # initialises the activation scales
        model.eval()
    return model


def _export(tmp_path, model, **opts):
    return get_exporter("coreml").export(model, (torch.randn(2, 1, 8, 8),), tmp_path / "cm", CoreMLOptions(**opts))


def _weight_elements(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_fp16_program_spec(tmp_path):
    model = _model()
    art = _export(tmp_path, model)
    spec = art.info["spec"]
    assert art.path.name == "model.mlpackage" and art.path.is_dir()
    assert art.size_bytes == path_bytes(art.path) and art.sha256 == sha256_file(art.path)
    assert spec["deployment_target"] == "iOS16" and spec["spec_version"] == 7
    assert spec["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "FLOAT32"}]
    assert spec["outputs"][0]["name"] == "output" and art.outputs[0].shape == (1, 10)
    assert spec["ops"]["linear"] == LINEARS and spec["compressed_weight_ops"] == 0
    assert set(spec["weights"]) == {"FLOAT16"}  # every weight stored in fp16, none in fp32
    # every Linear and the patch conv's weights are in there (plus norms, biases, embeddings)
    assert spec["weights"]["FLOAT16"]["elements"] >= _weight_elements(model)


@pytest.mark.parametrize("mode, op, stored_dtype, bits", [
    ("int8", "constexpr_affine_dequantize", "INT8", 8),
    ("int4", "constexpr_blockwise_shift_scale", "INT4", 4),
    ("ternary", "constexpr_lut_to_dense", "UINT8", 2),  # 2-bit indices packed 4 per byte
])
def test_qat_weights_are_carried_with_their_own_integers(tmp_path, mode, op, stored_dtype, bits):
    model = _model(mode)
    art = _export(tmp_path, model)
    spec, carried = art.info["spec"], art.info["carried"]
    assert carried["weights"] == LINEARS and carried["codes_identical"] is True
    assert carried["modes"] == {f"{mode} ({op})": LINEARS}
    assert spec["ops"][op] == LINEARS and spec["ops"]["linear"] == LINEARS
    assert spec["deployment_target"] == ("iOS18" if mode == "int4" else "iOS16")
    elements = _weight_elements(model)
    assert spec["weights"][stored_dtype]["elements"] * 8 == elements * bits or stored_dtype == "INT4"
    if stored_dtype == "INT4":
        assert spec["weights"]["INT4"]["elements"] == elements
    # the dequantized weights differ from the model's only by fp16 rounding: of each scale, and of
    # the dequantized value (Core ML dequantizes to fp16): at most two half-ulps of the largest weight
    scale_max = max(float(m._weight_scales().max()) for m in model.modules() if isinstance(m, QuantLinear))
    qmax = {8: 127, 4: 7, 2: 1}[bits]
    assert 0 < carried["max_abs_weight_error"] <= 2 * qmax * scale_max * FP16_HALF_ULP
    assert any("activation quantizers left out" in n for n in art.info["notes"])


def test_carried_int8_is_smaller_than_fp16(tmp_path):
    fp16 = _export(tmp_path / "a", _model())
    int8 = _export(tmp_path / "b", _model("int8"))
    int4 = _export(tmp_path / "c", _model("int4"))
    elements = _weight_elements(_model())
    # fp16 -> int8 saves one byte per Linear weight, int8 -> int4 half a byte more, less the
    # per-channel scales and the 64-byte alignment of each blob in weight.bin
    assert fp16.size_bytes - int8.size_bytes >= 0.9 * elements
    assert int8.size_bytes - int4.size_bytes >= 0.45 * elements


@pytest.mark.parametrize("weights, target, stored, per_element_bits", [
    ("int4-block", "iOS18", "INT4", 4),
    ("palettize4", "iOS16", "UINT8", 4),
    ("int8", "iOS16", "INT8", 8),
])
def test_post_training_compression_of_a_float_model(tmp_path, weights, target, stored, per_element_bits):
    model = _model()
    spec = _export(tmp_path, model, coreml_weights=weights).info["spec"]
    assert spec["deployment_target"] == target and spec["compressed_weight_ops"] >= LINEARS - 1
    # coremltools skips tensors under 2048 elements (the 640-weight head): the rest is compressed
    big = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 2048)
    got = spec["weights"][stored]["elements"] * (8 if stored == "UINT8" else per_element_bits)
    assert got >= big * per_element_bits


def test_bad_options_and_unsupported_models_are_one_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="need coreml_target iOS18"):
        _export(tmp_path, _model(), coreml_weights="int4-block", coreml_target="iOS16")
    from edgeprep.binary.convert import binarize_model

    model = _model()
    binarize_model(model, "binary", estimator_rank=1)
    with pytest.raises(ExportError, match="binarized models are not supported"):
        _export(tmp_path, model.eval())


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the behaviour off macOS")
def test_off_macos_the_runtime_says_why_and_judge_records_not_run(tmp_path):
    art = _export(tmp_path, _model())
    usable, why = get_runtime("coreml").usable_here()
    assert not usable and "macOS" in why
    with pytest.raises(RuntimeFailure, match="needs macOS"):
        get_runtime("coreml").load(art)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    entry = judge(art, task="classification", ref_inputs=x, ref_outputs=x[:, 0, 0], eval_x=None, eval_y=None,
                  warmup=1, iters=5, threads=1, batch=1)
    assert entry["not_run"] == why and entry["parity"] is None and entry["latency_ms"] is None


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction exists only on macOS")
def test_prediction_matches_pytorch_on_macos(tmp_path):  # pragma: no cover - runs on macOS only
    from edgeprep.exporters.coreml import float_copy
    from edgeprep.measure.parity import sqnr_db
    from edgeprep.validate import run_batched

    for weights in (None, "int8"):
        model = _model(weights)
        art = _export(tmp_path / str(weights), model)
        loaded = get_runtime("coreml").load(art)
        x = torch.randn(16, 1, 8, 8)
        with torch.no_grad():  # the function Core ML runs: weights as carried, no activation quantizers
            ref = float_copy(model)[0](x).numpy()
        assert sqnr_db(ref, run_batched(loaded, x.numpy())) >= 30.0


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the behaviour off macOS")
def test_cli_validate_and_profile_say_why_in_one_line(tmp_path):
    from conftest import run_cli, stderr_lines

    from edgeprep.artifacts import export_artifact
    from edgeprep.recipe import parse_export_target

    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    model = _model()
    export_artifact(get_exporter("coreml"), model, (torch.from_numpy(x[:2]),), tmp_path / "cm",
                    parse_export_target({"target": "coreml"}, where="test"), name="cm", role="edgeprep",
                    task="classification", ref_x=x, labels=None, expect={})
    for command, words in (("validate", "cannot validate on this machine: Core ML prediction needs macOS"),
                           ("profile", "Core ML prediction needs macOS")):
        proc = run_cli(command, str(tmp_path / "cm"))
        assert proc.returncode == 3, proc.stderr
        assert len(stderr_lines(proc)) == 1 and words in proc.stderr
