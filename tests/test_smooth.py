"""SmoothQuant smoothing of int8 Linear inputs: the factors, exactness in float, the quantization
error it removes on outlier channels, replay from a checkpoint decision, and the ONNX form."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert_classifier
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.quant.convert import quantize_model, replay_qat
from edgeprep.quant.linear import QuantLinear
from edgeprep.quant.smooth import smooth_model, smoothing_factors
from edgeprep.stages.qat import calibrate


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def test_factors_follow_the_formula_and_keep_the_float_function():
    x_absmax = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([[1.0, -4.0, 0.5], [-0.5, 2.0, 1.0]])  # max|W[:, j]| = 1, 4, 1
    assert torch.allclose(smoothing_factors(x_absmax, w, 0.5), torch.tensor([2.0, 0.5, 3.0]))
    assert torch.allclose(smoothing_factors(x_absmax, w, 1.0), x_absmax)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    q = QuantLinear.from_linear(linear, weights="int8", activations="int8")
    q.set_smoothing(torch.tensor([2.0, 0.5, 3.0]))
    x = torch.randn(5, 3)
    with torch.no_grad():  # (x / s) (W diag(s))^T + b == x W^T + b
        assert torch.allclose(nn.functional.linear(x * q.input_mul, q.weight, q.bias), linear(x), atol=1e-6)
    with pytest.raises(BadInputError, match="already smoothed"):
        q.set_smoothing(torch.ones(3))
    bad = QuantLinear.from_linear(linear, weights="int8", activations="int8")
    with pytest.raises(BadInputError, match="finite positive"):
        bad.set_smoothing(torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(BadInputError, match="int8 inputs"):
        QuantLinear.from_linear(linear, weights="int8", activations="none").set_smoothing(torch.ones(3))


OUTLIERS = [3, 17, 40]


def _outlier_inputs(n: int, seed: int) -> torch.Tensor:
    """LayerNorm-like inputs where 3 of 64 channels are 30x larger (BERT's outlier dimensions)."""
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    x[:, OUTLIERS] *= 30.0
    return x


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_removes_most_of_the_int8_error_on_outlier_channels(alpha):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():  # as in a trained model, the weights reading outlier channels are small
        fp[0].weight[:, OUTLIERS] /= 30.0
    calib, test = _outlier_inputs(256, 1), _outlier_inputs(256, 2)
    with torch.no_grad():
        ref = fp(test)
    plain, smooth = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_model(plain, "int8", "int8")
    quantize_model(smooth, "int8", "int8")
    entry = smooth_model(smooth, calib, alpha)
    assert entry == {"alpha": alpha, "linears": ["0"]}
    calibrate(plain, calib)
    calibrate(smooth, calib)
    with torch.no_grad():
        gain = sqnr_db(ref, smooth(test)) - sqnr_db(ref, plain(test))
    # per-tensor int8 spends its range on three channels; smoothing flattens them (measured +25 / +20 dB)
    assert gain > 12.0, gain
    with pytest.raises(BadInputError, match=r"not in \(0, 1\]"):
        smooth_model(copy.deepcopy(plain), calib, 1.5)


transformers = pytest.importorskip("transformers")


def _bert():
    return tiny_bert_classifier()


def test_smoothed_bert_replays_from_its_decision():
    """The ONNX form (a Mul before each QuantizeLinear) is checked on MiniLM by test_minilm_recipe."""
    model = _bert()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    decision = quantize_model(model, "int8", "int8")
    decision["smoothing"] = smooth_model(model, ids, 0.85)
    assert len(decision["smoothing"]["linears"]) == len(decision["linears"]) == 2 * 6 + 2
    calibrate(model, ids)
    rebuilt = replay_qat(_bert(), decision)
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # input_mul buffers included
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)
    unsmoothed = replay_qat(_bert(), {k: v for k, v in decision.items() if k != "smoothing"})
    with pytest.raises(RuntimeError, match="input_mul"):  # a smoothed checkpoint needs its decision
        unsmoothed.load_state_dict(model.state_dict(), strict=True)
