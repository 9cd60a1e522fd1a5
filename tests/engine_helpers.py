"""Tiny random-weight models shared by the engine tests (sweep, metrics, attribution, plots, report)."""
from __future__ import annotations

import torch

from equishift import anchorize

VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
TWINS = dict(img_size=32, patch_size=4, embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2),
             depths=(2, 2), wss=(4, 2), sr_ratios=(2, 1), num_classes=10)


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    # A larger head separates random logits, so top-1 flips are caused by the shift, not by near-ties.
    # LayerNorms get random affine parameters, as trained ones have: with the default γ = 1, β = 0 every
    # token after a LayerNorm has norm exactly sqrt(C), so the polyphase components right after Twins'
    # patch-embedding norm tie exactly and the anchor is decided by rounding noise.
    with torch.no_grad():
        model.head.weight.mul_(20)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def vit(seed: int = 0, **overrides) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return _sharpen(VisionTransformer(**{**VIT, **overrides})).eval()


def twins(seed: int = 0, **overrides) -> torch.nn.Module:
    from timm.models.twins import Twins

    torch.manual_seed(seed)
    return _sharpen(Twins(**{**TWINS, **overrides})).eval()


def anchored(model: torch.nn.Module, mode: str = "full", seed: int = 1) -> torch.nn.Module:
    """Anchored copy with a random (non-identity) position conv, so the test sees it working."""
    torch.manual_seed(seed)
    return anchorize(model, mode, pos_init="default").eval()


def image(seed: int = 0, size: int = 32, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, size, size, generator=g)
