"""Circular padding: convolutions and max pooling that wrap around the map's edge instead of padding
with zeros (or -inf), so that they commute with circular shifts."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..polyphase import constant_cache

__all__ = ["CircularConv2d", "CircularMaxPool2d", "circular_pad"]


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

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = _circular_pad(x, self._reversed_padding_repeated_twice)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


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
        return F.max_pool2d(F.pad(x, self.pad, mode="circular"), self.kernel_size, self.stride)


circular_pad = _circular_pad
