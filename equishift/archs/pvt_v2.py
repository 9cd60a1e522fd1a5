"""PVT-v2 (timm ``PyramidVisionTransformerV2``): overlapping patch embeddings (strided convs with zero
padding), spatial-reduction attention (keys and values from a conv of kernel = stride = sr) and a
depth-wise 3x3 conv in every MLP.

full        an anchor before every overlapping patch embedding (s = its stride: 4, then 2) and before
            every block whose attention sub-samples (s = sr); every padded conv (embeddings, MLP
            depth-wise convs) pads circularly. The head averages the tokens: exactly invariant.
patch-only  anchors only.
pos-only    circular padding only (the depth-wise convs are PVT-v2's position encoding).

The linear-attention variants (``*_li``) pool keys and values to a fixed 7x7 grid (adaptive pooling
with cells at fixed positions) and are refused.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from . import Adapter, AnchorSite, Layer, register
from ._cnn import MODES_DOC, AnchoredModule, make_circular, modes, stride_of


def anchorize(model: nn.Module, mode: str) -> Tuple[nn.Module, List[AnchorSite]]:
    from ..layers import AnchoredBlock

    anchored, circular = modes(mode)
    if circular:
        make_circular(model)
    sites: List[AnchorSite] = []

    def embed(parent: nn.Module, attr: str, name: str) -> None:
        module = getattr(parent, attr)
        s = stride_of(module.proj)
        why = "overlapping patch embedding: a strided conv, s = its stride"
        sites.append(AnchorSite(name, s, anchored, why if anchored else "no anchors in this mode"))
        if anchored:
            setattr(parent, attr, AnchoredModule(module, s, why=why))

    embed(model, "patch_embed", "patch_embed")
    for i, stage in enumerate(model.stages):
        if stage.downsample is not None:
            embed(stage, "downsample", f"stages.{i}.downsample")
        for j, block in enumerate(stage.blocks):
            sr = block.attn.sr
            if sr is None or stride_of(sr) <= 1:
                continue
            s, name = stride_of(sr), f"stages.{i}.blocks.{j}"
            why = f"spatial-reduction attention: keys and values from a conv of stride {s}"
            sites.append(AnchorSite(name, s, anchored, why if anchored else "no anchors in this mode"))
            if anchored:
                stage.blocks[j] = AnchoredBlock(block, s, why=why)
    return model, sites


def unsupported(model: nn.Module):
    for name, m in model.named_modules():
        if name.endswith(".attn") and getattr(m, "pool", None) is not None:
            return (f"module '{name}' pools keys and values to a fixed {m.pool.output_size} grid (linear "
                    f"attention): its cells sit at fixed positions, anchoring it is not implemented")
    return None


def layers(model: nn.Module) -> List[Layer]:
    """Every block (tokens on the grid passed as ``feat_size``): one query's row over the keys, which are
    sub-sampled by the block's sr ratio (the linear variants' pooled keys have no grid of their own: no
    attention map is recorded for them, only the layer error)."""
    out = []
    for i, stage in enumerate(model.stages):
        for j, b in enumerate(stage.blocks):
            if getattr(b.attn, "pool", None) is not None:  # linear (*_li): keys pooled to a fixed grid
                out.append(Layer(f"stages.{i}.blocks.{j}", b, "tokens", grid=lambda args, hw: args[1]))
                continue
            sr = stride_of(b.attn.sr) if getattr(b.attn, "sr", None) is not None else 1
            out.append(Layer(f"stages.{i}.blocks.{j}", b, "tokens", grid=lambda args, hw: args[1],
                             attention=b.attn.attn_drop, kind="query", sr=sr))
    return out


ADAPTER = register(Adapter(
    name="pvt_v2", classes=("timm.models.pvt_v2.PyramidVisionTransformerV2",),
    modes=("full", "pos-only", "patch-only"), anchorize=anchorize, modes_doc=MODES_DOC, unsupported=unsupported,
    layers=layers))
