"""Circular padding: convolutions and max pooling that wrap around the map's edge instead of padding
with zeros (or -inf), so that they commute with circular shifts."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..polyphase import constant_cache, wrapped_runs

__all__ = ["CircularConv2d", "CircularMaxPool2d", "circular_pad", "circular_conv2d"]


@constant_cache(maxsize=64)
def _pad_index(h: int, w: int, pad: Tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """Flat source pixel of every pixel of the circularly padded (h + top + bottom, w + left + right)
    map (a constant, cached per size)."""
    left, right, top, bottom = pad
    rows = torch.arange(-top, h + bottom, device=device) % h
    cols = torch.arange(-left, w + right, device=device) % w
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def _circular_pad(x: torch.Tensor, pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pad, mode="circular")`` for (B, C, H, W), keeping a channels-last layout.

    Token grids arrive as channels-last views of (B, N, C) tokens; PyTorch's circular pad returns NCHW,
    which costs a transposing copy and sends the following depth-wise conv down a much slower path. Here
    the padded grid is one index_select of whole token vectors (2.5x faster than two concatenations)."""
    if x.dim() != 4 or x.shape[1] == 1 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.pad(x, pad, mode="circular")
    left, right, top, bottom = pad
    b, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: x is channels-last
    out = tokens.index_select(1, _pad_index(h, w, tuple(pad), x.device))
    return out.reshape(b, h + top + bottom, w + left + right, c).permute(0, 3, 1, 2)


# Elements per image (not per batch: a sweep's one-image reference and its chunks must take the same path,
# the border is rounded differently) from which the zero-padded conv + border strips pays off, and the
# smallest map side (the strips' share of the work grows as 1/side).
_BORDER_FIX_MIN = 2 ** 17
_BORDER_FIX_SIDE = 24


def _wrapped(x: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """x's indices start..stop-1 along ``dim``, taken modulo its size: a thin strip, as at most a few
    contiguous slices (an index_select along H or W of a channels-last map is many times slower)."""
    pieces = [x.narrow(dim, src, n) for _, src, n in wrapped_runs(start, stop - start, x.shape[dim])]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _border_rows(n: int, k: int, s: int, p: int, d: int, out: int) -> List[Tuple[int, int]]:
    """Output ranges [r0, r1) along one axis whose receptive field crosses the map's edge."""
    first = min(out, -(-p // s))                                  # r * s - p < 0
    last = max(first, min(out, (n - 1 + p - (k - 1) * d) // s + 1))  # r * s - p + (k-1) d > n - 1
    return [(a, b) for a, b in ((0, first), (last, out)) if b > a]


def circular_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                    dilation, groups: int) -> torch.Tensor:
    """A conv with circular padding, computed as the zero-padded conv (padding inside the kernel: no
    padded copy of the input) whose border rows and columns are then recomputed from thin wrapped strips.
    Same values as padding first, up to float rounding (the border is computed by another conv call)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[-2:]
    h, w = x.shape[-2:]
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    ho, wo = out.shape[-2:]
    for r0, r1 in _border_rows(h, kh, sh, ph, dh, ho):
        strip = _wrapped(x, 2, r0 * sh - ph, (r1 - 1) * sh - ph + (kh - 1) * dh + 1)
        strip = F.pad(strip, (pw, pw, 0, 0), mode="circular")
        out[:, :, r0:r1, :] = F.conv2d(strip, weight, bias, stride, 0, dilation, groups)
    for c0, c1 in _border_rows(w, kw, sw, pw, dw, wo):
        strip = _wrapped(x, 3, c0 * sw - pw, (c1 - 1) * sw - pw + (kw - 1) * dw + 1)
        strip = F.pad(strip, (0, 0, ph, ph), mode="circular")
        out[:, :, :, c0:c1] = F.conv2d(strip, weight, bias, stride, 0, dilation, groups)
    return out


class CircularConv2d(nn.Conv2d):
    """``nn.Conv2d(..., padding_mode="circular")`` whose padding keeps channels-last inputs channels-last.

    Same parameters, state_dict and results as the plain circular Conv2d; only faster on token grids."""

    def __init__(self, *args, **kwargs):
        kwargs["padding_mode"] = "circular"
        super().__init__(*args, **kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "CircularConv2d":
        """A circular copy of ``conv`` (same weights, device and dtype)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    @property
    def pad(self) -> Tuple[int, int, int, int]:
        """(left, right, top, bottom): the circular padding the conv applies."""
        return tuple(self._reversed_padding_repeated_twice)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if x.dim() == 4 and left == right and top == bottom and x[0].numel() >= _BORDER_FIX_MIN and \
                min(x.shape[-2:]) >= _BORDER_FIX_SIDE and x.device.type == "cpu" and not torch.is_grad_enabled():
            # A big map: a padded copy would be a fresh map-sized buffer, and on a CPU its page faults, and
            # the conv on the odd padded size, cost more than recomputing the border.
            return circular_conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        x = _circular_pad(x, self._reversed_padding_repeated_twice)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The conv of an input already padded circularly by ``pad`` (an anchor padded it)."""
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class CircularMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` whose padding wraps around instead of padding with -inf."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        k, s, p = (pool.kernel_size, pool.stride, pool.padding)
        self.kernel_size, self.stride = k, s
        self.pad = (p, p, p, p) if isinstance(p, int) else (p[1], p[1], p[0], p[0])
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
            raise TypeError("circular max pooling supports dilation 1 and ceil_mode=False only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_padded(F.pad(x, self.pad, mode="circular"))

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling of an input already padded circularly by ``pad`` (an anchor padded it)."""
        return F.max_pool2d(x, self.kernel_size, self.stride)


circular_pad = _circular_pad
