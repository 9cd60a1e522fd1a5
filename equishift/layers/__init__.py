"""equishift's building blocks (the families in ``equishift.archs`` are assembled from them):

- ``PolyphaseAnchor``: rolls a map so its largest-norm polyphase component sits at phase (0, 0)
  (``equishift.polyphase``, with the recording and near-tie rules).
- circular padding: ``CircularConv2d``, ``CircularMaxPool2d``.
- ``ConvPosEmbed``: a circular depth-wise conv position encoding with a residual.
- anchored wrappers: ``AnchoredPatchEmbed``, ``AnchoredBlock`` (tokens + size), ``AnchoredMapBlock``
  (channels-last maps), ``AnchoredModule`` (NCHW layers), all ``AnchorWrapper``s but the first.
"""
from ..polyphase import PolyphaseAnchor
from .anchored import AnchoredBlock, AnchoredMapBlock, AnchoredModule, AnchoredPatchEmbed, AnchorWrapper
from .circular import CircularConv2d, CircularMaxPool2d, circular_pad
from .pos_embed import ConvPosEmbed

__all__ = ["PolyphaseAnchor", "CircularConv2d", "CircularMaxPool2d", "circular_pad", "ConvPosEmbed",
           "AnchoredPatchEmbed", "AnchorWrapper", "AnchoredBlock", "AnchoredMapBlock", "AnchoredModule"]
