"""Modules preceded by a polyphase anchor: a patch embedding, token blocks taking (tokens, size),
channels-last map blocks and plain (B, C, H, W) layers. Each says why its anchor is there (its repr)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..polyphase import PolyphaseAnchor
from .pos_embed import ConvPosEmbed

_FUSE_MIN = 2 ** 15  # elements per image: below this the roll and the padding are cheap apart

__all__ = ["AnchoredPatchEmbed", "AnchorWrapper", "AnchoredBlock", "AnchoredMapBlock", "AnchoredModule",
           "to_grid", "to_tokens", "square"]


def _to_grid(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *size)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _square(patch_size) -> int:
    p = patch_size if isinstance(patch_size, int) else tuple(patch_size)
    if isinstance(p, tuple):
        if p[0] != p[1]:
            raise TypeError(f"anchoring needs square patches, got patch size {p}")
        p = p[0]
    return int(p)


class AnchoredPatchEmbed(nn.Module):
    """A timm patch embedding preceded by a polyphase anchor and/or followed by a conv position encoding.

    Works for ViT's ``PatchEmbed`` (returns tokens, (B, N, D) or NHWC) and Twins' (returns (tokens, size)).
    Unknown attributes are looked up on the wrapped embedding, so timm code reading ``grid_size`` or
    ``patch_size`` keeps working."""

    def __init__(self, embed: nn.Module, anchor: bool, pos_conv: Optional[ConvPosEmbed] = None, why: str = ""):
        super().__init__()
        self.stride = _square(embed.patch_size)
        self.anchor = PolyphaseAnchor(self.stride) if anchor else None
        self.embed = embed
        self.pos_conv = pos_conv
        self.why = why

    def extra_repr(self) -> str:
        return f"stride={self.stride}, anchored={self.anchor is not None}" + (f", why={self.why!r}" if self.why else "")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("embed"), name)

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if self.anchor is not None:
            x = self.anchor(x)
        out = self.embed(x)
        if self.pos_conv is None:
            return out
        if isinstance(out, tuple):  # Twins-style (tokens, size)
            tokens, size = out
            return _to_tokens(self.pos_conv(_to_grid(tokens, size))), size
        if out.dim() == 4:  # NHWC (timm dynamic_img_size)
            return self.pos_conv(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        grid = (self.embed.dynamic_feat_size((h, w)) if hasattr(self.embed, "dynamic_feat_size")
                else (h // self.stride, w // self.stride))  # a hybrid's grid is its backbone's
        return _to_tokens(self.pos_conv(_to_grid(out, tuple(grid))))


class AnchorWrapper(nn.Module):
    """A module preceded by a polyphase anchor of period ``stride``, with the reason it is there. The
    wrapped module sits under ``_inner`` ("block"; "module" for CNN layers), so its state-dict keys are
    ``<name>.<_inner>.*``; attributes timm code reads on it are looked up on it. Subclasses say where the
    anchor acts (``forward``)."""

    _inner = "block"

    def __init__(self, inner: nn.Module, stride: int, why: str = ""):
        super().__init__()
        self.anchor = PolyphaseAnchor(stride)
        setattr(self, self._inner, inner)
        self.why = why

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__(type(self)._inner), name)

    def extra_repr(self) -> str:
        return f"stride={self.anchor.stride}" + (f", why={self.why!r}" if self.why else "")


class AnchoredBlock(AnchorWrapper):
    """A Twins block taking (tokens, size), preceded by a polyphase anchor on its token grid."""

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        x = _to_tokens(self.anchor(_to_grid(x, size)))
        return self.block(x, size)


class AnchoredMapBlock(AnchorWrapper):
    """A module taking a channels-last map (B, H, W, C) (a Swin block or patch merging), preceded by a
    polyphase anchor on that map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.anchor(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class AnchoredModule(AnchorWrapper):
    """``module`` preceded by a polyphase anchor of period ``stride`` on its (B, C, H, W) input."""

    _inner = "module"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = getattr(self.module, "pad", None)
        if pad is not None and hasattr(self.module, "forward_padded") and any(pad) and x.dim() == 4 and \
                x[0].numel() >= _FUSE_MIN and not self.module._forward_hooks and not self.module._forward_pre_hooks:
            # A circular conv/pooling right after the anchor: roll and pad in one copy of a big map.
            # (Hooks on the inner module, e.g. a GradCAM tap, get the plain call below.)
            return self.module.forward_padded(self.anchor(x, pad=pad))
        return self.module(self.anchor(x))


to_grid, to_tokens, square = _to_grid, _to_tokens, _square
