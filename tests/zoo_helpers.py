"""Tiny zoo models written to a temporary folder (card + safetensors), for the zoo and evaluation tests.

They follow the card contract of equishift.training (the shipped models may still be training)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict

import torch

from equishift.checkpoint import save_weights
from equishift.data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD

TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
TINY_TWINS = dict(img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2),
                  depths=(2, 1), wss=(4, 2), sr_ratios=(2, 1), num_classes=10)


def write_tiny(root: Path, name: str, timm_class: str = "VisionTransformer", anchoring: str = "none",
               arch_config: Dict[str, Any] = None, seed: int = 0, metrics: Dict[str, Any] = None) -> Path:
    """Build a randomly initialised model, save NAME.safetensors and NAME.json in ``root``; returns the card
    path. The head is scaled up so that random logits are well separated (fewer near-ties in argmax)."""
    import timm.models

    from equishift import anchorize

    cfg = dict(arch_config or (TINY_VIT if timm_class == "VisionTransformer" else TINY_TWINS))
    torch.manual_seed(seed)
    model = getattr(timm.models, timm_class)(**cfg)
    with torch.no_grad():
        model.head.weight.mul_(20)
    if anchoring != "none":
        model = anchorize(model, anchoring, pos_init="default")
    root.mkdir(parents=True, exist_ok=True)
    weights = root / f"{name}.safetensors"
    save_weights(model, weights)
    card = {
        "name": name, "arch": "vit" if timm_class == "VisionTransformer" else "twins", "timm_class": timm_class,
        "arch_config": cfg, "anchoring": anchoring, "classes": list(FMNIST_CLASSES), "input_size": [3, 32, 32],
        "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD), "pad": 2, "dataset": "fashion-mnist",
        "untrained": True, "training": {}, "metrics": metrics or {},
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(card))
    return path
