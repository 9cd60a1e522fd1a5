"""Test helpers offered to users: assert that a model is shift-invariant or a map shift-equivariant.

In the spirit of e3nn's ``assert_equivariant``: one call, a sensible default set of shifts, and a failure
message that says which shift was worst and by how much.

>>> from equishift import anchorize
>>> from equishift.testing import assert_shift_invariant
>>> assert_shift_invariant(anchorize(model).eval(), torch.randn(4, 3, 32, 32))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .shifts import ShiftsLike, as_shifts, grid, random_shifts, shift_batch

__all__ = ["ShiftReport", "default_shifts", "trained_like", "check_shift_invariant", "assert_shift_invariant",
           "check_shift_equivariant", "assert_shift_equivariant"]


@dataclass
class ShiftReport:
    """Per-shift max-abs errors of a shift test; ``worst`` is the index of the largest."""

    shifts: torch.Tensor  # [K, 2]
    errors: torch.Tensor  # [K]
    atol: float

    @property
    def worst(self) -> int:
        return int(self.errors.argmax())

    @property
    def max_error(self) -> float:
        return float(self.errors.max())

    @property
    def ok(self) -> bool:
        return self.max_error <= self.atol

    def __str__(self) -> str:
        dy, dx = self.shifts[self.worst].tolist()
        bad = int((self.errors > self.atol).sum())
        return (f"max |Δ| = {self.max_error:.3g} at shift (dy={dy}, dx={dx}); "
                f"{bad}/{len(self.errors)} shifts exceed atol={self.atol:g}")


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a freshly initialised model the norm statistics training leaves (in place, seeded): BatchNorm
    running mean/var and every norm's affine away from 0/1, layer-scale ``gamma`` away from its 1e-6 init.
    With timm's init, LayerNorm outputs make polyphase components tie and ConvNeXt blocks are nearly the
    identity, which hides both failures and fixes of shift invariance."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        norm = isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))
        if (norm or type(m).__name__.startswith("LayerNorm")) and getattr(m, "weight", None) is not None:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("gamma") and p.dim() == 1:
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def default_shifts(period: int = 16, n_random: int = 20, max_shift: int = 64, seed: int = 0) -> torch.Tensor:
    """Every shift in a ``period``×``period`` block plus ``n_random`` random larger ones (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat((grid(range(period), range(period)), random_shifts(n_random, -max_shift, max_shift, g)))


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], xs: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(xs[i:i + batch]) for i in range(0, xs.shape[0], batch)])


@torch.no_grad()
def check_shift_invariant(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          shifts: Optional[ShiftsLike] = None, atol: float = 1e-4, mode: str = "circular",
                          batch_size: int = 256) -> ShiftReport:
    """Max |f(T_δ x) − f(x)| for each shift δ (over the whole batch ``x`` and every output entry)."""
    x = x if x.dim() == 4 else x[None]
    s = default_shifts() if shifts is None else as_shifts(shifts, integer=mode not in ("bilinear", "fourier"))
    b = x.shape[0]
    ref = model(x)
    # One big batch: every image under every shift (shift-major), so the model runs in few calls.
    xs = shift_batch(x.repeat(len(s), 1, 1, 1), s.repeat_interleave(b, 0), mode)
    out = _batched(model, xs, batch_size).reshape(len(s), b, *ref.shape[1:])
    err = (out - ref[None]).abs().flatten(1).max(dim=1).values
    return ShiftReport(s, err.float().cpu(), atol)


def assert_shift_invariant(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           shifts: Optional[ShiftsLike] = None, atol: float = 1e-4, mode: str = "circular",
                           batch_size: int = 256) -> ShiftReport:
    """Assert ``model(shift(x, δ)) ≈ model(x)`` for every δ; returns the report. Put the model in eval
    mode first (dropout is not shift-invariant)."""
    report = check_shift_invariant(model, x, shifts, atol, mode, batch_size)
    if not report.ok:
        raise AssertionError(f"not shift-invariant: {report}")
    return report


@torch.no_grad()
def check_shift_equivariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            shifts: Optional[ShiftsLike] = None, atol: float = 1e-4, scale: int = 1,
                            batch_size: int = 256) -> ShiftReport:
    """Max |fn(R_δ x) − R_{δ/scale} fn(x)| per shift, for circular shifts; ``fn`` maps (B, C, H, W) to
    (B, C', H/scale, W/scale). Shifts not divisible by ``scale`` are rejected (they have no exact image)."""
    x = x if x.dim() == 4 else x[None]
    s = default_shifts(period=4, max_shift=16) * scale if shifts is None else as_shifts(shifts)
    if (s % scale).any():
        raise ValueError(f"equivariance on a grid {scale}x coarser needs shifts that are multiples of {scale}")
    b = x.shape[0]
    ref = fn(x)
    xs = shift_batch(x.repeat(len(s), 1, 1, 1), s.repeat_interleave(b, 0), "circular")
    out = _batched(fn, xs, batch_size)
    want = shift_batch(ref.repeat(len(s), 1, 1, 1), (s // scale).repeat_interleave(b, 0), "circular")
    err = (out - want).abs().reshape(len(s), -1).max(dim=1).values
    return ShiftReport(s, err.float().cpu(), atol)


def assert_shift_equivariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                             shifts: Optional[ShiftsLike] = None, atol: float = 1e-4, scale: int = 1,
                             batch_size: int = 256) -> ShiftReport:
    """Assert ``fn(shift(x, δ)) ≈ shift(fn(x), δ / scale)`` for every (circular) δ; returns the report."""
    report = check_shift_equivariant(fn, x, shifts, atol, scale, batch_size)
    if not report.ok:
        raise AssertionError(f"not shift-equivariant: {report}")
    return report
