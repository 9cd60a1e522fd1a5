"""Shift transforms and shift grids (definitions: docs/metrics.md, "Shift modes").

A shift (dy, dx) moves image *content* down by dy rows and right by dx columns. Every mode is
implemented per sample with index arithmetic (gather), so a batch holding a different shift for each
image — in particular an *orbit*, every shift of a grid applied to one image — is built in one call with
no Python loop over shifts.

Modes
- ``circular``: torch.roll; what leaves one side comes back on the other.
- ``zero``: linear shift, vacated pixels are 0 (in whatever space the tensor is: apply it to
  *normalised* images if 0 should mean "mean colour", to raw ones if it should mean black).
- ``reflect``: linear shift, vacated pixels mirror the image (numpy's "reflect", edge not repeated).
- ``crop``: a window of ``size`` taken from a larger image; the shift moves the window by (-dy, -dx)
  from the centred position, so content moves by (dy, dx). Shifts outside the image raise ValueError.
- ``bilinear`` / ``fourier``: fractional (sub-pixel) shifts, circular boundary. Bilinear mixes the two
  nearest integer circular shifts; Fourier multiplies by a phase ramp. Both equal ``circular`` for
  integer shifts.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "MODES", "shift", "shift_batch", "orbit", "grid", "period_grid", "square_grid", "diagonal",
    "random_shifts", "as_shifts", "unshift_maps",
]

MODES = ("circular", "zero", "reflect", "crop", "bilinear", "fourier")
ShiftsLike = Union[torch.Tensor, Sequence[Tuple[float, float]]]


def as_shifts(shifts: ShiftsLike, *, integer: bool = True) -> torch.Tensor:
    """Normalise a list of (dy, dx) or a tensor to a [K, 2] tensor (long when ``integer``)."""
    # Fractional shifts given as Python floats go straight to float64 (via float32 0.3 would become 0.30000001).
    t = torch.as_tensor(shifts, dtype=None if integer or torch.is_tensor(shifts) else torch.float64)
    if t.dim() == 1 and t.numel() == 2:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"shifts must be a list of (dy, dx) pairs or a [K, 2] tensor, got shape {tuple(t.shape)}")
    if integer:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("this shift mode takes integer shifts; use mode='bilinear' or 'fourier' for sub-pixel ones")
        return t.long()
    return t.double()


# --- index arithmetic --------------------------------------------------------------------------------
def _gather2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W); rows (B, H'), cols (B, W') source indices -> (B, C, H', W')."""
    b, c, h, w = x.shape
    hh, ww = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(b, c, hh, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, hh, ww))


