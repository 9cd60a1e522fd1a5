"""ConvNeXt (timm ``ConvNeXt``), anchored as a CNN (APS): an anchor before the patchify stem (s = 4) and
before the stride-2 conv of every downsampling layer, and every depth-wise 7x7 conv padded circularly.
The head pools globally, so ``full`` is exactly invariant.

full        anchors + circular padding.
patch-only  anchors only (zero padding stays: it tells the network where the border is).
pos-only    circular padding only (the strided stem and downsampling still cut on a fixed grid).
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from . import Adapter, AnchorSite, Layer, register
from ._cnn import MODES_DOC, anchor_chain, make_circular, modes


def anchorize(model: nn.Module, mode: str) -> Tuple[nn.Module, List[AnchorSite]]:
    anchored, circular = modes(mode)
    sites = anchor_chain(model.stem, "stem", anchored, "the image: patchify stem, s = its stride")
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            sites += anchor_chain(stage.downsample, f"stages.{i}.downsample", anchored,
                                  "downsampling conv: s = its stride")
    if circular:
        make_circular(model)
    return model, sites


def unsupported(model: nn.Module):
    for name, m in model.named_modules():
        if name.startswith("stages.") and ".blocks." in name and getattr(m, "stride", 1) not in (1, (1, 1)):
            return f"module '{name}' is a strided layer inside a block; anchoring it is not implemented"
    return None


def layers(model: nn.Module) -> List[Layer]:
    """The stages' outputs (maps); a CNN has no attention."""
    return [Layer(f"stages.{i}", stage, "nchw") for i, stage in enumerate(model.stages)]


ADAPTER = register(Adapter(
    name="convnext", classes=("timm.models.convnext.ConvNeXt",), modes=("full", "pos-only", "patch-only"),
    anchorize=anchorize, modes_doc=MODES_DOC, unsupported=unsupported, layers=layers))
