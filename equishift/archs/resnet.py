"""ResNet / ResNet-D (timm ``ResNet``), anchored as in APS (Chaman & Dokmanić, CVPR 2021): an anchor
before every strided layer of the stem (the stride-2 conv, the max pooling), and before every block with
stride 2, so that its main branch and its shortcut (a strided 1x1 conv, or ResNet-D's average pooling)
see the same anchored input; every padded conv and pooling pads circularly. The head pools globally.

full        anchors + circular padding.
patch-only  anchors only (zero padding stays).
pos-only    circular padding only.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from . import Adapter, AnchorSite, Layer, register
from ._cnn import MODES_DOC, AnchoredModule, anchor_chain, make_circular, modes, total_stride


def _block_stride(block: nn.Module) -> int:
    strides = [total_stride(block.downsample)] if getattr(block, "downsample", None) is not None else []
    strides.append(max(total_stride(m) for n, m in block.named_children() if n.startswith("conv")))
    return max(strides)


def anchorize(model: nn.Module, mode: str) -> Tuple[nn.Module, List[AnchorSite]]:
    anchored, circular = modes(mode)
    if circular:  # first: the anchors wrap the (now circular) layers
        make_circular(model)
    if isinstance(model.conv1, nn.Sequential):
        sites = anchor_chain(model.conv1, "conv1", anchored, "the image: strided stem conv, s = its stride")
    else:
        s = total_stride(model.conv1)
        sites = [AnchorSite("conv1", s, anchored, "the image: strided stem conv, s = its stride")]
        if anchored and s > 1:
            model.conv1 = AnchoredModule(model.conv1, s, why=sites[0].why)
    s = total_stride(model.maxpool)
    if s > 1:
        sites.append(AnchorSite("maxpool", s, anchored, "stem pooling: s = its stride"))
        if anchored:
            model.maxpool = AnchoredModule(model.maxpool, s, why=sites[-1].why)
    for li in range(1, 5):
        layer = getattr(model, f"layer{li}", None)  # a feature backbone may stop early (stride 16)
        if layer is None:
            continue
        for bi, block in enumerate(layer):
            s = _block_stride(block)
            if s > 1:
                why = "strided block: main branch and shortcut see one anchored input"
                sites.append(AnchorSite(f"layer{li}.{bi}", s, anchored, why))
                if anchored:
                    layer[bi] = AnchoredModule(block, s, why=why)
    return model, sites


def unsupported(model: nn.Module):
    for name, m in model.named_modules():
        if name.endswith(".aa") and not isinstance(m, nn.Identity):
            return f"module '{name}' ({type(m).__name__}) is an anti-aliasing layer; anchoring it is not implemented"
    return None


def layers(model: nn.Module) -> List[Layer]:
    """The stages' outputs (maps); a CNN has no attention."""
    return [Layer(f"layer{i}", getattr(model, f"layer{i}"), "nchw") for i in range(1, 5) if hasattr(model, f"layer{i}")]


ADAPTER = register(Adapter(
    name="resnet", classes=("timm.models.resnet.ResNet",), modes=("full", "pos-only", "patch-only"),
    anchorize=anchorize, modes_doc=MODES_DOC, unsupported=unsupported, layers=layers))