def _reflect_index(j: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.zeros_like(j)
    period = 2 * (n - 1)
    j = j % period
    return torch.where(j > n - 1, period - j, j)


def shift_batch(x: torch.Tensor, shifts: ShiftsLike, mode: str = "circular",
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Shift each image of ``x`` (B, C, H, W) by its own row of ``shifts`` (B, 2).

    ``size`` is the output (h, w) for ``mode='crop'`` (required there, ignored elsewhere)."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    if mode not in MODES:
        raise ValueError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")
    fractional = mode in ("bilinear", "fourier")
    s = as_shifts(shifts, integer=not fractional).to(x.device)
    if s.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {s.shape[0]} shifts")
    b, c, h, w = x.shape
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)

    if mode == "circular":
        return _gather2d(x, (ar_h - s[:, :1]) % h, (ar_w - s[:, 1:]) % w)
    if mode == "reflect":
        return _gather2d(x, _reflect_index(ar_h - s[:, :1], h), _reflect_index(ar_w - s[:, 1:], w))
    if mode == "zero":
        rows, cols = ar_h - s[:, :1], ar_w - s[:, 1:]
        out = _gather2d(x, rows.clamp(0, h - 1), cols.clamp(0, w - 1))
        keep = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        return out * keep[:, None].to(out.dtype)
    if mode == "crop":
        if size is None:
            raise ValueError("mode='crop' needs size=(h, w), the crop window")
        ch, cw = size
        if ch > h or cw > w:
            raise ValueError(f"crop window {ch}x{cw} is larger than the image {h}x{w}")
        top = (h - ch) // 2 - s[:, :1]
        left = (w - cw) // 2 - s[:, 1:]
        if (top < 0).any() or (top > h - ch).any() or (left < 0).any() or (left > w - cw).any():
            lo_y, hi_y = (h - ch) // 2 - (h - ch), (h - ch) // 2
            lo_x, hi_x = (w - cw) // 2 - (w - cw), (w - cw) // 2
            raise ValueError(
                f"crop shifts must lie in dy∈[{lo_y}, {hi_y}], dx∈[{lo_x}, {hi_x}] for a {ch}x{cw} window "
                f"in a {h}x{w} image"
            )
        rows = top + torch.arange(ch, device=x.device)
        cols = left + torch.arange(cw, device=x.device)
        return _gather2d(x, rows, cols)
    if mode == "bilinear":
        # Separable: along each axis, (1-f)·roll(floor) + f·roll(floor+1); circular boundary.
        fy, fx = torch.floor(s[:, 0]), torch.floor(s[:, 1])
        ay = (s[:, 0] - fy).to(x.dtype)[:, None, None, None]
        ax = (s[:, 1] - fx).to(x.dtype)[:, None, None, None]
        fy, fx = fy.long()[:, None], fx.long()[:, None]
        r0, r1 = (ar_h - fy) % h, (ar_h - fy - 1) % h
        c0, c1 = (ar_w - fx) % w, (ar_w - fx - 1) % w
        top = (1 - ax) * _gather2d(x, r0, c0) + ax * _gather2d(x, r0, c1)
        bot = (1 - ax) * _gather2d(x, r1, c0) + ax * _gather2d(x, r1, c1)
        return (1 - ay) * top + ay * bot
    # fourier: multiply the 2-D spectrum by exp(-2πi (k_y dy / H + k_x dx / W)).
    ky = torch.fft.fftfreq(h, device=x.device, dtype=torch.float64)
    kx = torch.fft.fftfreq(w, device=x.device, dtype=torch.float64)
    phase = ky[None, :, None] * s[:, 0, None, None] + kx[None, None, :] * s[:, 1, None, None]
    ramp = torch.exp(-2j * math.pi * phase)[:, None]  # (B, 1, H, W)
    spec = torch.fft.fft2(x.to(torch.float64))
    # For even sizes the Nyquist bin's phase is ambiguous; taking the real part keeps the result real
    # and exact for integer shifts.
    return torch.fft.ifft2(spec * ramp).real.to(x.dtype)


def shift(x: torch.Tensor, dy: float, dx: float, mode: str = "circular",
          size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Shift one image (C, H, W) or every image of a batch (B, C, H, W) by the same (dy, dx)."""
    single = x.dim() == 3
    xb = x[None] if single else x
    out = shift_batch(xb, [(dy, dx)] * xb.shape[0], mode, size)
    return out[0] if single else out


def orbit(image: torch.Tensor, shifts: ShiftsLike, mode: str = "circular",
          size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Every shift of ``shifts`` [K, 2] applied to one image (C, H, W) or (1, C, H, W) -> (K, C, H', W')."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"orbit takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {tuple(image.shape)}")
    s = as_shifts(shifts, integer=mode not in ("bilinear", "fourier"))
    return shift_batch(image[None].expand(s.shape[0], *image.shape), s, mode, size)


def unshift_maps(maps: torch.Tensor, shifts: ShiftsLike, scale: int = 1) -> torch.Tensor:
    """Undo circular shifts on maps (K, ..., h, w) whose grid is ``scale`` times coarser than the image:
    map k is rolled by -shift_k / scale (shifts must be multiples of ``scale``)."""
    s = as_shifts(shifts)
    if (s % scale).any():
        raise ValueError(f"shifts must be multiples of {scale} to be undone exactly on this grid")
    lead = maps.shape[:-2]
    flat = maps.reshape(maps.shape[0], -1, *maps.shape[-2:])
    return shift_batch(flat, -(s // scale), "circular").reshape(*lead, *maps.shape[-2:])


# --- grids -------------------------------------------------------------------------------------------
def grid(ys: Iterable[int], xs: Iterable[int]) -> torch.Tensor:
    """Cartesian product of row and column shifts, row-major: LongTensor[len(ys)*len(xs), 2]."""
    yy, xx = torch.meshgrid(torch.as_tensor(list(ys)), torch.as_tensor(list(xs)), indexing="ij")
    return torch.stack((yy.flatten(), xx.flatten()), dim=1).long()


def period_grid(stride: int) -> torch.Tensor:
    """All shifts in one stride period: {0..s-1}²."""
    return grid(range(stride), range(stride))


def square_grid(radius: int) -> torch.Tensor:
    """All shifts with max(|dy|, |dx|) ≤ radius: {-r..r}²."""
    return grid(range(-radius, radius + 1), range(-radius, radius + 1))


def diagonal(start: int, stop: int) -> torch.Tensor:
    """Diagonal path (t, t) for t in [start, stop) — the paper's stability-heatmap path."""
    t = torch.arange(start, stop)
    return torch.stack((t, t), dim=1)


def random_shifts(n: int, low: int, high: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n shifts with each coordinate uniform in [low, high] (inclusive)."""
    return torch.randint(low, high + 1, (n, 2), generator=generator)
