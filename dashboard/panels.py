"""The comparison panels, baseline | anchored on the same scales. Layout only: numbers come from
equishift.metrics and the sweep results, figures from equishift.plots builders (each builder takes both
results and puts them on one scale).

What always shows: the summary row (per sweep, not per shift); the live view (dashboard.live) draws each
model's shifted input and top-5 in the browser. The deeper panels sit in tabs that run lazily — only the
open tab is computed — so moving the shift re-draws one figure, not eight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import streamlit as st
import torch

from equishift import metrics, plots
from equishift.formatting import fmt

from dashboard import compute
from dashboard.export import show

__all__ = ["preprocessing", "heatmap_keys", "summary", "probs_of", "first_anchors", "render", "TABS"]

TABS = ("Logit curves", "Orbit heatmaps", "Attention", "Polyphase indices", "Layer × shift error",
        "Attribution", "Export")
HEATMAPS = ("orbit_prob", "orbit_flip")
# Only the open tab is drawn; its choices keep their values while another tab is open.
KEEP = "session"


def preprocessing(sides, thumb, original_size, choice) -> None:
    """In the sidebar, under the image choice: the original, each model's input, and the recipe."""
    with st.sidebar.expander(f"Image **{choice.label}** and its preprocessing", expanded=True):
        # width="stretch": no server-side resize, so even a 5000×1 image (thumbnail 384×1) is shown as is
        st.image(thumb, caption=f"original · {original_size[0]}×{original_size[1]} RGB", width="stretch")
        for col, side in zip(st.columns(len(sides)), sides):
            img = side.loaded.denormalize(side.x[0]).float().cpu()
            arr = img.expand(3, -1, -1) if img.shape[0] == 1 else img
            col.image(arr.permute(1, 2, 0).numpy(), clamp=True, width="stretch",
                      caption=f"{side.role} input · {'×'.join(str(v) for v in side.x.shape[1:])}")
        recipes = list(dict.fromkeys(_recipe(side.loaded.card) for side in sides))
        for side, recipe in zip(sides, recipes):
            st.caption(("both: " if len(recipes) == 1 and len(sides) > 1 else f"{side.role}: ") + recipe)


def model_cards(sides) -> None:
    """Per model: where it comes from and, for an anchored one, its variant: every anchor site, whether
    an anchor went there and why (the card's ``anchors``)."""
    with st.expander("Model cards: source, anchoring variant, anchors"):
        for side in sides:
            card = side.loaded.card
            line = f"**{side.role}** `{side.spec}` · {card.get('source', '?')} · anchoring **{card.get('anchoring', 'none')}**"
            if card.get("anchor_options"):
                line += " · " + ", ".join(f"{k}={v}" for k, v in card["anchor_options"].items())
            st.markdown(line)
            paper = card.get("paper")
            if paper:
                st.caption(f"paper checkpoint {paper.get('file')} ({paper.get('arch')}): epoch {paper.get('epoch')}, "
                           f"max accuracy {paper.get('max_accuracy')}; config checked: "
                           f"{', '.join(paper.get('config_checked') or []) or 'none in the file'}")
            if card.get("anchor_options_note"):
                st.caption(card["anchor_options_note"])
            sites = card.get("anchors") or []
            if sites:
                st.dataframe([{"module": s["module"], "s": s["stride"], "anchored": "yes" if s["anchored"] else "no",
                               "why": s["why"]} for s in sites], hide_index=True, width="stretch")


def _recipe(card) -> str:
    from equishift.caveats import recipe

    return recipe(card)


def heatmap_keys() -> List[str]:
    """Widget keys of the clickable orbit heatmaps (a click moves the shift)."""
    return list(HEATMAPS)


def _pair(sides):
    """(baseline result, anchored result or None) for the plots builders; a lone side goes first."""
    res = [s.result for s in sides]
    return res[0], (res[1] if len(res) > 1 else None)


