"""equishift.metrics on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from equishift import metrics as M
from equishift.errors import EquishiftError


# --- Wilson interval -------------------------------------------------------------------------------
def test_wilson_interval_matches_the_published_value_and_its_defining_equation():
    lo, hi = M.wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # textbook value for 8/10 at 95%
    z = 1.959964
    for p in (lo, hi):  # the endpoints are where the score statistic equals z
        assert abs(abs(0.8 - p) / math.sqrt(p * (1 - p) / 10) - z) < 1e-6


def test_wilson_interval_edges_and_errors():
    assert M.wilson_interval(0, 20)[0] == 0.0 and M.wilson_interval(20, 20)[1] == 1.0
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = M.wilson_interval(500, 1000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.959964 * math.sqrt(0.25 / 1000), rel=0.01)  # ≈ Wald at large n
    with pytest.raises(EquishiftError):
        M.wilson_interval(5, 3)
    with pytest.raises(EquishiftError):
        M.rate(torch.tensor([], dtype=torch.bool))


# --- consistency and accuracy ---------------------------------------------------------------------
def test_consistency_variants():
    a = M.consistency_a(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3]))
    assert (a.value, a.n, a.successes) == (0.75, 4, 3) and a.low < 0.75 < a.high
    # one clean prediction per image against K shifted ones: every pair counts
    a2 = M.consistency_a(torch.tensor([1, 2]), torch.tensor([[1, 1, 0], [2, 0, 0]]))
    assert (a2.successes, a2.n) == (3, 6)
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0]])
    assert M.consistency_b(logits, torch.tensor([1, 1])).value == 0.5
    assert M.crop_consistency(torch.tensor([4, 4, 4]), torch.tensor([4, 5, 4])).successes == 2
    assert M.linear_consistency is M.crop_consistency
    o = M.orbit_consistency(torch.tensor([[1, 1, 1], [1, 2, 1], [0, 0, 0], [3, 3, 4]]))
    assert (o.successes, o.n) == (2, 4)
    assert M.orbit_consistency(torch.tensor([7, 7, 7])).value == 1.0


def test_accuracy_shifted_accuracy_and_drop():
    y = torch.tensor([0, 1, 2, 3])
    clean = M.accuracy(torch.tensor([0, 1, 2, 0]), y)
    shifted = M.shifted_accuracy(torch.tensor([[0, 0], [1, 1], [2, 0], [0, 0]]), y)
    assert clean.value == 0.75 and (shifted.successes, shifted.n) == (5, 8)
    assert M.accuracy_drop(clean, shifted) == pytest.approx(0.125)


def test_worst_case_robustness_uses_the_linf_ball():
    shifts = torch.tensor([[0, 0], [1, -1], [0, 2], [-3, 1]])
    y = torch.tensor([5, 6])
    preds = torch.tensor([[5, 5, 0, 0], [6, 0, 6, 6]])
    assert M.worst_case_robustness(preds, y, shifts, 1).value == 0.5   # image 0 survives |δ|∞ ≤ 1
    assert M.worst_case_robustness(preds, y, shifts, 0).value == 1.0
    assert M.worst_case_robustness(preds, y, shifts, 3).value == 0.0
    with pytest.raises(EquishiftError, match="radius"):
        M.worst_case_robustness(preds, y, shifts + 10, 1)


def test_minimal_flipping_shift_and_fragility_ranking():
    shifts = torch.tensor([[0, 0], [1, 0], [0, -2], [3, 3]])
    assert float(M.minimal_flipping_shift(torch.tensor([5, 5, 6, 7]), 5, shifts)) == 2.0
    assert math.isinf(float(M.minimal_flipping_shift(torch.tensor([5, 5, 5, 5]), 5, shifts)))
    many = M.minimal_flipping_shift(torch.tensor([[5, 5, 6, 7], [1, 2, 1, 1], [0, 0, 0, 0]]),
                                    torch.tensor([5, 1, 0]), shifts)
    assert many.tolist() == [2.0, 1.0, math.inf]
    assert M.fragility_ranking(torch.tensor([2.0, math.inf, 1.0, 2.0])).tolist() == [2, 0, 3, 1]


# --- continuous measures --------------------------------------------------------------------------
def test_logit_variance_is_the_population_variance_of_the_target_logit():
    logits = torch.tensor([[1.0, 0.0], [2.0, 9.0], [3.0, 0.0], [4.0, 1.0]])
    assert float(M.logit_variance(logits, 0)) == pytest.approx(1.25)
    batch = torch.stack((logits, logits * 2))
    assert M.logit_variance(batch, torch.tensor([0, 0])).tolist() == pytest.approx([1.25, 5.0])


def test_mean_absolute_change_and_kl():
    p_ref = torch.tensor([0.7, 0.3])
    p_sh = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    assert M.absolute_change(p_ref, p_sh).tolist() == pytest.approx([0.1, 0.2])
    assert M.mean_absolute_change(p_ref, p_sh) == pytest.approx(0.15)
    assert M.mean_absolute_change(p_ref, p_sh, cls=1) == pytest.approx(0.15)
    batched = M.absolute_change(p_ref[None].repeat(2, 1), p_sh[None].repeat(2, 1, 1))
    assert batched.shape == (2, 2) and batched[1].tolist() == pytest.approx([0.1, 0.2])
    kl = M.kl_divergence(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]])))
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl.tolist() == pytest.approx([want, 0.0], abs=1e-7)  # float32 log inputs


def test_feature_equivariance_error():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 6, 7, generator=g)
    moved = torch.stack([torch.roll(f, (1, 2), (-2, -1)), torch.roll(f, (-3, 0), (-2, -1))])
    err = M.feature_equivariance_error(moved, f, torch.tensor([[1, 2], [-3, 0]]))
    assert err.max() < 1e-6
    one = torch.zeros(1, 4, 4)
    one[0, 0, 0] = 2.0
    wrong = M.feature_equivariance_error(torch.roll(one, 1, -2)[None], one, torch.tensor([[0, 0]]))
    assert float(wrong) == pytest.approx(math.sqrt(2))  # two misplaced entries of size 2 over a norm of 2


def test_pearson_iou_and_attention_equivariance():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert float(M.pearson(a, 2 * a + 1)) == pytest.approx(1.0)
    assert float(M.pearson(a, -a)) == pytest.approx(-1.0)
    assert math.isnan(float(M.pearson(a, torch.ones(2, 2))))
    x = torch.zeros(4, 5)
    x[0, 0], x[1, 1] = 3, 2
    y = torch.zeros(4, 5)
    y[0, 0], y[2, 2] = 3, 2
    assert float(M.topk_iou(x, y, frac=0.1)) == pytest.approx(1 / 3)  # top-2 cells: {00,11} vs {00,22}
    maps = torch.stack([torch.roll(x, (1, 3), (0, 1)), torch.roll(x, (2, 0), (0, 1))])
    r, iou = M.attention_equivariance(maps, x, torch.tensor([[1, 3], [0, 0]]), frac=0.1)
    assert r[0] == pytest.approx(1.0) and iou[0] == 1.0
    assert r[1] < 0.5 and iou[1] == 0.0


def test_central_difference_and_lie_derivative_on_an_analytic_model():
    assert float(M.central_difference(torch.tensor(3.5 ** 2), torch.tensor(2.5 ** 2), 0.5)) == pytest.approx(6.0)
    h, w, c = 4, 16, 0.05
    col = torch.arange(w, dtype=torch.float64)
    img = torch.sin(2 * math.pi * col / w).expand(1, h, w).float()
    weight = torch.cos(2 * math.pi * col / w).float()

    def model(x):  # logits [L, 0] with L = c · Σ x · cos(2π col / W)
        big = c * (x * weight).sum((1, 2, 3))
        return torch.stack((big, torch.zeros_like(big)), dim=1)

    # Under a shift by t columns L(t) = −c·H·W/2·sin(2πt/W) (Fourier shift is exact for this sinusoid).
    eps = 0.5
    L = lambda t: -c * h * w / 2 * math.sin(2 * math.pi * t / w)  # noqa: E731
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = (sig(L(eps)) - sig(L(-eps))) / (2 * eps)
    d = M.lie_derivative(model, img, eps=eps, axis="x", mode="fourier")
    assert d.shape == (1, 2)
    assert float(d[0, 0]) == pytest.approx(want, rel=1e-4) and float(d[0, 1]) == pytest.approx(-want, rel=1e-4)
    assert float(d[0, 0]) == pytest.approx(-0.25 * c * h * math.pi, rel=0.02)  # the analytic derivative
    assert float(M.lie_derivative(model, img, axis="y").abs().max()) < 1e-6     # rows are all alike
    with pytest.raises(EquishiftError):
        M.lie_derivative(model, img, mode="circular")
