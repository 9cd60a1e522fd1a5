"""Twins (timm ``Twins``: PCPVT = global sub-sampled attention only, SVT = local/global alternating).

full        the paper's PolyTwins: an anchor before the first patch embedding (s = patch size), before
            every locally-grouped attention block (s = window size) and every sub-sampled global
            attention block (s = sr ratio); every position-generating conv (PEG) pads circularly. A
            later patch embedding (stride 2) gets an anchor only where the stage before it does not
            hand over a map shifted by a multiple of 2 (its last anchored block has an odd period, or it
            has none) — never on the paper's released layouts. ``patch_anchors`` forces a choice:
            "auto" (default), "first" (the paper's set, even where it is not invariant) or "all".
pos-only    only the circular PEGs.
patch-only  anchors before every patch embedding; attention blocks and PEGs untouched.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from . import Adapter, AnchorSite, Layer, register

PATCH_ANCHORS = ("auto", "first", "all")


def block_stride(block: nn.Module) -> int:
    """The period a Twins block's attention is tied to: window size (LSA) or sr ratio (GSA); 1 = none."""
    attn = block.attn
    if hasattr(attn, "ws"):
        return int(attn.ws)
    if getattr(attn, "sr", None) is not None:
        return int(attn.sr_ratio)
    return 1


def _stride_of(embed: nn.Module) -> int:
    from ..layers.anchored import square as _square

    return _square(embed.patch_size)


def plan(model: nn.Module, mode: str, patch_anchors: str = "auto") -> List[AnchorSite]:
    """Where the anchors of ``anchorize(model, mode, patch_anchors=...)`` go, with the reason for each.

    Tracks the period ``g`` that a shift of the input is guaranteed to be a multiple of at each point
    (in units of the current map's pixels): an anchor of period s leaves a multiple of s (of g, if g is
    already one); a stride-p embedding divides it by p; every other layer keeps it (circular PEGs,
    global attention without sub-sampling, MLPs)."""
    if patch_anchors not in PATCH_ANCHORS:
        raise ValueError(f"patch_anchors must be one of {', '.join(PATCH_ANCHORS)}, got {patch_anchors!r}")
    sites: List[AnchorSite] = []
    blocks_anchored = mode == "full"
    g = 1  # the input image: any integer shift
    for k, embed in enumerate(model.patch_embeds):
        p = _stride_of(embed)
        name = f"patch_embeds.{k}"
        if mode == "pos-only":
            anchored, why = False, "pos-only: no anchors"
        elif k == 0:
            anchored, why = True, f"the image: any shift, anchored with s = patch size {p}"
        elif mode == "patch-only":
            anchored, why = True, "patch-only: no block anchors to rely on, so every embedding is anchored"
        elif patch_anchors == "all":
            anchored, why = True, "forced (patch_anchors='all')"
        elif patch_anchors == "first":
            anchored = False
            why = ("forced off (patch_anchors='first', the paper's set)"
                   + ("" if g % p == 0 else f"; NOT invariant here: shifts arrive in multiples of {g}, not of {p}"))
        elif g % p == 0:
            anchored, why = False, f"stage {k - 1} hands over shifts in multiples of {g}, which stride {p} keeps"
        else:
            anchored = True
            why = (f"stage {k - 1} hands over shifts in multiples of {g} only, not of stride {p}: an anchor is "
                   f"needed for invariance")
        sites.append(AnchorSite(name, p, anchored, why))
        g = 1 if anchored else max(1, g // p) if g % p == 0 else 1
        for j, block in enumerate(model.blocks[k]):
            s = block_stride(block)
            if s <= 1:
                continue
            bname = f"blocks.{k}.{j}"
            kind = "window size" if hasattr(block.attn, "ws") else "sr ratio"
            if blocks_anchored:
                sites.append(AnchorSite(bname, s, True, f"attention tied to a period of {s} ({kind})"))
                g = g if g % s == 0 else s
            else:
                sites.append(AnchorSite(bname, s, False, f"{mode}: blocks are not anchored"))
    return sites


def anchorize(model: nn.Module, mode: str, patch_anchors: str = "auto") -> Tuple[nn.Module, List[AnchorSite]]:
    from ..layers import AnchoredBlock, AnchoredPatchEmbed, CircularConv2d

    sites = plan(model, mode, patch_anchors)
    by_name = {s.module: s for s in sites}
    for k, embed in enumerate(model.patch_embeds):
        site = by_name[f"patch_embeds.{k}"]
        if site.anchored:
            model.patch_embeds[k] = AnchoredPatchEmbed(embed, anchor=True, why=site.why)
    for k, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            site = by_name.get(f"blocks.{k}.{j}")
            if site is not None and site.anchored:
                stage[j] = AnchoredBlock(block, site.stride, why=site.why)
    if mode in ("full", "pos-only"):
        for peg in model.pos_block:
            for name, m in list(peg.named_modules()):
                if isinstance(m, nn.Conv2d):
                    peg.set_submodule(name, CircularConv2d.from_conv(m))  # same weights, circular padding
    return model, sites


def layers(model: nn.Module) -> List[Layer]:
    """Every block (tokens, grid passed as ``size``): LSA blocks show their windows, GSA blocks one query's
    row over the sub-sampled keys."""
    out = []
    for k, stage in enumerate(model.blocks):
        for j, b in enumerate(stage):
            attn = b.attn
            if hasattr(attn, "ws"):
                extra = dict(kind="window", window=(int(attn.ws), int(attn.ws)))
            else:
                extra = dict(kind="query", sr=int(attn.sr_ratio) if getattr(attn, "sr", None) is not None else 1)
            out.append(Layer(f"blocks.{k}.{j}", b, "tokens", grid=lambda args, hw: args[1],
                             attention=attn.attn_drop, **extra))
    return out


def config(m: nn.Module):
    """Constructor kwargs of a timm Twins, read back from its modules."""
    stages = [list(stage) for stage in m.blocks]
    wss = [int(st[0].attn.ws) if hasattr(st[0].attn, "ws") else 1 for st in stages]
    srs = [next((int(b.attn.sr_ratio) for b in st if hasattr(b.attn, "sr_ratio")), 1) for st in stages]
    pe = m.patch_embeds[0]
    return dict(img_size=list(pe.img_size), patch_size=int(pe.patch_size[0]), in_chans=m.in_chans,
                num_classes=m.num_classes, global_pool=m.global_pool, embed_dims=list(m.embed_dims),
                num_heads=[st[0].attn.num_heads for st in stages],
                mlp_ratios=[st[0].mlp.fc1.out_features / d for st, d in zip(stages, m.embed_dims)],
                depths=list(m.depths), sr_ratios=srs, wss=None if all(w == 1 for w in wss) else wss)


ADAPTER = register(Adapter(
    name="twins", classes=("timm.models.twins.Twins",), modes=("full", "pos-only", "patch-only"),
    anchorize=anchorize, options={"patch_anchors": "auto"}, layers=layers, config=config))