# --- always shown ----------------------------------------------------------------------------------
def _numbers(side) -> Dict[str, Any]:
    """The summary of one sweep (equishift.report.summarize — the same numbers the report writes) and
    where the drop is largest; they do not depend on the current shift, so they are cached per sweep."""
    def compute_numbers():
        from equishift.report import summarize

        r = side.result
        out = summarize(r)
        out["drop_at"] = tuple(float(v) for v in r.shifts[int(r.probs[:, r.ref_pred].argmin())])
        out["classes"] = r.classes or [str(i) for i in range(r.logits.shape[1])]
        return out
    return compute.cached(("summary", side.key), compute_numbers)


def summary(sides, mode: str) -> None:
    """One compact table, a row per model: the unshifted top-1, consistency over the swept orbit with its
    95% interval, the flips, the smallest flipping shift and the largest probability drop (the numbers of
    equishift.report.summarize, as in the report). Compact, so the live view and the open tab's figure
    stay on one screen with it."""
    rows = ["| model | unshifted top-1 | consistency over the orbit [95% CI] | top-1 flips | smallest flipping "
            "shift | largest probability drop |", "|---|---|---:|---:|---:|---:|"]
    for side in sides:
        n = _numbers(side)
        est, flip, (dy, dx) = n["consistency_A_over_grid"], n["minimal_flipping_shift_linf"], n["drop_at"]
        lo, hi = est["ci95"]
        drop = n["unshifted_top1_prob"] - n["min_prob_top1"]
        rows.append(f"| **{side.role}** | {n['classes'][n['unshifted_top1']]} "
                    f"({fmt(100 * n['unshifted_top1_prob'], '.1f')}%) | **{fmt(100 * est['value'], '.1f')}%** "
                    f"[{fmt(100 * lo, '.1f')}, {fmt(100 * hi, '.1f')}] | {n['top1_flips']} of {n['num_shifts']} | "
                    f"{'none' if flip is None else fmt(flip) + ' px'} | {fmt(100 * drop, '.1f')} pp at "
                    f"({fmt(dy)}, {fmt(dx)}) |")
    st.markdown("**Summary over the swept shifts**\n\n" + "\n".join(rows))
    st.caption(f"Consistency: the share of the swept {mode} shifts that keep the unshifted top-1 (95% Wilson "
               f"interval). Flipping shift: the smallest max(|dy|, |dx|) that changes it. Drop: of its probability.")


def probs_of(side) -> Dict[str, Any]:
    """Per-sweep numpy copies of the probabilities and predictions, cached: the rerun path then runs no
    torch op (on a CPU shared with other work, each small multi-threaded op can wait tens of ms)."""
    def make():
        r = side.result
        probs = r.probs.numpy()
        return {"probs": probs, "pred": probs.argmax(1), "ref_probs": r.ref_probs.numpy(), "ref_pred": r.ref_pred,
                "classes": r.classes or [str(i) for i in range(probs.shape[1])]}
    return compute.cached(("probs", side.key), make)


def first_anchors(res):
    """[K, 2] the image-level anchor (a, b) selected at each shift (the anchor before the first patch
    embedding), or None for a model without anchors."""
    names = res.meta.get("anchor_names") or list(res.anchors)
    if not names or names[0] not in res.anchors:
        return None
    return res.anchors[names[0]].numpy()


@dataclass
class View:
    """What every tab draws from: the sides with their sweeps, the shift mode and grid, the current
    shift and its row in each sweep, and the image file's bytes (the report hashes and re-reads them)."""

    sides: list
    mode: str
    grid: Any
    shift: Tuple[float, float]
    index: Dict[str, int]
    image_bytes: bytes = b""

    @property
    def current(self) -> int:
        """Row of the current shift in the first side's sweep (all sweeps share one grid)."""
        return self.index[self.sides[0].role]


