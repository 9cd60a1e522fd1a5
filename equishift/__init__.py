"""equishift: where and why vision transformers break under shifts, and adaptive polyphase anchoring.

Public entry points are imported lazily so that ``import equishift`` stays fast and a missing optional
piece (e.g. the plotting stack) does not break the core.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "anchorize": "equishift.anchoring",
    "anchoring_mode": "equishift.anchoring",
    "record_anchors": "equishift.polyphase",
    "select_anchor": "equishift.polyphase",
    "polyphase_margin": "equishift.polyphase",
    "anchor": "equishift.polyphase",
    "load_model": "equishift.zoo",
    "list_models": "equishift.zoo",
    "LoadedModel": "equishift.zoo",
    "sweep": "equishift.sweep",
    "SweepResult": "equishift.sweep",
}
_SUBMODULES = {"polyphase", "anchoring", "shifts", "testing", "zoo", "data", "training", "evaluation",
               "sweep", "paper", "archs", "metrics", "attribution", "plots", "report", "images", "cli", "device", "formatting",
               "caveats"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"equishift.{name}")
    raise AttributeError(f"module 'equishift' has no attribute {name!r}")
