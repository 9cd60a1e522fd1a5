"""``anchorize``: turn a timm model into an adaptively anchored, shift-invariant one, and the layers it uses.

Each family's recipe (where anchors go in each mode, and its options) lives in its own module of
``equishift.archs`` (one module per family); docs/anchoring.md has the overview. The layers they are
built from live in ``equishift.layers`` (re-exported here).

The input model is never mutated: anchorize works on a deep copy. Every surviving weight is reused.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

from torch import nn

from .layers import (AnchoredBlock, AnchoredMapBlock, AnchoredModule, AnchoredPatchEmbed, AnchorWrapper,
                     CircularConv2d, CircularMaxPool2d, ConvPosEmbed)
from .polyphase import PolyphaseAnchor

__all__ = ["MODES", "anchorize", "anchoring_mode", "anchor_options", "anchor_sites", "ConvPosEmbed",
           "AnchoredPatchEmbed", "AnchorWrapper", "AnchoredBlock", "AnchoredMapBlock", "AnchoredModule",
           "CircularConv2d", "CircularMaxPool2d"]

MODES = ("full", "pos-only", "patch-only")


def _adapter(model: nn.Module):
    from .archs import adapter_for, adapters, refusal_for

    reason = refusal_for(model)
    if reason is not None:
        raise TypeError(f"anchorize cannot make {type(model).__name__} shift-invariant: {reason}")
    found = adapter_for(model)
    if found is None:
        supported = "; ".join(f"{a.name} ({', '.join(c.rsplit('.', 1)[-1] for c in a.classes)})"
                              for a in adapters())
        raise TypeError(f"anchorize supports {supported}; got {type(model).__module__}.{type(model).__name__}")
    return found


def anchorize(model: nn.Module, mode: str = "full", pos_init: str = "zeros", tie_tol: Optional[float] = None,
              **options) -> nn.Module:
    """Return an anchored copy of a timm ``model`` (the input is not modified).

    ``mode``: ``"full"`` (the paper's model), ``"pos-only"`` or ``"patch-only"`` (what each means per
    family: the modules in ``equishift.archs``). ``pos_init`` (families that get a new position conv,
    ViT): ``"zeros"`` makes it the identity, ``"default"`` uses PyTorch's init (the paper's).
    ``options`` are per family (ViT: ``patch_norm``; Twins: ``patch_anchors``; Swin: ``merge``); an
    option the family does not know is a TypeError. ``tie_tol`` (every family): the near-tie tolerance of
    every anchor (None: the dtype's default, ``equishift.polyphase.TIE_TOL``; 0: the paper's plain argmax,
    what models loaded from the paper's checkpoints use). The result carries ``equishift_anchoring`` (the
    mode), ``equishift_anchor_options`` (every option, defaults included: what a card must record to
    rebuild it) and ``equishift_anchor_sites`` (where anchors went, and why)."""
    if mode not in MODES:
        raise ValueError(f"unknown anchoring mode {mode!r}; choose one of {', '.join(MODES)}")
    if anchoring_mode(model) != "none":
        raise ValueError(f"model is already anchorized (mode {anchoring_mode(model)!r})")
    adapter = _adapter(model)
    if mode not in adapter.modes:
        raise ValueError(f"{adapter.name}: anchoring mode {mode!r} does not exist for this family; choose one of "
                         f"{', '.join(adapter.modes)}" + (f" ({adapter.modes_doc[mode]})" if mode in adapter.modes_doc else ""))
    if "pos_init" in adapter.options:
        options = {"pos_init": pos_init, **options}
    resolved = adapter.check_options(options)
    if tie_tol is not None:
        from .polyphase import _checked_tol

        tie_tol = _checked_tol(tie_tol)
    out, sites = adapter.anchorize(copy.deepcopy(model), mode, **resolved)
    if tie_tol is not None:
        for m in out.modules():
            if isinstance(m, PolyphaseAnchor):
                m.tie_tol = tie_tol
    out.equishift_anchoring = mode
    out.equishift_anchor_options = {k: v for k, v in resolved.items() if k != "pos_init"}
    if tie_tol is not None:
        out.equishift_anchor_options["tie_tol"] = tie_tol
    out.equishift_anchor_sites = [s.as_dict() for s in sites]
    return out


def anchor_options(model: nn.Module) -> Dict[str, object]:
    """The family options an anchored model was built with ({} for a model that is not anchored)."""
    return dict(getattr(model, "equishift_anchor_options", {}))


def anchor_sites(model: nn.Module) -> List[Dict[str, object]]:
    """Every place an anchor may go in an anchored model: module, stride, anchored, why."""
    return [dict(s) for s in getattr(model, "equishift_anchor_sites", [])]


def anchoring_mode(model: nn.Module) -> str:
    """The anchorize mode a model was built with, or ``"none"``."""
    return getattr(model, "equishift_anchoring", "none")
