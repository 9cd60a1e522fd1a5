"""One adapter per architecture family: how to anchorize it and which options it takes.

The registry maps a timm class to its adapter; ``equishift.anchoring.anchorize`` asks it instead of
testing classes itself. Adding a family = one file here that calls ``register`` + its tests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

__all__ = ["Adapter", "AnchorSite", "Layer", "register", "refuse", "refusal_for", "adapter_for", "adapters",
           "layers_of", "config_of", "patch_embedding", "patch_conv"]

import torch

LAYOUTS = ("tokens", "nhwc", "nchw")
# How a layer's attention map is reduced to one [heads, h, w] picture (equishift.sweep):
#   cls       ViT: the CLS token's row over the patch tokens
#   received  ViT without CLS: the attention each patch token receives, averaged over patch queries
#   window    local windows (Twins LSA, Swin): per window what each key receives, windows put back in place
#   query     global or sub-sampled keys (Twins GSA, PVT-v2 spatial reduction): one query token's row
ATTENTION_KINDS = ("cls", "received", "window", "query")


@dataclass
class AnchorSite:
    """One place where an anchor may go, whether it went there, and why: what a card and a repr show."""

    module: str        # the module the anchor precedes, e.g. "patch_embeds.1"
    stride: int        # the anchor's period s (pixels or tokens of the map it sees)
    anchored: bool
    why: str

    def as_dict(self) -> Dict[str, Any]:
        return {"module": self.module, "stride": self.stride, "anchored": self.anchored, "why": self.why}


@dataclass(frozen=True)
class Layer:
    """A layer whose output equishift looks inside (per-layer equivariance error, GradCAM taps, attention).

    ``module`` is the layer of the model it was read from; ``attention`` the module whose output is the
    layer's softmax map (timm's ``attn_drop``), or None for layers without attention (CNN stages)."""

    name: str
    module: nn.Module
    layout: str                                   # "tokens" (B, N, C), "nhwc" (B, H, W, C), "nchw"
    prefix: int = 0                               # tokens: leading tokens off the grid (CLS, registers)
    grid: Optional[Callable[[tuple, Tuple[int, int]], Tuple[int, int]]] = None  # tokens: (args, image hw) -> (h, w)
    attention: Optional[nn.Module] = None
    kind: Optional[str] = None                    # one of ATTENTION_KINDS
    window: Tuple[int, int] = (0, 0)              # kind "window": window (rows, cols) in tokens
    shift: Tuple[int, int] = (0, 0)               # kind "window": cyclic shift of the windows (Swin SW-MSA)
    sr: int = 1                                   # kind "query": key sub-sampling ratio

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.kind is not None and self.kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if self.layout == "tokens" and self.grid is None:
            raise ValueError("a token layer needs grid(args, image_hw)")

    def size(self, args: tuple, out: Optional[torch.Tensor], image_hw: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) of the layer's map: from its inputs (tokens) or from its output (maps)."""
        if self.layout == "tokens":
            return tuple(int(v) for v in self.grid(args, image_hw))
        if out is None:  # a map layer before it ran: its input grid
            x = args[0]
            return (x.shape[1], x.shape[2]) if self.layout == "nhwc" else (x.shape[-2], x.shape[-1])
        return (out.shape[1], out.shape[2]) if self.layout == "nhwc" else (out.shape[-2], out.shape[-1])

    def as_map(self, out: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The output as a (B, C, h, w) view (no copy)."""
        if self.layout == "nchw":
            return out
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        return out[:, self.prefix:].transpose(1, 2).unflatten(2, tuple(size))

    def from_map(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Put a (B, C, h, w) map back into the layout of ``out`` (prefix tokens taken from ``out``)."""
        if self.layout == "nchw":
            return g
        if self.layout == "nhwc":
            return g.permute(0, 2, 3, 1)
        return torch.cat((out[:, :self.prefix], g.flatten(2).transpose(1, 2)), dim=1)


@dataclass(frozen=True)
class Adapter:
    """What equishift knows about one family.

    ``anchorize(model, mode, **options)`` mutates a (deep-copied) model in place and returns it with the
    list of anchor sites; ``options`` maps each option name to its default (anything else is refused)."""

    name: str
    classes: Tuple[str, ...]                      # "timm.models.twins.Twins", ...
    modes: Tuple[str, ...]
    anchorize: Callable[..., Tuple[nn.Module, List[AnchorSite]]]
    options: Mapping[str, Any] = field(default_factory=dict)
    modes_doc: Mapping[str, str] = field(default_factory=dict)
    # Variants of a registered class that cannot be made invariant: model -> reason, or None if fine.
    unsupported: Optional[Callable[[nn.Module], Optional[str]]] = None
    # The layers equishift looks inside, in forward order (sweep, attribution): model -> [Layer].
    layers: Optional[Callable[[nn.Module], List[Layer]]] = None
    # Constructor kwargs that rebuild an un-anchored model of this family (training cards): model -> dict.
    config: Optional[Callable[[nn.Module], Dict[str, Any]]] = None

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise TypeError(f"{self.name}: unknown anchorize option(s) {', '.join(unknown)}; "
                            f"options for {self.name}: {known}")
        return {**self.options, **options}


_REGISTRY: Dict[str, Adapter] = {}
_REFUSED: Dict[str, Callable[[nn.Module], str]] = {}
_FAMILIES = ("vit", "twins", "swin", "resnet", "convnext", "pvt_v2")  # modules of this package that register adapters


def register(adapter: Adapter) -> Adapter:
    for cls in adapter.classes:
        _REGISTRY[cls] = adapter
    return adapter


def refuse(class_path: str, reason: Callable[[nn.Module], str]) -> None:
    """Record a timm class that anchorize refuses up front, and why (a TypeError with ``reason(model)``)."""
    _REFUSED[class_path] = reason


def refusal_for(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot be anchorized, when a family module says so; None otherwise."""
    _load_all()
    for cls in type(model).__mro__:
        reason = _REFUSED.get(f"{cls.__module__}.{cls.__qualname__}")
        if reason is not None:
            return reason(model)
    found = adapter_for(model)
    if found is not None and found.unsupported is not None:
        return found.unsupported(model)
    return None


def _load_all() -> None:
    for fam in _FAMILIES:
        importlib.import_module(f"{__name__}.{fam}")


def adapters() -> List[Adapter]:
    """Every registered adapter, once each."""
    _load_all()
    return list({id(a): a for a in _REGISTRY.values()}.values())


def adapter_for(model: nn.Module) -> Optional[Adapter]:
    """The adapter of ``model``'s class or of its nearest registered base class (None if there is none)."""
    _load_all()
    for cls in type(model).__mro__:
        found = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def layers_of(model: nn.Module) -> List[Layer]:
    """The layers of ``model`` its family's adapter exposes (empty for a model no adapter knows)."""
    found = adapter_for(model)
    return found.layers(model) if found is not None and found.layers is not None else []


def config_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """Constructor kwargs that rebuild ``model``, when its family can read them back; None otherwise."""
    found = adapter_for(model)
    return found.config(model) if found is not None and found.config is not None else None


def patch_embedding(model: nn.Module) -> Optional[nn.Module]:
    """The model's first patch embedding (``patch_embed``, or Twins' ``patch_embeds[0]``), if it has one."""
    embed = getattr(model, "patch_embed", None)
    if embed is None and isinstance(getattr(model, "patch_embeds", None), nn.ModuleList):
        embed = model.patch_embeds[0]
    return embed if isinstance(embed, nn.Module) else None


def patch_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    """The conv of the first patch embedding (inside any anchored wrapper; a hybrid's projection), if any."""
    proj = getattr(patch_embedding(model), "proj", None)
    if not isinstance(proj, nn.Module):
        return None
    return next((m for m in proj.modules() if isinstance(m, nn.Conv2d)), None)
