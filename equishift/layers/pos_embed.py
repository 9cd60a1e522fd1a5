"""Conv position encoding: a circular depth-wise conv with a residual, the shift-equivariant stand-in for
an absolute position embedding (the paper's PolyViT)."""
from __future__ import annotations

import torch
from torch import nn

from .circular import CircularConv2d

__all__ = ["ConvPosEmbed"]


class ConvPosEmbed(nn.Module):
    """Position encoding from a depth-wise 3x3 conv with circular padding plus a residual.

    Circular padding keeps it equivariant to circular token shifts; a zero-initialised conv makes it the
    identity, so anchorizing a pretrained model starts close to the original."""

    def __init__(self, dim: int, init: str = "zeros"):
        super().__init__()
        self.proj = CircularConv2d(dim, dim, 3, padding=1, groups=dim)
        if init == "zeros":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        elif init != "default":
            raise ValueError(f"init must be 'zeros' or 'default', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, h, w)
        return x + self.proj(x)
