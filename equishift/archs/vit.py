"""ViT / DeiT (timm ``VisionTransformer``, distilled DeiT included).

full        the paper's PolyViT: anchor the image with s = patch size before the patch conv; the absolute
            position embedding is replaced by a depth-wise 3x3 conv with circular padding and a residual
            on the patch-token grid (the CLS/register tokens get no position term).
pos-only    only the circular conv position encoding (no anchor).
patch-only  only the anchor before the patch conv (the absolute position embedding stays).

Options: ``patch_norm`` (False) adds the paper's LayerNorm (eps 1e-5) after the patch conv, as in PolyViT
checkpoints; ``pos_init`` ("zeros") starts the new position conv at zero, so that with its residual it is
the identity and an anchorized pretrained model starts close to the original; "default" is PyTorch's
init, which is what the paper trains from.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from . import Adapter, AnchorSite, register

PATCH_NORM_EPS = 1e-5  # the paper's patch-embedding LayerNorm (nn.LayerNorm's default), not timm's 1e-6


def anchorize(model: nn.Module, mode: str, pos_init: str = "zeros",
              patch_norm: bool = False) -> Tuple[nn.Module, List[AnchorSite]]:
    from timm.models.vision_transformer import VisionTransformer

    from ..anchoring import AnchoredPatchEmbed, ConvPosEmbed, _square

    if not isinstance(patch_norm, bool):
        raise TypeError(f"patch_norm must be True or False, got {patch_norm!r}")
    ref = next(model.parameters())
    if patch_norm:
        if not isinstance(model.patch_embed.norm, nn.Identity):
            raise ValueError("patch_norm=True: this model's patch embedding already has a norm "
                             f"({type(model.patch_embed.norm).__name__})")
        model.patch_embed.norm = nn.LayerNorm(model.embed_dim, eps=PATCH_NORM_EPS, device=ref.device,
                                              dtype=ref.dtype)
    anchor = mode in ("full", "patch-only")
    pos_conv = None
    if mode in ("full", "pos-only"):
        pos_conv = ConvPosEmbed(model.embed_dim, init=pos_init)
        pos_conv.to(device=ref.device, dtype=ref.dtype)
        # timm's VisionTransformer skips the absolute embedding when it is None; subclasses that always
        # add it (distilled DeiT) get a frozen zero buffer of the same shape instead.
        if type(model)._pos_embed is VisionTransformer._pos_embed:
            model.pos_embed = None
        else:
            zeros = torch.zeros_like(model.pos_embed.data)
            del model.pos_embed
            model.register_buffer("pos_embed", zeros, persistent=False)
    p = _square(model.patch_embed.patch_size)
    why = (f"the image: any shift, anchored with s = patch size {p}" if anchor else f"{mode}: no anchor")
    model.patch_embed = AnchoredPatchEmbed(model.patch_embed, anchor=anchor, pos_conv=pos_conv,
                                           why=why if anchor else "")
    return model, [AnchorSite("patch_embed", p, anchor, why)]


ADAPTER = register(Adapter(
    name="vit", classes=("timm.models.vision_transformer.VisionTransformer",),
    modes=("full", "pos-only", "patch-only"), anchorize=anchorize,
    options={"pos_init": "zeros", "patch_norm": False}))
