"""Fake-quantization primitives (issue 4 groundwork): grids, TWN, clipped STE, LSQ scale."""
from __future__ import annotations

import pytest
import torch

from edgeprep.errors import BadInputError
from edgeprep.quant.fake import (
    LsqQuantizer,
    fake_quant,
    int_range,
    quantize_weight,
    ternarize,
    twn_params,
    weight_scale,
)


def test_int_ranges_are_the_onnx_ones():
    assert int_range(8) == (-128, 127) and int_range(8, signed=False) == (0, 255)
    assert int_range(4) == (-8, 7) and int_range(2) == (-2, 1)
    with pytest.raises(BadInputError):
        int_range(1)


def test_per_channel_int8_lands_on_the_grid_within_half_a_step():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    w[3] *= 10  # one loud channel must not coarsen the others (per-channel scales)
    q = quantize_weight(w, bits=8, axis=0)
    scale = weight_scale(w, 8, axis=0)
    assert scale.shape == (16, 1)
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # integers
    assert codes.abs().max() <= 127 + 1e-4
    assert torch.all((q - w).abs() <= scale / 2 + 1e-7)
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - q).pow(2).sum())
    assert sqnr > 38  # ~6 dB per bit for Gaussian weights with max-abs scaling


def test_clipped_ste_mask_is_exact():
    x = torch.tensor([-3.0, -1.0, -0.26, 0.0, 0.3, 1.27, 1.3, 5.0], requires_grad=True)
    scale = torch.tensor(0.01)
    y = fake_quant(x, scale, -128, 127)  # representable range [-1.28, 1.27]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert y.detach()[0].item() == pytest.approx(-1.28) and y.detach()[-1].item() == pytest.approx(1.27)
    with pytest.raises(BadInputError):
        fake_quant(x, torch.tensor(0.0), -128, 127)


def test_round_half_to_even_like_quantize_linear():
    y = fake_quant(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), -128, 127)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0]


def test_twn_value_set_threshold_and_alpha_by_hand():
    w = torch.tensor([[0.1, -0.2, 0.9], [-1.5, 0.05, 0.4]])
    delta, alpha = twn_params(w)
    mean_abs = (0.1 + 0.2 + 0.9 + 1.5 + 0.05 + 0.4) / 6
    assert delta.item() == pytest.approx(0.7 * mean_abs)  # 0.3675
    assert alpha.item() == pytest.approx((0.9 + 1.5 + 0.4) / 3)  # only |w| > 0.3675 count
    t = ternarize(w)
    a = alpha.item()
    assert set(t.flatten().tolist()) <= {-a, 0.0, a}
    assert torch.equal(t, torch.tensor([[0.0, 0.0, a], [-a, 0.0, a]]))


def test_twn_per_row_for_embeddings():
    w = torch.tensor([[0.1, 0.2, 3.0], [-0.01, 0.02, -0.03]])
    delta, alpha = twn_params(w, per_row=True)
    assert delta.shape == (2, 1)
    assert alpha[0].item() == pytest.approx(3.0) and alpha[1].item() == pytest.approx(0.025)  # 0.02 and 0.03 exceed 0.7 * 0.02
    t = ternarize(w, per_row=True)
    for row, a in zip(t, alpha.flatten()):
        assert set(row.tolist()) <= {-a.item(), 0.0, a.item()}


def test_twn_gradient_is_clipped_at_2_5():
    w = torch.tensor([0.1, -1.0, 2.4, 2.6, -3.0], requires_grad=True)
    ternarize(w).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_calibrates_then_learns_its_scale():
    q = LsqQuantizer(bits=8)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 3
    y = q(x)
    assert bool(q.initialized) and q.scale.item() == pytest.approx(x.abs().max().item() / 127)
    assert torch.all((y - x).abs() <= q.scale.detach() / 2 + 1e-6)  # max|x| maps inside the range
    loss = (q(x * 2) - x * 2).pow(2).sum()  # twice the range: clipping error pushes the scale up
    loss.backward()
    assert q.scale.grad is not None and q.scale.grad.item() < 0
    q.enabled = False
    assert torch.equal(q(x), x)
