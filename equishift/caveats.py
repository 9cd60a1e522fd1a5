"""Caveats: when the numbers of a sweep cannot mean what they seem.

A page that shows "100% consistency, no flip" for a network whose output does not depend on its input,
or "Bag 85%" for a colour photo fed to a Fashion-MNIST model, is telling the truth about the arithmetic
and lying about the model. These checks say so, each as a ``Caveat`` (kind, message, optional fix):

- ``for_sweep(result)``: the predicted distribution is almost flat at every swept shift (``flat-output``);
- ``for_model(loaded)``: the card says the weights are random (``random-weights``) or that anchoring layers
  were added untrained (``untrained-anchoring``);
- ``for_input(loaded, x=..., image=...)``: a colour image on a model that sees grey (``colour``), an inverted
  (light) background that inverting fixes (``inverted``, fix ``"invert"``), other statistics outside the
  range of the card's training data (``out-of-distribution``), or for ImageNet-style timm models a
  normalised input whose mean/std are far from the data's 0/1 (``out-of-distribution``).

Each call costs well under 5 ms on the shipped models (a few numpy reductions on a small image). Only
the card is read for what a model is: a model is "untrained" because its card says so, never by a guess
from its weights. Nothing here imports streamlit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .formatting import fmt

__all__ = ["Caveat", "for_sweep", "for_model", "for_input", "for_side", "data_stats", "grey_input", "recipe",
           "FLAT_ENTROPY", "COLOUR_SPREAD", "COLOURED_FRACTION", "TIMM_MEAN_FAR", "TIMM_FLAT_STD"]

# A softmax whose entropy is at least this fraction of log(C) at EVERY swept shift is nearly uniform: with
# 10 classes its top-1 is below ~20% everywhere. Random-weight timm ViTs give 0.976-0.994 on the sample
# images (logits with a spread of ~0.3 around 0); the trained zoo models (and an anchorized one) stay
# below 0.89 on every sample image, photos and inverted images included. Ranking a flat output is ranking
# noise, so its consistency and flips say nothing about the architecture.
FLAT_ENTROPY = 0.95
# A pixel is coloured when its channels differ by more than this (in [0, 1]; ~25/255, a difference the
# eye sees as colour; a grey image saved as RGB JPEG keeps 0), and an image is a colour image when more
# than COLOURED_FRACTION of its pixels are: a few coloured specks on a grey picture do not count. (The
# sample photos: 1.5% (Hubble deep field) to 95% of their pixels.)
COLOUR_SPREAD = 0.1
COLOURED_FRACTION = 0.01
# Colour is measured on a copy at most this large: enough to count coloured pixels, and cheap.
COLOUR_PX = 64
# A timm model's normalisation maps its data's average pixel to 0 (ImageNet statistics: per channel mean
# 0, std 1; black at about -2, white at about +2.4). A normalised input whose mean lies more than
# TIMM_MEAN_FAR of the way from 0 to the value of pure black (or white) is mostly black (white); one whose
# pixels vary by less than TIMM_FLAT_STD (in [0, 1], ~13/255) is nearly flat. Natural photos are neither.
TIMM_MEAN_FAR = 0.75
TIMM_FLAT_STD = 0.05


@dataclass(frozen=True)
class Caveat:
    """Why a number on the page may not mean what it seems. ``fix``: a one-click remedy the page offers
    (``"invert"``: invert the image), or None."""

    kind: str
    message: str
    fix: Optional[str] = None


# --- the sweep -------------------------------------------------------------------------------------
def for_sweep(result) -> List[Caveat]:
    """``flat-output`` when the predicted distribution is nearly uniform at every swept shift (and at the
    reference): the argmax of a flat output is noise, so its consistency and flips mean nothing."""
    logits = result.logits
    if logits is None or logits.numel() == 0:
        return []
    rows = logits.detach().float().cpu()
    if result.ref_logits is not None:
        rows = torch.cat([rows, result.ref_logits.detach().float().cpu().view(1, -1)])
    c = rows.shape[1]
    if c < 2 or not bool(torch.isfinite(rows).all()):
        return []
    logp = rows.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(c)
    if float(entropy.min()) < FLAT_ENTROPY:
        return []
    top = float(logp.max().exp())
    return [Caveat("flat-output",
                   f"The output is almost flat: at every swept shift the top-1 probability is at most "
                   f"{fmt(100 * top, '.1f')}% over {c} classes (chance: {fmt(100 / c, '.1f')}%). The model's "
                   f"output barely depends on the input, so its consistency and flip numbers are meaningless: "
                   f"they rank noise.")]


# --- the model -------------------------------------------------------------------------------------
def for_model(loaded) -> List[Caveat]:
    """What the card says about the weights: random (``random-weights``), or trained weights with anchoring
    layers added untrained on the fly (``untrained-anchoring``)."""
    card = loaded.card
    if not card.get("untrained"):
        return []
    # An anchored card says untrained=True for its new layers (anchoring_untrained); the weights under them
    # are random when the base card said so (base_untrained) or they were drawn from a seed (weights="random").
    base_random = (not card.get("anchoring_untrained") or card.get("weights") == "random"
                   or bool(card.get("base_untrained")))
    if base_random:
        seed = card.get("seed")
        drawn = f" (drawn from seed {seed})" if seed is not None else ""
        return [Caveat("random-weights",
                       f"Random weights{drawn}: the card says this model was never trained. Its predictions "
                       f"are those of an initialised network, so consistency, flips and probability drops "
                       f"describe the initialisation, not what training would learn.")]
    return [Caveat("untrained-anchoring",
                   "The anchoring layers were added on the fly and are untrained (the new position-encoding "
                   "convs start as the identity): the numbers show the anchored architecture with the base "
                   "model's weights, not a model trained with anchoring; its accuracy may be lower.")]


# --- the input -------------------------------------------------------------------------------------
def data_stats(card: Dict[str, Any]) -> Optional[Dict[str, Dict[str, float]]]:
    """Per-image statistics of the card's training data: the card's own ``data_stats``, else the known
    statistics of its ``dataset`` (Fashion-MNIST: equishift.data.FMNIST_STATS); None when unknown."""
    if isinstance(card.get("data_stats"), dict):
        return card["data_stats"]
    if card.get("dataset") == "fashion-mnist":
        from .data import FMNIST_STATS

        return FMNIST_STATS
    return None


def grey_input(card: Dict[str, Any]) -> bool:
    """Whether the model sees a grey image (one channel, or Fashion-MNIST's grey replicated to 3)."""
    return int(card["input_size"][0]) == 1 or card.get("dataset") == "fashion-mnist"


def _colour_fraction(image) -> float:
    """Fraction of coloured pixels of a PIL image (see COLOUR_SPREAD), on a copy at most COLOUR_PX large."""
    img = image.convert("RGB")
    if max(img.size) > COLOUR_PX:
        img = img.copy()
        img.thumbnail((COLOUR_PX, COLOUR_PX))
    a = np.asarray(img, dtype=np.int16)
    spread = (a.max(-1) - a.min(-1)) / 255.0
    return float((spread > COLOUR_SPREAD).mean())


def _pixels(loaded, x: torch.Tensor) -> np.ndarray:
    """The model input [1, C, H, W] (or [C, H, W]) as grey pixels in [0, 1], padding cut off: [h, w]."""
    x = x[0] if x.dim() == 4 else x
    img = loaded.denormalize(x.detach().float().cpu()).mean(0)
    pad = int(loaded.card.get("pad", 0) or 0)
    if pad and min(img.shape) > 2 * pad:
        img = img[pad:-pad, pad:-pad]
    return img.numpy()


_DATASETS = {"fashion-mnist": "Fashion-MNIST", "imagenet-1k": "ImageNet-1k"}  # card id -> name in messages
_WHAT = {"border_mean": ("its border averages {v}", "training images: {lo}–{hi}"),
         "dark_fraction": ("{v} of its pixels are dark background", "training images: {lo}–{hi}"),
         "mean": ("its mean brightness is {v}", "training images: {lo}–{hi}")}
_PERCENT = {"dark_fraction"}


def _outside(stats: Dict[str, Dict[str, float]], values: Dict[str, float]) -> List[str]:
    """The statistics outside their training range [min, max], described."""
    out = []
    for name, (what, rng) in _WHAT.items():
        r = stats.get(name)
        if not r or name not in values:
            continue
        v = values[name]
        if r["min"] <= v <= r["max"]:
            continue
        f = (lambda t: f"{fmt(100 * t, '.0f')}%") if name in _PERCENT else (lambda t: fmt(t, ".2f"))
        out.append(f"{what.format(v=f(v))} ({rng.format(lo=f(r['min']), hi=f(r['max']))})")
    return out


def for_input(loaded, x: Optional[torch.Tensor] = None, image=None) -> List[Caveat]:
    """Caveats about one input: ``x`` the model input at shift 0 (``loaded.preprocess(image)`` when not
    given) and/or ``image`` the decoded PIL image (needed for the colour check)."""
    if x is None:
        if image is None:
            raise ValueError("for_input needs the model input x or the image")
        x = loaded.preprocess(image)
    card = loaded.card
    data = _DATASETS.get(card.get("dataset"), card.get("dataset")) or "its training data"
    out: List[Caveat] = []
    colour = image is not None and grey_input(card) and _colour_fraction(image) > COLOURED_FRACTION
    if colour:
        out.append(Caveat("colour",
                          f"A colour image: the model sees only its grey conversion (it was trained on grey "
                          f"{data} images), so its prediction rests on an input unlike anything it learned "
                          f"from; the probabilities are not a confidence."))
    stats = data_stats(card)
    if stats is not None and card.get("preprocess") != "timm":
        from .data import image_stats

        g = _pixels(loaded, x)
        values = {k: float(v) for k, v in image_stats(g).items()}
        off = _outside(stats, values)
        if off:
            flipped = {k: float(v) for k, v in image_stats(1.0 - g).items()}
            # (a colour photo is not fixed by inverting it, even when its negative's grey passes)
            if not colour and not _outside(stats, flipped):
                out.append(Caveat("inverted",
                                  f"A light background: {'; '.join(off)}. The {data} images are light garments "
                                  f"on black; inverted, this image looks like them. Invert it to see what the "
                                  f"model makes of it.", fix="invert"))
            else:
                out.append(Caveat("out-of-distribution",
                                  f"The input looks unlike the {data} images the model was trained on: "
                                  f"{'; '.join(off)}. Its prediction is a guess outside the data."))
    elif card.get("preprocess") == "timm" and card.get("weights") != "random":
        z = (x[0] if x.dim() == 4 else x).detach().float().cpu()
        mean, spread = float(z.mean()), float(loaded.denormalize(z).std())
        black = float(loaded.normalize(torch.zeros_like(z[:, :1, :1])).mean())  # a black pixel, normalised
        white = float(loaded.normalize(torch.ones_like(z[:, :1, :1])).mean())   # and a white one
        why = []
        end = black if mean < 0 else white
        if abs(mean) > TIMM_MEAN_FAR * abs(end):
            why.append(f"its mean is {fmt(mean, '.2f')} (the data's: 0; {'black' if mean < 0 else 'white'} is "
                       f"{fmt(end, '.2f')}): the image is mostly {'black' if mean < 0 else 'white'}")
        if spread < TIMM_FLAT_STD:
            why.append(f"its pixels vary by {fmt(spread, '.3f')} (std in [0, 1]): the image is nearly flat")
        if why:
            out.append(Caveat("out-of-distribution",
                              f"The normalised input is far from {data}'s statistics: {'; '.join(why)}. "
                              f"The prediction is a guess outside the data."))
    return out


def for_side(loaded, x: Optional[torch.Tensor] = None, result=None, image=None) -> List[Caveat]:
    """All caveats of one model on one input: model, input, then sweep (when given)."""
    out = for_model(loaded)
    if x is not None or image is not None:
        out += for_input(loaded, x=x, image=image)
    if result is not None:
        out += for_sweep(result)
    return out


# --- the preprocessing, in words -------------------------------------------------------------------
def recipe(card: Dict[str, Any]) -> str:
    """The card's preprocessing in one line, e.g. ``grayscale (replicated to 3 channels), fit to 28×28,
    pad 2 px black → 32×32, normalise mean (…) std (…)``: what the model is actually fed."""
    c, h, w = (int(v) for v in card["input_size"])
    mean = ", ".join(fmt(v, ".3f") for v in card["mean"])
    std = ", ".join(fmt(v, ".3f") for v in card["std"])
    if c == 1:
        color = "grayscale"
    elif grey_input(card):
        color = f"grayscale (replicated to {c} channels)"
    else:
        color = "RGB"
    if card.get("preprocess") == "timm":
        how = f"resize to {int(np.floor(min(h, w) / card['crop_pct']))} ({card['interpolation']}), centre crop {h}×{w}"
    else:
        pad = int(card.get("pad", 0))
        how = f"fit to {h - 2 * pad}×{w - 2 * pad}, pad {pad} px black → {h}×{w}"
    return f"{color}, {how}, normalise mean ({mean}) std ({std})"
