"""equishift.testing: assert_shift_invariant / assert_shift_equivariant pass when they should, and fail
with the worst shift and the max error, both recomputed here by a plain loop over shifts."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from equishift.polyphase import anchor
from equishift.shifts import period_grid
from equishift.testing import (assert_shift_equivariant, assert_shift_invariant, check_shift_equivariant,
                               check_shift_invariant, default_shifts)


def loop_invariance_errors(f, x, shifts):
    ref = f(x)
    return torch.tensor([(f(torch.roll(x, (dy, dx), (-2, -1))) - ref).abs().max().item()
                         for dy, dx in shifts.tolist()])


def loop_equivariance_errors(f, x, shifts, scale):
    ref = f(x)
    return torch.tensor([(f(torch.roll(x, (dy, dx), (-2, -1))) - torch.roll(ref, (dy // scale, dx // scale),
                                                                             (-2, -1))).abs().max().item()
                         for dy, dx in shifts.tolist()])


def parse(message: str):
    m = re.search(r"max \|Δ\| = (\S+) at shift \(dy=(-?\d+), dx=(-?\d+)\); (\d+)/(\d+) shifts exceed atol=(\S+)",
                  message)
    assert m, message
    return float(m[1]), (int(m[2]), int(m[3])), int(m[4]), int(m[5]), float(m[6])


X = torch.randn(3, 2, 8, 12, generator=torch.Generator().manual_seed(0))


# --- invariance ----------------------------------------------------------------------------------------
def test_invariant_function_passes_on_default_shifts():
    report = assert_shift_invariant(lambda t: t.mean(dim=(2, 3)), X)
    assert torch.equal(report.shifts, default_shifts())
    assert report.ok and report.max_error <= 1e-4 and len(report.errors) == len(report.shifts)


def test_failure_names_worst_shift_and_max_error():
    f = lambda t: t[:, :, 0, :3].flatten(1)  # noqa: E731 — reads fixed pixels: not invariant
    shifts = torch.tensor([[0, 0], [1, 0], [0, 5], [-3, 2], [7, -9]])
    want = loop_invariance_errors(f, X, shifts)
    with pytest.raises(AssertionError) as err:
        assert_shift_invariant(f, X, shifts, atol=1e-4)
    max_err, worst, bad, total, atol = parse(str(err.value))
    assert str(err.value).startswith("not shift-invariant")
    assert worst == tuple(shifts[want.argmax()].tolist())
    assert max_err == pytest.approx(want.max().item(), rel=5e-3)  # printed with 3 significant digits
    assert (bad, total, atol) == (int((want > 1e-4).sum()), 5, 1e-4)
    report = check_shift_invariant(f, X, shifts)
    torch.testing.assert_close(report.errors, want.float(), rtol=0, atol=1e-6)
    assert report.worst == int(want.argmax()) and not report.ok


def test_atol_is_respected():
    # A model that is invariant but for a 1e-6 position-dependent term.
    bump = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)) * 1e-6
    f = lambda t: t.mean(dim=(2, 3)) + (t[:, :1] * bump).sum(dim=(2, 3))  # noqa: E731
    shifts = period_grid(3)
    assert assert_shift_invariant(f, X, shifts, atol=1e-4).max_error < 1e-4
    with pytest.raises(AssertionError, match="atol=1e-09"):
        assert_shift_invariant(f, X, shifts, atol=1e-9)


def test_batching_does_not_change_the_report():
    f = lambda t: t[:, :, 1:3, 2:4].flatten(1)  # noqa: E731
    shifts = period_grid(4)
    a = check_shift_invariant(f, X, shifts, batch_size=1)
    b = check_shift_invariant(f, X, shifts, batch_size=1000)
    assert torch.equal(a.errors, b.errors)
    torch.testing.assert_close(a.errors, loop_invariance_errors(f, X, shifts).float(), rtol=0, atol=1e-6)


def test_single_image_and_other_shift_modes():
    mean = lambda t: t.mean(dim=(2, 3))  # noqa: E731
    assert assert_shift_invariant(mean, X[0], [(1, 2), (-3, 4)]).ok  # (C, H, W) accepted
    # Bilinear weights sum to one: the mean survives sub-pixel (circular) shifts.
    assert assert_shift_invariant(mean, X, [(0.5, 0.25), (-1.75, 3.5)], mode="bilinear").ok
    # A zero shift loses content at the border: the mean changes.
    with pytest.raises(AssertionError, match=r"shift \(dy=3, dx=0\)"):
        assert_shift_invariant(mean, X.abs() + 1, [(0, 0), (1, 0), (3, 0)], mode="zero")


def test_default_shifts():
    d = default_shifts(period=4, n_random=7, max_shift=9, seed=3)
    assert d.shape == (16 + 7, 2)
    assert torch.equal(d[:16], period_grid(4))
    assert d[16:].abs().max() <= 9
    assert torch.equal(d, default_shifts(period=4, n_random=7, max_shift=9, seed=3))
    assert not torch.equal(d, default_shifts(period=4, n_random=7, max_shift=9, seed=4))


# --- equivariance ----------------------------------------------------------------------------------------
def test_identity_and_circular_conv_are_equivariant():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")
    assert assert_shift_equivariant(lambda t: t, X).ok
    with torch.no_grad():
        report = assert_shift_equivariant(conv, X, atol=1e-5)
    assert torch.equal(report.shifts, default_shifts(period=4, max_shift=16))


def test_equivariance_failure_names_worst_shift():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1)  # zero padding: wrong along the border
    shifts = torch.tensor([[0, 0], [0, 1], [2, -3], [5, 5]])
    with torch.no_grad():
        want = loop_equivariance_errors(conv, X, shifts, 1)
        with pytest.raises(AssertionError) as err:
            assert_shift_equivariant(conv, X, shifts, atol=1e-5)
    max_err, worst, bad, total, _ = parse(str(err.value))
    assert str(err.value).startswith("not shift-equivariant")
    assert worst == tuple(shifts[want.argmax()].tolist())
    assert max_err == pytest.approx(want.max().item(), rel=5e-3)
    assert (bad, total) == (int((want > 1e-5).sum()), 4)


@pytest.mark.parametrize("s", [2, 4])
def test_strided_conv_after_anchoring(s):
    """A stride-s conv is equivariant (scale s) to shifts by multiples of s, with or without an anchor in
    front; only with the anchor does its pooled output become invariant to EVERY shift."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 5, s, stride=s)
    x = torch.randn(2, 2, 4 * s, 3 * s)
    anchored_conv = lambda t: conv(anchor(t, s)[0])  # noqa: E731
    every = torch.cat((period_grid(2 * s) - s, torch.tensor([[13, -7], [-21, 30]])))
    with torch.no_grad():
        assert_shift_equivariant(conv, x, period_grid(3) * s, scale=s, atol=1e-5)
        assert_shift_equivariant(anchored_conv, x, period_grid(3) * s, scale=s, atol=1e-5)
        assert_shift_invariant(lambda t: anchored_conv(t).mean(dim=(2, 3)), x, every, atol=1e-5)
        broken = check_shift_invariant(lambda t: conv(t).mean(dim=(2, 3)), x, every)
        assert broken.max_error > 1e-2
        # The loop over shifts agrees with the report.
        want = loop_equivariance_errors(anchored_conv, x, period_grid(3) * s, s)
        got = check_shift_equivariant(anchored_conv, x, period_grid(3) * s, scale=s)
    torch.testing.assert_close(got.errors, want.float(), rtol=0, atol=1e-6)


def test_equivariance_rejects_shifts_off_the_coarse_grid():
    with pytest.raises(ValueError, match="multiples of 4"):
        check_shift_equivariant(lambda t: t[..., ::4, ::4], X, [(4, 0), (1, 0)], scale=4)
