"""The comparison panels, baseline | anchored on the same scales. Layout only: numbers come from
equishift.metrics and the sweep results, figures from equishift.plots builders."""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import streamlit as st
import torch

from equishift import metrics

__all__ = ["preprocessing", "heatmap_keys", "summary", "top5", "render", "export"]


def preprocessing(sides, pil, choice) -> None:
    """What the image goes through before the model: the original, each model's input, and the recipe."""
    with st.expander(f"Image **{choice.label}** and its preprocessing", expanded=False):
        cols = st.columns(1 + len(sides))
        cols[0].image(pil, caption=f"original · {pil.width}×{pil.height} RGB", width=200)
        for col, side in zip(cols[1:], sides):
            card = side.loaded.card
            img = side.loaded.denormalize(side.x[0]).float().cpu()
            arr = img.expand(3, -1, -1) if img.shape[0] == 1 else img
            col.image(arr.permute(1, 2, 0).numpy(), width=200, clamp=True,
                      caption=f"{side.role} input · {_recipe(card)}")


def _recipe(card) -> str:
    c, h, w = card["input_size"]
    mean = ", ".join(f"{v:.3f}" for v in card["mean"])
    std = ", ".join(f"{v:.3f}" for v in card["std"])
    color = "grayscale" if int(c) == 1 else "RGB"
    if card.get("preprocess") == "timm":
        how = f"resize to {int(np.floor(min(h, w) / card['crop_pct']))} ({card['interpolation']}), centre crop {h}×{w}"
    else:
        pad = int(card.get("pad", 0))
        how = f"fit to {h - 2 * pad}×{w - 2 * pad}, pad {pad} px black → {h}×{w}"
    return f"{color}, {how}, normalise mean ({mean}) std ({std})"


def heatmap_keys(sides) -> List[str]:
    """Widget keys of the clickable orbit heatmaps (their selections move the shift)."""
    return [f"orbit_{s.role}" for s in sides]


def summary(sides, mode: str) -> None:
    """One row per model: consistency over the swept orbit, smallest flipping shift, largest drop."""
    st.subheader("Summary over the swept shifts")
    for side in sides:
        r = side.result
        est = metrics.consistency_a(torch.full((len(r),), r.ref_pred), r.pred)
        flip = float(metrics.minimal_flipping_shift(r.pred, r.ref_pred, r.shifts))
        change = metrics.absolute_change(r.ref_probs, r.probs)
        worst = int(change.argmax())
        classes = r.classes or [str(i) for i in range(r.logits.shape[1])]
        cols = st.columns([2, 2, 2, 2])
        cols[0].markdown(f"**{side.role}**  \n`{side.spec}`  \nunshifted: **{classes[r.ref_pred]}** "
                         f"({100 * float(r.ref_probs[r.ref_pred]):.1f}%)")
        cols[1].metric("consistency over the orbit", f"{100 * est.value:.1f}%",
                       help=f"Fraction of the {est.n} swept {mode} shifts whose top-1 equals the unshifted "
                            f"top-1 (consistency A against the unshifted image). 95% Wilson CI "
                            f"[{100 * est.low:.1f}, {100 * est.high:.1f}]%.")
        cols[2].metric("smallest flipping shift", "none" if np.isinf(flip) else f"{flip:g} px",
                       help="Smallest max(|dy|, |dx|) of a swept shift that changes the top-1 (L∞).")
        dy, dx = (float(v) for v in r.shifts[worst])
        cols[3].metric("largest probability change", f"{100 * float(change[worst]):.1f} pp",
                       help=f"max over shifts of |p(x)[ŷ] − p(shifted x)[ŷ]|, ŷ = unshifted top-1; "
                            f"at (dy, dx) = ({dy:g}, {dx:g}).")


def top5(side, index: int) -> None:
    """Top-5 classes and probabilities at the current shift, with the change from the unshifted image."""
    r = side.result
    p = r.probs[index]
    classes = r.classes or [str(i) for i in range(p.numel())]
    vals, idx = p.topk(min(5, p.numel()))
    rows = ["| class | p | Δ vs unshifted |", "|---|---:|---:|"]
    for v, i in zip(vals.tolist(), idx.tolist()):
        d = v - float(r.ref_probs[i])
        mark = " ★" if i == r.ref_pred else ""
        rows.append(f"| {classes[i]}{mark} | {100 * v:.1f}% | {100 * d:+.1f} pp |")
    st.markdown("\n".join(rows))


def render(sides, mode: str, grid, shift, shifted: Callable) -> None:
    summary(sides, mode)
    cols = st.columns(len(sides))
    for col, side in zip(cols, sides):
        with col:
            st.subheader(side.role)
            idx = side.result.index_of(*shift)
            pred = int(side.result.pred[idx])
            classes = side.result.classes or []
            name = classes[pred] if pred < len(classes) else str(pred)
            st.markdown(f"Prediction at this shift: **{name}**")
            top5(side, idx)


def export(sides, mode, grid, choice) -> None:
    pass
