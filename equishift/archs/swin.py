"""Swin (timm ``SwinTransformer``): the paper's PolySwin.

full        an anchor before the patch embedding (s = patch size), before every block (s = its window
            size) and before every patch merging (s = 2). Relative position biases stay: inside a window
            they only depend on offsets. Options:
            ``shifted_windows`` (False): the half-window cyclic shift and its attention mask are removed.
              The mask cuts the wrapped-around windows apart at fixed positions, which is what breaks
              circular equivariance; with anchored windows the plain windows suffice. True keeps them,
              as the paper's released PolySwin code does (then invariance is not exact).
            ``block`` ("pre-norm"): the anchor rolls the block's input, timm's residual is unchanged
              (an anchorized pretrained Swin stays close to the original). "paper": as the paper's code,
              the anchor rolls the output of norm1 and that normalised map is the residual.
            ``merge`` ("timm"): keep timm's PatchMerging (2x2 gather, LayerNorm over 4C, linear
              4C -> 2C: pretrained weights are reused). "paper": the paper's merging (a conv of kernel
              and stride 2, then LayerNorm over 2C; new weights).
            The paper's PolySwin = ``block="paper", shifted_windows=True, merge="paper"``; the default
            is the exactly invariant variant that reuses every timm weight.
patch-only  anchors before the patch embedding and the patch mergings; blocks untouched.
pos-only    does not exist for Swin: it has no absolute position embedding to replace.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ..layers import AnchoredMapBlock, AnchorWrapper
from . import Adapter, AnchorSite, Layer, register

MERGES = ("timm", "paper")
BLOCKS = ("pre-norm", "paper")


class PaperSwinBlock(AnchorWrapper):
    """A timm Swin block run as the paper's PolySwin block: norm1, then the anchor, and the normalised,
    rolled map is both the attention input and the residual (same weights, same keys under ``block``)."""

    def set_input_size(self, *args, **kwargs) -> None:
        _resize(self, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.block
        b, h, w, c = x.shape
        x = self.anchor(blk.norm1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + blk.drop_path1(blk._attn(x))
        x = x.reshape(b, -1, c)
        x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        return x.reshape(b, h, w, c)


class ConvMerging(nn.Module):
    """The paper's patch merging: a conv of kernel and stride 2 (C -> out_dim), then a LayerNorm, on a
    channels-last map (B, H, W, C) -> (B, H/2, W/2, out_dim)."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(out_dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def _resize(wrapper: nn.Module, *args, **kwargs) -> None:
    """timm's ``set_input_size`` on the wrapped block (it may rescale the window), then the anchor's
    period follows the new window; a removed shift stays removed."""
    block = wrapper.block
    removed = block.target_shift_size == (0, 0) and not any(block.shift_size)
    block.set_input_size(*args, **kwargs)
    if removed:
        _unshift(block)
    wrapper.anchor.stride = _window(block)


class SwinAnchoredBlock(AnchoredMapBlock):
    """A timm Swin block preceded by an anchor of period = its window size (on the (B, H, W, C) map),
    following timm's ``set_input_size``."""

    def set_input_size(self, *args, **kwargs) -> None:
        _resize(self, *args, **kwargs)


def _window(block: nn.Module) -> int:
    ws = tuple(block.window_size)
    if ws[0] != ws[1]:
        raise TypeError(f"anchoring needs square windows, got window size {ws}")
    return int(ws[0])


def _unshift(block: nn.Module) -> None:
    """Plain windows: no cyclic shift, no mask, also after a later ``set_input_size``."""
    block.shift_size = (0, 0)
    block.target_shift_size = (0, 0)
    block.attn_mask = None


def anchorize(model: nn.Module, mode: str, merge: str = "timm", block: str = "pre-norm",
              shifted_windows: bool = False) -> Tuple[nn.Module, List[AnchorSite]]:
    from ..layers import AnchoredMapBlock, AnchoredPatchEmbed
    from ..layers.anchored import square as _square

    block_kind = block
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
    if not isinstance(shifted_windows, bool):
        raise TypeError(f"shifted_windows must be True or False, got {shifted_windows!r}")
    p = _square(model.patch_embed.patch_size)
    why = f"the image: any shift, anchored with s = patch size {p}"
    model.patch_embed = AnchoredPatchEmbed(model.patch_embed, anchor=True, why=why)
    sites = [AnchorSite("patch_embed", p, True, why)]
    ref = next(model.parameters())
    for i, stage in enumerate(model.layers):
        down = stage.downsample
        if not isinstance(down, nn.Identity):
            if merge == "paper":
                down = ConvMerging(down.dim, down.out_dim, device=ref.device, dtype=ref.dtype)
            why = "patch merging gathers 2x2 neighbourhoods: period 2"
            stage.downsample = AnchoredMapBlock(down, 2, why=why)
            sites.append(AnchorSite(f"layers.{i}.downsample", 2, True, why))
        for j, block in enumerate(stage.blocks):
            ws = _window(block)
            name = f"layers.{i}.blocks.{j}"
            if mode != "full":
                sites.append(AnchorSite(name, ws, False, f"{mode}: blocks are not anchored"))
                continue
            why = f"window attention tied to a period of {ws}"
            if any(block.shift_size):
                if shifted_windows:
                    why += "; shifted windows and their mask kept (not exactly invariant)"
                else:
                    _unshift(block)
                    why += "; shifted windows and their mask removed"
            wrap = PaperSwinBlock if block_kind == "paper" else SwinAnchoredBlock
            stage.blocks[j] = wrap(block, ws, why=why)
            sites.append(AnchorSite(name, ws, True, why))
    return model, sites


def layers(model: nn.Module) -> List[Layer]:
    """Every block (channels-last maps): window attention, each window's keys as received by its queries,
    windows put back in place and the cyclic shift of SW-MSA blocks undone."""
    out = []
    for i, stage in enumerate(model.layers):
        for j, b in enumerate(stage.blocks):
            # (timm shrinks a window to a small stage's grid, so it may be non-square here)
            out.append(Layer(f"layers.{i}.blocks.{j}", b, "nhwc", attention=b.attn.attn_drop, kind="window",
                             window=tuple(int(v) for v in b.window_size), shift=tuple(int(v) for v in b.shift_size)))
    return out


ADAPTER = register(Adapter(
    name="swin", classes=("timm.models.swin_transformer.SwinTransformer",), modes=("full", "patch-only"),
    anchorize=anchorize, options={"merge": "timm", "block": "pre-norm", "shifted_windows": False},
    modes_doc={"pos-only": "Swin has no absolute position embedding to replace"}, layers=layers))


def anchorize_v2(model: nn.Module, mode: str, shifted_windows: bool = False) -> Tuple[nn.Module, List[AnchorSite]]:
    """Swin-V2: the same recipe (its blocks are post-norm, so only the pre-norm placement exists: the
    anchor rolls the block's input) with timm's patch merging."""
    return anchorize(model, mode, merge="timm", block="pre-norm", shifted_windows=shifted_windows)


ADAPTER_V2 = register(Adapter(
    name="swin_v2", classes=("timm.models.swin_transformer_v2.SwinTransformerV2",), modes=("full", "patch-only"),
    anchorize=anchorize_v2, options={"shifted_windows": False},
    modes_doc={"pos-only": "Swin-V2 has no absolute position embedding to replace"}, layers=layers))
