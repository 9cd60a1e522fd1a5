"""Adaptive polyphase anchoring (Ding et al. 2023, "Reviving Shift Equivariance in Vision Transformers").

For a map ``x`` of shape (B, C, H, W) and a period ``s`` the s² polyphase components are
``x[:, :, a::s, b::s]``. The *anchor* is the (a, b) whose component has the largest l2 norm over all
channels and positions; ``anchor`` rolls ``x`` by minus that index so that every later operator that is
equivariant to shifts by multiples of ``s`` becomes equivariant to all integer circular shifts.

Ties go to the first index in row-major order (``a * s + b``): ``torch.argmax`` returns the first
maximal entry, and the scores are laid out row-major. A constant image therefore anchors at (0, 0).
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
from torch import nn

__all__ = ["polyphase_norms", "select_anchor", "anchor", "roll_batch", "PolyphaseAnchor", "record_anchors"]


def _check(x: torch.Tensor, stride: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(
            f"polyphase anchoring needs H and W divisible by the stride: got H={h}, W={w}, stride={stride}"
        )


def _phase_sums(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, stride, stride) squared l2 norms of the polyphase components, as float64 (float32 on MPS)."""
    _check(x, stride)
    b, c, h, w = x.shape
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)  # fp16/bf16 would overflow or tie
    # Per-pixel energy: each pixel is reduced over its channels in the same order wherever it sits, so a
    # shifted map has exactly the same per-pixel energies, only permuted.
    energy = (x * x).sum(dim=1)
    # Phase sums in float64: a shift only reorders these sums, and float64 keeps the reordering error
    # (~1e-16) far below real differences between phases, so near-ties (e.g. right after a LayerNorm) do
    # not flip with the shift as they do with float32 sums. (B, H/s, s, W/s, s): phase (a, b) = [:, :, a, :, b].
    # (MPS has no float64; there the sums stay in float32.)
    energy = energy.to(torch.float32 if energy.device.type == "mps" else torch.float64)
    return energy.reshape(b, h // stride, stride, w // stride, stride).sum(dim=(1, 3))


def polyphase_norms(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Squared l2 norm of each polyphase component, shape (B, stride, stride), returned in float32
    (float64 for float64 input); half-precision input is scored in float32, so it does not tie or overflow."""
    sums = _phase_sums(x, stride)
    return sums if x.dtype == torch.float64 else sums.float()


def select_anchor(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(row, col) phase of the largest-norm polyphase component per image: LongTensor[B, 2].

    Ties resolve to the first index in row-major order (a * stride + b)."""
    with torch.no_grad():
        flat = _phase_sums(x, stride).flatten(1).argmax(dim=1)
    return torch.stack((flat // stride, flat % stride), dim=1)


def roll_batch(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Roll each image of ``x`` (B, C, H, W) circularly by its own (dy, dx) in ``shifts`` (B, 2).

    One indexed copy with per-sample indices: no Python loop over the batch, differentiable in ``x``.
    The output keeps the memory format of ``x``."""
    b, c, h, w = x.shape
    shifts = shifts.to(device=x.device, dtype=torch.long)
    rows = (torch.arange(h, device=x.device).unsqueeze(0) - shifts[:, :1]) % h  # (B, H)
    cols = (torch.arange(w, device=x.device).unsqueeze(0) - shifts[:, 1:]) % w  # (B, W)
    src = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, h * w)  # source pixel of each output pixel
    if c > 1 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        # A token grid ((B, N, C) tokens viewed as (B, C, H, W)): move whole C-vectors with index_select,
        # a contiguous copy per pixel and ~10x faster than an element-wise gather on this layout.
        offset = torch.arange(b, device=x.device).unsqueeze(1) * (h * w)
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        out = pixels.index_select(0, (src + offset).reshape(-1))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)
    flat = x.reshape(b, c, h * w)
    return flat.gather(2, src.unsqueeze(1).expand(b, c, h * w)).reshape(b, c, h, w)


def anchor(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll ``x`` by minus its anchor. Returns ``(rolled_x, index)`` with index LongTensor[B, 2].

    The roll is never undone: the network continues in the anchored frame. Gradients flow through
    the roll (the index itself is a discrete choice and carries none)."""
    idx = select_anchor(x, stride)
    if stride == 1:
        return x, idx
    return roll_batch(x, -idx), idx


# --- recording -------------------------------------------------------------------------------------
# The active recorder lives in a ContextVar: every thread (and asyncio task) sees its own value, so two
# sessions running the same cached model at once never see each other's anchors.
_RECORDER: contextvars.ContextVar[Optional["_Recorder"]] = contextvars.ContextVar(
    "equishift_anchor_recorder", default=None
)


class _Recorder:
    def __init__(self, names: Dict[int, str]):
        self.names = names
        self.records: Dict[str, torch.Tensor] = {}

    def add(self, module: nn.Module, index: torch.Tensor) -> None:
        name = self.names.get(id(module))
        if name is None:  # an anchor of another model run inside the same context
            return
        prev = self.records.get(name)
        index = index.detach().cpu()
        # Several forward passes inside one context (e.g. a chunked sweep) concatenate along the batch.
        self.records[name] = index if prev is None else torch.cat((prev, index))


class PolyphaseAnchor(nn.Module):
    """Anchors a (B, C, H, W) map with period ``stride``; records its choice inside ``record_anchors``."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, idx = anchor(x, self.stride)
        rec = _RECORDER.get()
        if rec is not None:
            rec.add(self, idx)
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


@contextmanager
def record_anchors(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Record, per anchored module name, the LongTensor[B, 2] each forward pass selects.

    >>> with record_anchors(model) as anchors:
    ...     model(x)
    >>> anchors["patch_embed.anchor"]  # (B, 2) row/col phase

    The dict is filled as the forward pass runs. Thread-safe: the recorder is context-local."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
    rec = _Recorder(names)
    token = _RECORDER.set(rec)
    try:
        yield rec.records
    finally:
        _RECORDER.reset(token)
