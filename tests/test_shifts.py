"""Shift transforms and grids against small hand-computed tensors and independent references
(torch.roll, numpy.pad, an analytic cosine). A shift (dy, dx) moves content down by dy, right by dx."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from equishift.shifts import (MODES, as_shifts, diagonal, grid, orbit, period_grid, random_shifts, shift,
                              shift_batch, square_grid, unshift_maps)

BOUNDED = settings(max_examples=30, deadline=None, derandomize=True, database=None)
ROW = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])  # 1 x 1 x 1 x 4
IMG = torch.arange(12.0).reshape(1, 1, 3, 4)  # rows [0 1 2 3], [4 5 6 7], [8 9 10 11]


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# --- each mode on a hand-computed example ------------------------------------------------------------
def test_circular_by_hand():
    assert torch.equal(shift(IMG, 1, 2), t([[10, 11, 8, 9], [2, 3, 0, 1], [6, 7, 4, 5]]))
    assert torch.equal(shift(IMG, -1, -1), t([[5, 6, 7, 4], [9, 10, 11, 8], [1, 2, 3, 0]]))
    assert torch.equal(shift(IMG, 4, 9), shift(IMG, 1, 1))  # periodic


def test_zero_by_hand():
    assert torch.equal(shift(IMG, 1, 2), shift(IMG, 1, 2, "circular"))
    assert torch.equal(shift(IMG, 1, 2, "zero"), t([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 4, 5]]))
    assert torch.equal(shift(IMG, -2, -3, "zero"), t([[11, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(shift(IMG, 3, 0, "zero"), torch.zeros_like(IMG))


def test_reflect_by_hand():
    # numpy "reflect": the edge is not repeated; [0 1 2 3] moved right by 2 -> [2 1 0 1].
    assert torch.equal(shift(ROW, 0, 2, "reflect"), t([[2, 1, 0, 1]]))
    assert torch.equal(shift(ROW, 0, -3, "reflect"), t([[3, 2, 1, 0]]))
    assert torch.equal(shift(IMG, 1, 1, "reflect"), t([[5, 4, 5, 6], [1, 0, 1, 2], [5, 4, 5, 6]]))


@BOUNDED
@given(h=st.integers(2, 7), w=st.integers(2, 7), dy=st.integers(-6, 6), dx=st.integers(-6, 6))
def test_reflect_matches_numpy_pad(h, w, dy, dx):
    dy, dx = max(min(dy, h - 1), 1 - h), max(min(dx, w - 1), 1 - w)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * 31 + w))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (abs(dy),) * 2, (abs(dx),) * 2), mode="reflect")
    top, left = abs(dy) - dy, abs(dx) - dx  # content moves by +dy: the window starts dy above the image
    want = torch.from_numpy(padded[:, :, top:top + h, left:left + w].copy())
    assert torch.equal(shift(x, dy, dx, "reflect"), want)


def test_crop_by_hand():
    big = torch.arange(25.0).reshape(1, 1, 5, 5)
    # A 3x3 window, centred at offset (1, 1); shift (dy, dx) moves the window by (-dy, -dx).
    assert torch.equal(shift(big, 0, 0, "crop", size=(3, 3)), t([[6, 7, 8], [11, 12, 13], [16, 17, 18]]))
    assert torch.equal(shift(big, 1, -1, "crop", size=(3, 3)), t([[2, 3, 4], [7, 8, 9], [12, 13, 14]]))
    # Content moves like a zero shift wherever the window sees it.
    a, b = shift(big, 0, 0, "crop", size=(3, 3)), shift(big, 1, 0, "crop", size=(3, 3))
    assert torch.equal(b[..., 1:, :], a[..., :-1, :])


def test_crop_errors():
    big = torch.zeros(1, 1, 5, 5)
    with pytest.raises(ValueError, match="needs size"):
        shift(big, 0, 0, "crop")
    with pytest.raises(ValueError, match="larger than the image"):
        shift(big, 0, 0, "crop", size=(6, 3))
    with pytest.raises(ValueError, match=r"dy∈\[-1, 1\]"):
        shift(big, 2, 0, "crop", size=(3, 3))


def test_bilinear_by_hand():
    # Half a pixel right, circular: out[j] = (x[j] + x[j-1]) / 2.
    assert torch.equal(shift(ROW, 0, 0.5, "bilinear"), t([[1.5, 0.5, 1.5, 2.5]]))
    # A quarter pixel left: out[j] = 0.75 x[j] + 0.25 x[j+1].
    assert torch.equal(shift(ROW, 0, -0.25, "bilinear"), t([[0.25, 1.25, 2.25, 2.25]]))
    # Both axes: bilinear interpolation of the four neighbours (all weights 1/4).
    want = (IMG + IMG.roll(1, -1) + IMG.roll(1, -2) + IMG.roll((1, 1), (-2, -1))) / 4
    torch.testing.assert_close(shift(IMG, 0.5, 0.5, "bilinear"), want, rtol=0, atol=1e-6)


def test_fourier_half_pixel_on_a_cosine():
    # A band-limited signal (frequency 3 of 16) shifted by 0.5 px is the same cosine, exactly sampled.
    n, k = 16, 3
    j = torch.arange(n, dtype=torch.float64)
    x = torch.cos(2 * math.pi * k * j / n).reshape(1, 1, 1, n)
    want = torch.cos(2 * math.pi * k * (j - 0.5) / n).reshape(1, 1, 1, n)
    torch.testing.assert_close(shift(x, 0, 0.5, "fourier"), want, rtol=0, atol=1e-12)


def test_fourier_shifts_compose_on_odd_sizes():
    # Odd sizes have no Nyquist bin, so sub-pixel Fourier shifts compose exactly: 0.3 + 0.7 = 1.
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    twice = shift(shift(x, 0.3, -0.4, "fourier"), 0.7, -0.6, "fourier")
    torch.testing.assert_close(twice, shift(x, 1, -1), rtol=0, atol=1e-12)


@BOUNDED
@given(h=st.integers(1, 9), w=st.integers(1, 9), dy=st.integers(-20, 20), dx=st.integers(-20, 20))
def test_integer_bilinear_and_fourier_equal_circular(h, w, dy, dx):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    want = torch.roll(x, (dy, dx), dims=(-2, -1))
    assert torch.equal(shift(x, dy, dx), want)
    assert torch.equal(shift(x, float(dy), float(dx), "bilinear"), want)
    torch.testing.assert_close(shift(x, dy, dx, "fourier"), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modes_keep_dtype_and_single_image_shape(mode, dtype):
    x = torch.randn(3, 8, 8, dtype=dtype)
    size = (6, 6) if mode == "crop" else None
    out = shift(x, 1, -1, mode, size=size)
    assert out.dtype == dtype and out.shape == ((3, 6, 6) if size else (3, 8, 8))


# --- batches and orbits ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_shift_batch_and_orbit_equal_loops_of_single_shifts(mode):
    g = torch.Generator().manual_seed(1)
    frac = mode in ("bilinear", "fourier")
    shifts = [(0, 0), (1, -2), (-1, 1), (2, 2)] + ([(0.5, -1.25)] if frac else [])
    size = (4, 5) if mode == "crop" else None  # crop shifts then lie in [-2, 2]²
    x = torch.randn(len(shifts), 2, 8, 9, generator=g)
    batch = shift_batch(x, shifts, mode, size=size)
    for i, (dy, dx) in enumerate(shifts):
        torch.testing.assert_close(batch[i], shift(x[i], dy, dx, mode, size=size), rtol=0, atol=1e-6)
    orb = orbit(x[0], shifts, mode, size=size)
    assert orb.shape[0] == len(shifts)
    for i, (dy, dx) in enumerate(shifts):
        torch.testing.assert_close(orb[i], shift(x[0], dy, dx, mode, size=size), rtol=0, atol=1e-6)
    torch.testing.assert_close(orbit(x[:1], shifts, mode, size=size), orb)  # (1, C, H, W) accepted too


def test_orbit_and_batch_errors():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="one image"):
        orbit(x, [(0, 1)])
    with pytest.raises(ValueError, match="2 images but 3 shifts"):
        shift_batch(x, [(0, 1)] * 3)
    with pytest.raises(ValueError, match="unknown shift mode 'wrap'"):
        shift(x, 0, 1, "wrap")
    with pytest.raises(ValueError, match="integer shifts"):
        shift(x, 0, 0.5)
    with pytest.raises(ValueError, match=r"\(dy, dx\) pairs"):
        as_shifts([[1, 2, 3]])
    with pytest.raises(ValueError, match="B, C, H, W"):
        shift_batch(torch.randn(4, 4), [(0, 0)])


# --- unshift_maps ------------------------------------------------------------------------------------
def test_unshift_maps_undoes_shifts_on_a_coarser_grid():
    s = 4
    x = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(2))
    shifts = torch.tensor([[0, 0], [4, -8], [-12, 4], [20, 16]])
    maps = torch.nn.functional.avg_pool2d(orbit(x, shifts), s)  # (K, 3, 4, 3): a stride-4 feature map
    back = unshift_maps(maps, shifts, scale=s)
    want = torch.nn.functional.avg_pool2d(x[None], s).expand_as(maps)
    torch.testing.assert_close(back, want, rtol=0, atol=1e-6)
    # Leading dimensions beyond (K, C) are kept: e.g. (K, heads, 1, h, w).
    assert torch.equal(unshift_maps(maps[:, :, None], shifts, scale=s), back[:, :, None])
    with pytest.raises(ValueError, match="multiples of 4"):
        unshift_maps(maps, torch.tensor([[1, 0]] * 4), scale=s)


# --- grids -------------------------------------------------------------------------------------------
def test_grids():
    assert grid([0, 1], [5, 6, 7]).tolist() == [[0, 5], [0, 6], [0, 7], [1, 5], [1, 6], [1, 7]]
    p = period_grid(3)
    assert p.dtype == torch.long and p.shape == (9, 2) and p[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {tuple(r) for r in p.tolist()} == {(a, b) for a in range(3) for b in range(3)}
    q = square_grid(2)
    assert q.shape == (25, 2) and q.abs().max() == 2 and len({tuple(r) for r in q.tolist()}) == 25
    assert diagonal(-5, 5).tolist() == [[i, i] for i in range(-5, 5)]


def test_random_shifts_bounds_and_seed():
    r = random_shifts(2000, -3, 4, torch.Generator().manual_seed(0))
    assert r.shape == (2000, 2) and r.min() == -3 and r.max() == 4  # inclusive on both ends
    assert torch.equal(r, random_shifts(2000, -3, 4, torch.Generator().manual_seed(0)))


def test_as_shifts():
    assert as_shifts((1, 2)).tolist() == [[1, 2]]
    assert as_shifts([[1.0, -2.0]]).dtype == torch.long
    assert as_shifts([[0.5, 1]], integer=False).dtype == torch.float64
    assert as_shifts([(0.1, -0.3)], integer=False).tolist() == [[0.1, -0.3]]  # not rounded through float32
