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

from . import Adapter, AnchorSite, Layer, refuse, register

PATCH_NORM_EPS = 1e-5  # the paper's patch-embedding LayerNorm (nn.LayerNorm's default), not timm's 1e-6


def anchorize(model: nn.Module, mode: str, pos_init: str = "zeros",
              patch_norm: bool = False) -> Tuple[nn.Module, List[AnchorSite]]:
    from timm.models.vision_transformer import VisionTransformer

    from ..layers import AnchoredPatchEmbed, ConvPosEmbed
    from ..layers.anchored import square as _square

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
    if hasattr(model.patch_embed, "backbone"):  # a hybrid: APS in its ResNet backbone instead
        return model, _anchorize_hybrid(model, mode, pos_conv, p)
    why = (f"the image: any shift, anchored with s = patch size {p}" if anchor else f"{mode}: no anchor")
    model.patch_embed = AnchoredPatchEmbed(model.patch_embed, anchor=anchor, pos_conv=pos_conv,
                                           why=why if anchor else "")
    return model, [AnchorSite("patch_embed", p, anchor, why)]


def _anchorize_hybrid(model: nn.Module, mode: str, pos_conv, p: int) -> List[AnchorSite]:
    """Hybrid ViT: the ResNet backbone as in ``archs.resnet`` (anchors before every strided layer,
    circular padding), the projection anchored when it is itself strided, then the ViT part."""
    from ..layers import AnchoredPatchEmbed
    from . import resnet
    from ._cnn import AnchoredModule

    embed = model.patch_embed
    _, sites = resnet.anchorize(embed.backbone, mode)
    sites = [AnchorSite(f"patch_embed.backbone.{s.module}", s.stride, s.anchored, s.why) for s in sites]
    if p > 1:
        why = f"projection of the backbone's features: a conv of stride {p}"
        anchored = mode in ("full", "patch-only")
        sites.append(AnchorSite("patch_embed.proj", p, anchored, why))
        if anchored:
            embed.proj = AnchoredModule(embed.proj, p, why=why)
    model.patch_embed = AnchoredPatchEmbed(embed, anchor=False, pos_conv=pos_conv)
    return sites


def _resnet_backbone(embed: nn.Module) -> bool:
    """A hybrid embedding whose backbone is (a feature wrapper around) a timm ResNet: APS applies."""
    backbone = getattr(embed, "backbone", None)
    names = {n for n, _ in backbone.named_children()} if backbone is not None else set()
    return {"conv1", "maxpool", "layer1"} <= names and \
        not any(n.endswith(".aa") and not isinstance(m, nn.Identity) for n, m in backbone.named_modules())


def unsupported(model: nn.Module):
    """Hybrid ViTs whose CNN backbone is not a timm ResNet (ResNetV2 stems with 'same' padding, ...)."""
    embed = model.patch_embed
    if hasattr(embed, "backbone") and not _resnet_backbone(embed):
        return (f"module 'patch_embed' ({type(embed).__name__}) embeds patches with a CNN backbone "
                f"({type(embed.backbone).__name__}) that is not a timm ResNet: anchoring its strided layers "
                f"is not implemented (hybrids with a ResNet/ResNet-D backbone are supported)")
    return None


def _relpos_reason(model: nn.Module) -> str:
    where = next((n for n, _ in model.named_modules() if n.endswith("rel_pos")), "rel_pos")
    return (f"its attention adds a relative position bias indexed by the offset between two tokens on the "
            f"grid (module '{where}'); a circular shift moves tokens across the grid edge, which "
            "changes their offsets (k becomes k - N), so the attention is not circularly equivariant, and "
            "circular relative positions are not implemented")


def _eva_reason(model: nn.Module) -> str:
    if getattr(model, "rope", None) is not None:
        return (f"module 'rope' ({type(model.rope).__name__}) rotates queries and keys by angles proportional "
                f"to grid coordinates; across the grid edge a circular shift changes an offset k into k - N, "
                f"and the rotation by N steps is not the identity, so the attention is not circularly "
                f"equivariant (Eva-based models: RoPE ViTs, DINOv3, Perception Encoder)")
    return ("Eva-based models (RoPE ViTs, DINOv3, Perception Encoder) are not supported: anchoring them is "
            "not implemented")


refuse("timm.models.vision_transformer_relpos.VisionTransformerRelPos", _relpos_reason)
refuse("timm.models.eva.Eva", _eva_reason)

def layers(model: nn.Module) -> List[Layer]:
    """Every block: patch tokens after ``num_prefix_tokens`` CLS/register tokens, on the patch embedding's
    grid (a hybrid's is its backbone's); the attention row of the CLS token, or what each patch receives."""
    embed = model.patch_embed
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    kind = "cls" if getattr(model, "cls_token", None) is not None else "received"

    def grid(args, hw):
        return embed.dynamic_feat_size(tuple(hw))

    return [Layer(f"blocks.{i}", b, "tokens", prefix=prefix, grid=grid, attention=b.attn.attn_drop, kind=kind)
            for i, b in enumerate(model.blocks)]


def config(m: nn.Module):
    """Constructor kwargs of a timm VisionTransformer, read back from its modules."""
    b = m.blocks[0]
    pe = m.patch_embed
    cfg = dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
               num_classes=m.num_classes, global_pool=m.global_pool, embed_dim=m.embed_dim, depth=len(m.blocks),
               num_heads=b.attn.num_heads, mlp_ratio=b.mlp.fc1.out_features / m.embed_dim,
               qkv_bias=b.attn.qkv.bias is not None, qk_norm=not isinstance(b.attn.q_norm, nn.Identity),
               class_token=m.cls_token is not None, reg_tokens=m.num_reg_tokens, no_embed_class=m.no_embed_class,
               pos_embed="none" if m.pos_embed is None else "learn",
               pre_norm=not isinstance(m.norm_pre, nn.Identity), fc_norm=not isinstance(m.fc_norm, nn.Identity),
               dynamic_img_size=m.dynamic_img_size, patch_bias=pe.proj.bias is not None)
    if not isinstance(b.ls1, nn.Identity):
        cfg["init_values"] = 1e-5  # only the presence of LayerScale matters: the weights are loaded next
    return cfg


ADAPTER = register(Adapter(
    name="vit", classes=("timm.models.vision_transformer.VisionTransformer",),
    modes=("full", "pos-only", "patch-only"), anchorize=anchorize,
    options={"pos_init": "zeros", "patch_norm": False}, unsupported=unsupported, layers=layers, config=config))
