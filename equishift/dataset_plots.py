"""Figures of the dataset view: one builder per view, used by the dashboard's Dataset page and by
``python -m equishift evaluate --figures DIR`` alike (equishift.dataset_sweep computes the numbers).

Every builder takes the list of ``ModelSweep`` (2–6 models, one per curve/panel) and puts all of them on
the same scales: consistency and probabilities on [0, 1], one colour axis per kind of map. Proportions
carry their 95% Wilson interval (error bars, or the hover of a map cell). Titles name the metric, the
images, the shift mode and the shift set.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import dataset_sweep as ds
from .errors import EquishiftError
from .formatting import clean, fmt
from .plots import _integer_ticks

__all__ = ["MODEL_COLOURS", "consistency_curve", "orbit_map", "per_class_bars", "leaderboard_scatter",
           "phase_frequency", "margin_histogram", "all_figures", "FIGURE_CAPTIONS", "model_labels"]

MODEL_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
SEQ = "Viridis"


def model_labels(sweeps: Sequence[ds.ModelSweep]) -> List[str]:
    """Display names, made unique (two specs of one card name get their spec appended)."""
    names = [s.name for s in sweeps]
    return [n if names.count(n) == 1 else f"{n} ({s.spec})" for n, s in zip(names, sweeps)]


def _check(sweeps: Sequence[ds.ModelSweep]) -> None:
    if not sweeps:
        raise EquishiftError("no model sweeps to draw")


def _subtitle(sw: ds.ModelSweep) -> str:
    return f"{sw.n} images of {sw.meta.get('data', '?')}; {sw.meta.get('describe', sw.mode)}"


def _title(what: str, sw: ds.ModelSweep) -> str:
    return f"{what}<br><sup>{_subtitle(sw)}</sup>"


def consistency_curve(sweeps: Sequence[ds.ModelSweep], by: str = "linf") -> go.Figure:
    """Fraction of images whose top-1 is unchanged against ‖δ‖∞ (``linf``), dy or dx; one curve per model,
    95% Wilson intervals as error bars."""
    _check(sweeps)
    axis = {"linf": "‖δ‖∞ (pixels)", "dy": "dy (pixels)", "dx": "dx (pixels)"}[by]
    fig = go.Figure()
    for j, (sw, label) in enumerate(zip(sweeps, model_labels(sweeps))):
        c = ds.consistency_by(sw, by)
        fig.add_trace(go.Scatter(
            x=clean(c["value"]), y=clean(c["consistency"]), mode="lines+markers", name=label,
            line=dict(color=MODEL_COLOURS[j % len(MODEL_COLOURS)]),
            error_y=dict(type="data", symmetric=False, array=clean(c["hi"] - c["consistency"]),
                         arrayminus=clean(c["consistency"] - c["lo"])),
            customdata=np.stack([c["lo"], c["hi"], c["shifts"]], 1),
            hovertemplate=(f"{axis.split(' ')[0]}=%{{x}}<br>consistency %{{y:.3f}} "
                           "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>%{customdata[2]} shifts<extra>"
                           + label + "</extra>")))
    fig.update_layout(title=_title(f"Consistency vs {axis.split(' ')[0]}: top-1 unchanged, 95% Wilson", sweeps[0]),
                      xaxis=dict(title=axis, dtick=1 if len(ds.consistency_by(sweeps[0], by)["value"]) <= 16 else None), yaxis=dict(title="consistency", range=[-0.02, 1.02]), height=420,
                      margin=dict(t=90), legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))
    return fig


_MAPS = {"p_ref": "Probability of the unshifted top-1", "p_true": "Probability of the true class",
         "flip": "Flip rate (top-1 ≠ unshifted top-1)"}


def orbit_map(sweeps: Sequence[ds.ModelSweep], value: str = "p_ref") -> go.Figure:
    """Mean orbit map over the images at each (dy, dx), one panel per model, one colour scale [0, 1]:
    ``p_ref``, ``p_true`` (labelled sets only) or ``flip`` (hover: 95% Wilson interval)."""
    _check(sweeps)
    if value not in _MAPS:
        raise EquishiftError(f"unknown map {value!r}; use {', '.join(_MAPS)}")
    if value == "p_true" and not all(s.labelled for s in sweeps):
        raise EquishiftError("the true-class map needs labelled images")
    n = len(sweeps)
    cols = min(n, 3)
    rows = -(-n // cols)
    labels = model_labels(sweeps)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=labels, horizontal_spacing=0.08,
                        vertical_spacing=0.12)
    for j, sw in enumerate(sweeps):
        m = ds.orbit_maps(sw)
        z = m[value]
        r, c = j // cols + 1, j % cols + 1
        if value == "flip":
            extra = np.stack([m["flip_lo"], m["flip_hi"]], -1)
            hover = "dy=%{y}, dx=%{x}<br>flip rate %{z:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
        else:
            extra = None
            hover = "dy=%{y}, dx=%{x}<br>mean p %{z:.3f}"
        fig.add_trace(go.Heatmap(x=clean(m["dx"]), y=clean(m["dy"]), z=clean(z), coloraxis="coloraxis",
                                 customdata=None if extra is None else clean(extra),
                                 hovertemplate=hover + "<extra>" + labels[j] + "</extra>"), row=r, col=c)
        # integer shift grids get integer ticks (plotly's own put half-integers on a short axis)
        fig.update_xaxes(title_text="dx", row=r, col=c, constrain="domain", **_integer_ticks(m["dx"]))
        fig.update_yaxes(title_text="dy", autorange="reversed", scaleanchor=f"x{'' if j == 0 else j + 1}",
                         row=r, col=c, constrain="domain", **_integer_ticks(m["dy"]))
    scale = SEQ if value != "flip" else [[0, "#f7f7f7"], [1, "#d62728"]]
    fig.update_layout(coloraxis=dict(colorscale=scale, cmin=0, cmax=1,
                                     colorbar=dict(title="rate" if value == "flip" else "p")),
                      title=_title(_MAPS[value] + ", mean over the images", sweeps[0]),
                      height=150 + 330 * rows, margin=dict(t=100))
    return fig


def per_class_bars(sweeps: Sequence[ds.ModelSweep], metric: str = "consistency") -> go.Figure:
    """Per class, one bar per model: ``clean_accuracy``, ``shifted_accuracy``, ``consistency`` or
    ``orbit_consistency``, 95% Wilson intervals as error bars."""
    _check(sweeps)
    names = {"clean_accuracy": "Clean accuracy", "shifted_accuracy": "Shifted accuracy (mean over the shift set)",
             "consistency": "Consistency (mean over the shift set)",
             "orbit_consistency": "Orbit consistency (top-1 held at every shift)"}
    if metric not in names:
        raise EquishiftError(f"unknown per-class metric {metric!r}; use {', '.join(names)}")
    if metric in ("clean_accuracy", "shifted_accuracy") and not all(s.labelled for s in sweeps):
        raise EquishiftError(f"{names[metric].lower()} needs labelled images")
    fig = go.Figure()
    for j, (sw, label) in enumerate(zip(sweeps, model_labels(sweeps))):
        rows = ds.per_class(sw)
        v = np.array([r[metric]["value"] for r in rows])
        lo = np.array([r[metric]["ci95"][0] for r in rows])
        hi = np.array([r[metric]["ci95"][1] for r in rows])
        fig.add_trace(go.Bar(
            x=[r["class"] for r in rows], y=clean(v), name=label, marker_color=MODEL_COLOURS[j % len(MODEL_COLOURS)],
            error_y=dict(type="data", symmetric=False, array=clean(hi - v), arrayminus=clean(v - lo)),
            customdata=np.stack([lo, hi, [r["n"] for r in rows]], 1),
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}], n=%{customdata[2]}"
                          "<extra>" + label + "</extra>"))
    by = "" if sweeps[0].labelled else " (classes = unshifted prediction: the images carry no labels)"
    fig.update_layout(barmode="group", title=_title(f"{names[metric]} per class{by}, 95% Wilson interval", sweeps[0]),
                      yaxis=dict(title=metric.replace("_", " "), range=[0, 1.02]), height=440, margin=dict(t=90),
                      legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    return fig


def leaderboard_scatter(rows: Sequence[Dict[str, Any]], x: str = "consistency-a", y: str = "clean_accuracy",
                        describe: str = "") -> go.Figure:
    """Accuracy against consistency, one point per leaderboard row, with 95% intervals on both axes."""
    fig = go.Figure()
    for j, r in enumerate(rows):
        px, py = r.get(x) or r.get("consistency"), r.get(y) or r.get("orbit_consistency")
        if px is None or py is None:
            continue
        fig.add_trace(go.Scatter(
            x=[px["value"]], y=[py["value"]], mode="markers+text", name=r["model"], text=[r["model"]],
            textposition="top left" if px["value"] > 0.6 else "top right", marker=dict(size=12, color=MODEL_COLOURS[j % len(MODEL_COLOURS)]),
            error_x=dict(type="data", symmetric=False, array=[px["ci95"][1] - px["value"]],
                         arrayminus=[px["value"] - px["ci95"][0]]),
            error_y=dict(type="data", symmetric=False, array=[py["ci95"][1] - py["value"]],
                         arrayminus=[py["value"] - py["ci95"][0]]),
            hovertemplate=f"{x} %{{x:.3f}}<br>{y} %{{y:.3f}}<extra>{r['model']}</extra>"))
    fig.update_layout(title=f"Accuracy vs consistency, 95% Wilson intervals<br><sup>{describe}</sup>",
                      xaxis=dict(title=x.replace("_", " "), range=[-0.02, 1.04]),
                      yaxis=dict(title=y.replace("_", " "), range=[0, 1.02]), height=460, margin=dict(t=90),
                      showlegend=False)
    return fig


def phase_frequency(sweeps: Sequence[ds.ModelSweep], over: str = "unshifted") -> Optional[go.Figure]:
    """For every anchored module of every anchored model: how often each phase (row, col) was selected, a
    heatmap per module on one scale. ``over='unshifted'``: for the unshifted images (where the data's
    polyphase energy sits); ``'all'``: over all images × shifts. None when no model is anchored."""
    key = {"unshifted": "ref_frequency", "all": "frequency"}[over]
    panels = [(label, st) for sw, label in zip(sweeps, model_labels(sweeps)) for st in ds.polyphase_stats(sw)]
    if not panels:
        return None
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{lab}<br>{st['module']} (s={st['stride']})"
                                                              for lab, st in panels],
                        horizontal_spacing=0.07, vertical_spacing=0.2)
    zmax = max(float(st[key].max()) for _, st in panels)
    for j, (label, st) in enumerate(panels):
        s = st["stride"]
        fig.add_trace(go.Heatmap(z=clean(st[key]), x=list(range(s)), y=list(range(s)),
                                 coloraxis="coloraxis", text=np.vectorize(lambda v: fmt(v, ".3f"))(st[key]),
                                 texttemplate="%{text}" if s <= 4 else None,
                                 hovertemplate="phase (%{y}, %{x}): %{z:.4f}<extra>" + label + "</extra>"),
                      row=j // cols + 1, col=j % cols + 1)
        fig.update_yaxes(autorange="reversed", title_text="row", dtick=1, row=j // cols + 1, col=j % cols + 1)
        fig.update_xaxes(title_text="col", dtick=1, row=j // cols + 1, col=j % cols + 1)
    sw0 = next(sw for sw in sweeps if sw.phase_counts)
    fig.update_layout(coloraxis=dict(colorscale=SEQ, cmin=0, cmax=zmax, colorbar=dict(title="freq")),
                      title=_title("Polyphase anchors: how often each phase is selected, "
                                   + ("for the unshifted images" if over == "unshifted" else "over images × shifts"),
                                   sw0),
                      height=170 + 300 * rows, margin=dict(t=120))
    return fig


def margin_histogram(sweeps: Sequence[ds.ModelSweep]) -> Optional[go.Figure]:
    """Distribution of the top-1/top-2 polyphase norm margin (S1 − S2) / S1 per anchored module, log10
    bins; the tie tolerance as a dotted line. None when no model is anchored."""
    centres = (ds.MARGIN_BINS[:-1] + ds.MARGIN_BINS[1:]) / 2
    fig = go.Figure()
    tols = set()
    for sw, label in zip(sweeps, model_labels(sweeps)):
        for st in ds.polyphase_stats(sw):
            total = max(1, int(st["margin_hist"].sum()))
            fig.add_trace(go.Scatter(x=clean(centres), y=clean(st["margin_hist"] / total), mode="lines",
                                     line_shape="hvh", name=f"{label}: {st['module']}",
                                     hovertemplate="log10 margin %{x:.2f}: %{y:.4f}<extra></extra>"))
            if st["tie_tol"]:
                tols.add(float(st["tie_tol"]))
    if not fig.data:
        return None
    for t in tols:
        fig.add_vline(x=float(np.log10(t)), line=dict(dash="dot", color="black"),
                      annotation_text=f"tie tolerance {fmt(t, '.1e')}")
    sw0 = next(sw for sw in sweeps if sw.phase_counts)
    fig.update_layout(title=_title("Polyphase top-1/top-2 norm margin (S1 − S2)/S1 over images × shifts "
                                   "(bins ≤ 1e-8 hold exact ties)", sw0),
                      xaxis_title="log10 relative margin", yaxis_title="fraction of choices", height=420,
                      margin=dict(t=90), legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


FIGURE_CAPTIONS = {
    "consistency_linf": "Fraction of images whose top-1 class is unchanged, against the shift's ‖δ‖∞ "
                        "(mean over the shifts of that size), 95% Wilson interval over the images.",
    "consistency_dy": "The same against the vertical shift dy.",
    "consistency_dx": "The same against the horizontal shift dx.",
    "orbit_p_ref": "Mean probability of each image's unshifted top-1 class at every shift.",
    "orbit_p_true": "Mean probability of the true class at every shift.",
    "orbit_flip": "Flip rate at every shift: fraction of images whose top-1 differs from the unshifted one.",
    "per_class_consistency": "Consistency per class (mean over the shift set), 95% Wilson interval.",
    "per_class_clean_accuracy": "Clean accuracy per class.",
    "per_class_shifted_accuracy": "Accuracy per class, mean over the shift set.",
    "leaderboard_scatter": "Accuracy against consistency, one point per model.",
    "phase_frequency": "How often each polyphase phase is selected for the unshifted images, per anchored module.",
    "margin_histogram": "How close the polyphase norms come to a tie (relative top-2 margin).",
}


def all_figures(sweeps: Sequence[ds.ModelSweep], leaderboard: Optional[Sequence[Dict[str, Any]]] = None
                ) -> Dict[str, go.Figure]:
    """Every figure of the dataset view, by export name (the keys of ``FIGURE_CAPTIONS`` that apply)."""
    figs: Dict[str, go.Figure] = {}
    for by in ("linf", "dy", "dx"):
        figs[f"consistency_{by}"] = consistency_curve(sweeps, by)
    labelled = all(s.labelled for s in sweeps)
    for value in ("p_ref", "p_true", "flip"):
        if value != "p_true" or labelled:
            figs[f"orbit_{value}"] = orbit_map(sweeps, value)
    for metric in ("consistency", "clean_accuracy", "shifted_accuracy"):
        if metric == "consistency" or labelled:
            figs[f"per_class_{metric}"] = per_class_bars(sweeps, metric)
    if leaderboard:
        y = "clean_accuracy" if labelled else "orbit_consistency"
        figs["leaderboard_scatter"] = leaderboard_scatter(leaderboard, "consistency-a", y,
                                                          _subtitle(sweeps[0]))
    for name, fn in (("phase_frequency", phase_frequency), ("margin_histogram", margin_histogram)):
        fig = fn(sweeps)
        if fig is not None:
            figs[name] = fig
    return figs
