"""One adapter per architecture family: how to anchorize it and which options it takes.

The registry maps a timm class to its adapter; ``equishift.anchoring.anchorize`` asks it instead of
testing classes itself. Adding a family = one file here that calls ``register`` + its tests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

__all__ = ["Adapter", "AnchorSite", "register", "refuse", "refusal_for", "adapter_for", "adapters"]


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
