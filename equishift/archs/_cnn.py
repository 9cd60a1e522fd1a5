"""What the CNN families share (APS, Chaman & Dokmanić 2021, in equishift's terms): an anchor before every
strided layer, each with s = its stride, and circular padding in every convolution and pooling. Then every
layer between two anchors is equivariant to circular shifts, and a global pooling at the end makes the
network invariant."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..layers import AnchoredModule, CircularConv2d, CircularMaxPool2d  # noqa: F401 (re-exported)
from . import AnchorSite


def _int(v) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise TypeError(f"anchoring needs square strides and kernels, got {tuple(v)}")
        return int(v[0])
    return int(v)


def stride_of(module: nn.Module) -> int:
    """The stride of a conv/pool layer (1 for anything else)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, CircularMaxPool2d)):
        return _int(module.stride)
    return 1


def total_stride(module: nn.Module) -> int:
    """Product of the strides of every conv/pool inside ``module``."""
    out = 1
    for m in module.modules():
        out *= stride_of(m)
    return out


def make_circular(root: nn.Module) -> int:
    """Every zero-padded conv and max pooling in ``root`` pads circularly instead (same weights); average
    pooling with padding cannot be made exact and is refused. Returns how many layers changed."""
    changed = 0
    for name, m in list(root.named_modules()):
        if not name:
            continue
        if isinstance(m, nn.Conv2d) and not isinstance(m, CircularConv2d) and any(_pads(m.padding)):
            if m.padding_mode != "zeros" and m.padding_mode != "circular":
                raise TypeError(f"module '{name}' pads with {m.padding_mode!r}")
            root.set_submodule(name, CircularConv2d.from_conv(m))
            changed += 1
        elif isinstance(m, nn.MaxPool2d) and any(_pads(m.padding)):
            root.set_submodule(name, CircularMaxPool2d(m))
            changed += 1
        elif isinstance(m, nn.AvgPool2d) and any(_pads(m.padding)):
            raise TypeError(f"module '{name}': average pooling with zero padding cannot be made circular here")
    return changed


def _pads(p) -> Tuple[int, ...]:
    if isinstance(p, str):
        raise TypeError(f"string padding {p!r} is not supported")
    return tuple(p) if isinstance(p, (tuple, list)) else (p,)


def anchor_chain(chain: nn.Module, prefix: str, anchored: bool, why: str) -> List[AnchorSite]:
    """A plain chain of layers (``nn.Sequential``, no branches, or one strided layer): an anchor before
    each strided layer, s = its stride."""
    if not isinstance(chain, nn.Sequential):
        chain_items = [("", chain)]
    else:
        chain_items = [(str(i), m) for i, m in enumerate(chain)]
    sites = []
    for key, m in chain_items:
        s = stride_of(m)
        if s <= 1:
            if total_stride(m) > 1:
                raise TypeError(f"module '{prefix}.{key}' ({type(m).__name__}) has strided layers inside; "
                                f"anchoring it is not implemented")
            continue
        name = f"{prefix}.{key}" if key else prefix
        if anchored:
            wrapped = AnchoredModule(m, s, why=why)
            if key:
                chain[int(key)] = wrapped
            else:
                raise TypeError("anchor_chain wraps layers of a Sequential; wrap a single layer where it lives")
        sites.append(AnchorSite(name, s, anchored, why if anchored else "no anchors in this mode"))
    return sites


def modes(mode: str) -> Tuple[bool, bool]:
    """(anchors, circular padding) for a CNN mode: full = both, patch-only = anchors, pos-only = padding."""
    return mode in ("full", "patch-only"), mode in ("full", "pos-only")


MODES_DOC = {"pos-only": "CNNs: circular padding only", "patch-only": "CNNs: anchors only"}


def first_param(model: nn.Module) -> Optional[torch.Tensor]:
    return next(model.parameters(), None)