def render(sides, mode: str, grid, shift, image_bytes: bytes = b"") -> None:
    """The tabs below the live view (only the open one is computed)."""
    view = View(sides, mode, grid, tuple(shift), {s.role: s.result.index_of(*shift) for s in sides},
                image_bytes)
    tabs = st.tabs(TABS, key="panel", on_change="rerun", bind="query-params")
    panels = (_curves, _heatmaps, _attention, _polyphase, _layer_error, _attribution, _export_tab)
    for name, tab, panel in zip(TABS, tabs, panels):
        # .open is None when tab state is not tracked (AppTest before any switch): render the first only
        if tab.open or (tab.open is None and panel is panels[0]):
            with tab:
                _guarded(panel, f"the {name} tab", view)


def _guarded(fn, what: str, *args) -> None:
    """Run one panel; a failure in it is shown there and the rest of the page keeps working."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        st.error(f"Cannot draw {what}: {type(e).__name__}: {e}")


# --- tabs ------------------------------------------------------------------------------------------
def _curves(v: View) -> None:
    c1, c2 = st.columns(2)
    kind = c1.radio("path through the orbit", ("row", "column", "diagonal"), horizontal=True, key="curve_path", persist_state=KEEP,
                    format_func={"row": "row through this shift (dx varies)",
                                 "column": "column through this shift (dy varies)",
                                 "diagonal": "diagonal dy = dx"}.get)
    value = c2.radio("value", ("prob", "logit"), horizontal=True, key="curve_value", persist_state=KEEP,
                     format_func={"prob": "probability", "logit": "logit"}.get)
    base, anch = _pair(v.sides)
    from equishift.report import path_indices  # the report draws the same path: page = report

    path = path_indices(base, v.shift, kind)  # the sweeps share one grid: one path serves both
    show(plots.logit_curve(base, anch, path=path, current=v.current, value=value), "logit-curves",
         key="fig_curves")
    if kind == "diagonal" and v.shift[0] != v.shift[1]:
        st.caption("The current shift is off the diagonal, so it is not marked: pick the row or column path.")


def _keys(v: View) -> tuple:
    return tuple(s.key for s in v.sides)


def _heatmaps(v: View) -> None:
    base, anch = _pair(v.sides)
    st.caption("Click a cell to jump to that shift. × marks the current shift.")
    # Built once per sweep without the marker (the live view draws it): a shift change sends the same
    # figure again, which the browser does not redraw. The exported file has the marker.
    for value, name, key in (("prob", "orbit-probability", HEATMAPS[0]), ("flip", "orbit-flip-map", HEATMAPS[1])):
        fig = compute.cached(("fig-orbit", _keys(v), value), lambda value=value: plots.orbit_heatmap(base, anch, value))
        show(fig, name, key=key, on_select="rerun", selection_mode="points",
             exported=lambda value=value: plots.orbit_heatmap(base, anch, value, current=v.current))


def _attention_scores(side, layer: str):
    """Attention equivariance per shift for one layer: (Pearson r [K], top-10% IoU [K]) of the head-mean
    map, un-shifted into the unshifted frame, against the unshifted map. Cached per sweep."""
    def compute_scores():
        res = side.result
        aligned = res.aligned_attention(layer).float().mean(1)          # [K, h, w]
        ref = res.ref_attention[layer].float().mean(0)                  # [h, w]
        zero = torch.zeros(aligned.shape[0], 2, dtype=torch.long)
        return metrics.attention_equivariance(aligned, ref, zero)
    return compute.cached(("attention-scores", side.key, layer), compute_scores)


def _attention(v: View) -> None:
    sides, index = v.sides, v.index
    base, anch = _pair(sides)
    layers = list(base.attention)
    if not layers:
        why = base.meta.get("not_recorded", {}).get("attention")
        st.info(f"No attention maps for the baseline: {why}." if why else
                "No attention maps were recorded: run the sweep with attention in its records.")
        return
    c1, c2, c3 = st.columns([3, 1, 1])
    chosen = c1.multiselect("layers", layers, default=layers if len(layers) <= 6 else layers[-3:],
                            key="att_layers")
    heads = c2.radio("heads", ("mean", "all"), horizontal=True, key="att_heads", persist_state=KEEP)
    align = c3.toggle("align to unshifted", value=True, key="att_align", persist_state=KEEP,
                      help="Roll each map back by the shift (tokens) or the recorded anchors, so an "
                           "equivariant model shows the same picture at every shift.")
    if not chosen:
        st.info("Pick at least one layer.")
        return
    if anch is not None and any(layer not in anch.attention for layer in chosen):
        st.warning("The two models have different layers; showing the baseline's layer names only.")
        anch = None
    fig = plots.attention_grid(base, anch, current=v.current, layers=chosen, heads=heads, align=align)
    show(fig, "attention", key="fig_attention")
    rows = ["| model | layer | r at this shift | IoU@10% at this shift | mean r over the orbit | mean IoU |",
            "|---|---|---:|---:|---:|---:|"]
    for side in sides:
        for layer in chosen:
            if layer not in side.result.attention:
                continue
            r, iou = _attention_scores(side, layer)
            k = index[side.role]
            rows.append(f"| {side.role} | {layer} | {fmt(r[k], '.3f')} | {fmt(iou[k], '.3f')} | "
                        f"{fmt(r.nanmean(), '.3f')} | {fmt(iou.nanmean(), '.3f')} |")
    st.markdown("**Attention equivariance** — Pearson r and IoU of the top-10% region between the un-shifted "
                "head-mean map at each shift and the unshifted map (1 = equivariant):\n\n" + "\n".join(rows))


def _polyphase(v: View) -> None:
    anchored = [s for s in v.sides if s.result.anchors]
    if not anchored:
        st.info("Neither model has polyphase anchors. Choose an anchored model (or 'Anchorize the baseline').")
        return
    for side in anchored:
        show(plots.polyphase_panel(side.result, current=v.index[side.role]), f"polyphase-{side.role}",
             key=f"fig_poly_{side.role}")
        _margin_table(side.role, side.result.anchor_margins(v.index[side.role]))


def _margin_table(role: str, rows) -> None:
    """How close each anchor's choice came to a tie: the one way an anchored model can fail to be exact."""
    if not rows or rows[0]["margin"] is None:
        return
    lines = ["| module | s | phase | top-2 margin here | smallest over the sweep | tolerance | near-ties |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        tol = "—" if r["tie_tol"] is None else fmt(r["tie_tol"], "g")  # results saved without it
        ties = "—" if r["near_ties"] is None else r["near_ties"]
        lines.append(f"| `{r['module']}` | {r['stride']} | {r['phase']} | {fmt(r['margin'], '.2g')} | "
                     f"{fmt(r['min_margin'], '.2g')} | {tol} | {ties} |")
    st.markdown(f"**{role}: polyphase margins** — relative gap (S1 − S2) / S1 between the two strongest "
                "phases. At or below the tolerance the choice is a near-tie, decided by the second key (Σx⁴); "
                "a margin close to the tolerance, on either side, is where another CPU's rounding could "
                "pick differently "
                "(docs/anchoring.md, \"Near-ties\").\n\n" + "\n".join(lines))


def _layer_error(v: View) -> None:
    base, anch = _pair(v.sides)
    if not base.layer_error:
        why = base.meta.get("not_recorded", {}).get("features")
        st.info(f"No per-layer errors for the baseline: {why}." if why else
                "No per-layer features were recorded: run the sweep with features in its records.")
        return
    log = st.toggle("log scale", value=True, key="err_log", persist_state=KEEP, help="log10 of the error, so float noise "
                                                                  "(~1e-7) and real errors are both visible")
    fig = compute.cached(("fig-layer-error", _keys(v), log), lambda: plots.layer_error_map(base, anch, log=log))
    show(fig, "layer-shift-error", key="fig_layer_error",
         exported=lambda: plots.layer_error_map(base, anch, current=v.current, log=log))


def _attribution(v: View) -> None:
    from dashboard import attribution_panel

    attribution_panel.render(v.sides, v.mode, v.shift, v.index)


def _export_tab(v: View) -> None:
    from dashboard import export

    export.report_panel(v.sides, v.mode, v.grid, v.image_bytes, v.shift)
