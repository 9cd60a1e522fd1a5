"""Plotly figures. Each builder is THE one for its plot: the dashboard and the report CLI both call it.

Conventions
- Builders take the baseline and (optionally) the anchored ``SweepResult`` together and put both on the
  SAME scales (colour range, y range); where a caller wants a fixed scale it passes ``zmax``/``yrange``.
- Every title names the metric, the shift mode and the range swept (metrics.md, last line).
- ``current`` is a shift index into the sweep (``result.index_of(dy, dx)``); it is marked on the figure.
- Images passed for display are (C, H, W) or (H, W) tensors/arrays in [0, 1] (already denormalised,
  e.g. with ``LoadedModel.denormalize``); 1 channel is shown in grey.
- Numbers in titles go through ``equishift.formatting.fmt`` and data through ``clean``, so no figure
  shows a signed zero (``-0.0``: float noise whose sign differs between CPUs). Hover templates are
  formatted by plotly.js (d3-format), which already drops the sign of a value that rounds to zero.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .errors import EquishiftError
from .formatting import clean, fmt
from .sweep import SweepResult, describe_shifts

__all__ = [
    "logit_curve", "orbit_heatmap", "attention_grid", "polyphase_panel", "layer_error_map",
    "attribution_overlay", "shifted_image", "default_path", "FIGURES",
]

# Names of the builders, for code that renders "all figures" (the report CLI).
FIGURES = ("logit_curve", "orbit_heatmap", "attention_grid", "polyphase_panel", "layer_error_map",
           "attribution_overlay", "shifted_image")

BASE_COLOR, ANCH_COLOR = "#d62728", "#1f77b4"
SEQ = "Viridis"


# --- helpers ------------------------------------------------------------------------------------
def _pair(baseline: SweepResult, anchored: Optional[SweepResult]) -> List[Tuple[str, SweepResult]]:
    out = [(_label(baseline, "baseline"), baseline)]
    if anchored is not None:
        out.append((_label(anchored, "anchored"), anchored))
        if baseline.meta.get("mode") != anchored.meta.get("mode"):
            raise EquishiftError("baseline and anchored sweeps use different shift modes; sweep both the same way")
    return out


def _label(res: SweepResult, default: str) -> str:
    name = res.meta.get("label")
    if name:
        return str(name)
    mode = res.meta.get("anchoring", "none")
    return default if mode in (None, "none") else f"anchored ({mode})"


def _class_name(res: SweepResult, c: int) -> str:
    names = res.classes
    return f"{names[c]}" if names and 0 <= c < len(names) else f"class {c}"


def _range_text(res: SweepResult) -> str:
    return f"{res.meta.get('mode', '?')} shifts, {describe_shifts(res.shifts)}"


def _title(what: str, res: SweepResult, detail: str = "") -> str:
    """Metric on the first line, shift mode and range (and any detail) underneath."""
    return f"{what}<br><sup>{_range_text(res)}{'; ' + detail if detail else ''}</sup>"


def _shift_text(res: SweepResult, k: int) -> str:
    dy, dx = res.shifts[k].tolist()
    return f"(dy={fmt(dy)}, dx={fmt(dx)})"


def default_path(res: SweepResult) -> torch.Tensor:
    """Shift indices of the path the curves follow by default: the diagonal dy = dx if the sweep holds
    at least two such shifts (the paper's stability path), else every shift in sweep order."""
    diag = (res.shifts[:, 0] == res.shifts[:, 1]).nonzero()[:, 0]
    return diag if diag.numel() >= 2 else torch.arange(len(res))


def _path(res: SweepResult, path) -> torch.Tensor:
    if path is None:
        return default_path(res)
    t = torch.as_tensor(path)
    if t.dim() == 2:  # (dy, dx) pairs
        return torch.tensor([res.index_of(*p) for p in t.tolist()])
    return t.long()


def _np_image(img) -> np.ndarray:
    """(C, H, W) or (H, W) in [0, 1] → uint8 (H, W, 3)."""
    a = img.detach().cpu().float().numpy() if torch.is_tensor(img) else np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def _finite_max(arrays: Sequence[torch.Tensor], floor: float = 1e-12) -> float:
    vals = [float(a.float().nan_to_num(0).abs().max()) for a in arrays if a is not None and a.numel()]
    return max(vals + [floor])


# --- per-shift curves --------------------------------------------------------------------------
def logit_curve(baseline: SweepResult, anchored: Optional[SweepResult] = None, path=None,
                current: Optional[int] = None, value: str = "prob", classes: Optional[Sequence[int]] = None,
                yrange: Optional[Tuple[float, float]] = None) -> go.Figure:
    """Probability (``value='prob'``) or logit (``'logit'``) of selected classes along a path through the
    orbit, one panel per model on one y scale. ``path``: shift indices or (dy, dx) pairs (default
    ``default_path``); ``classes``: class indices (default: each model's unshifted top-1).
    ``current`` (a shift index) is marked where it lies on the path."""
    if value not in ("prob", "logit"):
        raise EquishiftError(f"value must be 'prob' or 'logit', got {value!r}")
    pairs = _pair(baseline, anchored)
    cls = list(classes) if classes is not None else sorted({r.ref_pred for _, r in pairs})
    fig = make_subplots(rows=1, cols=len(pairs), shared_yaxes=True, subplot_titles=[n for n, _ in pairs])
    lo, hi = (0.0, 1.0) if value == "prob" else (np.inf, -np.inf)
    palette = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    for col, (name, res) in enumerate(pairs, start=1):
        idx = _path(res, path)
        vals = (res.probs if value == "prob" else res.logits)[idx]
        steps = list(range(len(idx)))
        hover = [_shift_text(res, int(k)) for k in idx]
        for j, c in enumerate(cls):
            fig.add_trace(go.Scatter(
                x=steps, y=clean(vals[:, c].tolist()), mode="lines+markers", name=_class_name(res, c),
                legendgroup=str(c), showlegend=col == 1, line=dict(color=palette[j % len(palette)]),
                text=hover, hovertemplate="%{text}<br>%{y:.4f}<extra>" + _class_name(res, c) + "</extra>",
            ), row=1, col=col)
        if value == "logit":
            lo, hi = min(lo, float(vals[:, cls].min())), max(hi, float(vals[:, cls].max()))
        if current is not None:
            where = (idx == int(current)).nonzero()
            if where.numel():
                s = int(where[0, 0])
                fig.add_vline(x=s, line=dict(color="black", dash="dot"), row=1, col=col)
                fig.add_trace(go.Scatter(x=[s] * len(cls), y=clean([float(vals[s, c]) for c in cls]), mode="markers",
                                         marker=dict(size=11, symbol="circle-open", color="black"),
                                         name="current shift", showlegend=col == 1, hoverinfo="skip"),
                              row=1, col=col)
        fig.update_xaxes(title_text="step along path (hover: shift)", row=1, col=col)
    if yrange is None:
        pad = 0.05 * (hi - lo) if value == "logit" else 0.02
        yrange = (lo - pad, hi + pad)
    fig.update_yaxes(range=list(yrange), title_text="softmax probability" if value == "prob" else "logit",
                     row=1, col=1)
    fig.update_yaxes(range=list(yrange))
    what = "probability" if value == "prob" else "logit"
    fig.update_layout(title=_title(f"Per-shift {what} of the unshifted top-1 class along the path", baseline),
                      height=380, margin=dict(t=80))
    return fig


# --- orbit heatmaps ----------------------------------------------------------------------------
def orbit_heatmap(baseline: SweepResult, anchored: Optional[SweepResult] = None, value: str = "prob",
                  current: Optional[int] = None) -> go.Figure:
    """2-D maps over the swept (dy, dx) grid, one per model, same colour scale.
    ``value='prob'``: probability of the model's unshifted prediction (0..1).
    ``value='flip'``: 1 where the top-1 differs from the unshifted top-1 (hover names the class)."""
    if value not in ("prob", "flip"):
        raise EquishiftError(f"value must be 'prob' or 'flip', got {value!r}")
    pairs = _pair(baseline, anchored)
    titles = []
    for name, res in pairs:
        flips = int((res.pred != res.ref_pred).sum())
        titles.append(f"{name}: {flips}/{len(res)} flips")
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=titles, horizontal_spacing=0.14)
    for col, (name, res) in enumerate(pairs, start=1):
        c = res.ref_pred
        v = res.probs[:, c] if value == "prob" else (res.pred != c).float()
        ys, xs, z = res.to_grid(v)
        _, _, pz = res.to_grid(res.pred.float())
        text = [[("" if np.isnan(p) else _class_name(res, int(p))) for p in row] for row in pz.numpy()]
        fig.add_trace(go.Heatmap(
            x=clean(xs), y=clean(ys), z=clean(z.numpy()), text=np.array(text), coloraxis="coloraxis",
            hovertemplate="dy=%{y}, dx=%{x}<br>value=%{z:.4f}<br>top-1: %{text}<extra>" + name + "</extra>",
        ), row=1, col=col)
        # Transparent click targets, one per swept shift, over the heatmap: a click on a heatmap cell
        # carries no point index, so the dashboard (st.plotly_chart on_select) could not tell which
        # shift was clicked; a click on a marker does. They carry the same hover text.
        # numpy arrays, not lists: plotly validates lists element by element (~10x slower for 1024 shifts)
        names = np.array([_class_name(res, int(p)) for p in res.pred.tolist()])
        fig.add_trace(go.Scatter(
            x=clean(res.shifts[:, 1].numpy()), y=clean(res.shifts[:, 0].numpy()), mode="markers", showlegend=False,
            name="shifts", marker=dict(size=8, color="rgba(0,0,0,0)"), customdata=clean(v.numpy()), text=names,
            hovertemplate="dy=%{y}, dx=%{x}<br>value=%{customdata:.4f}<br>top-1: %{text}<extra>" + name + "</extra>",
        ), row=1, col=col)
        if current is not None:
            dy, dx = res.shifts[int(current)].tolist()
            fig.add_trace(go.Scatter(x=clean([dx]), y=clean([dy]), mode="markers", name="current shift",
                                     showlegend=col == 1,
                                     marker=dict(symbol="x", size=12, color="white", line=dict(color="black", width=1))),
                          row=1, col=col)
        fig.update_xaxes(title_text="dx (pixels)", row=1, col=col)
        fig.update_yaxes(title_text="dy (pixels)", autorange="reversed", row=1, col=col)
    if value == "prob":
        what = "Probability of the unshifted top-1 class"
        fig.update_layout(coloraxis=dict(colorscale=SEQ, cmin=0, cmax=1, colorbar=dict(title="p")))
    else:
        what = "Where the top-1 flips (1 = differs from the unshifted prediction)"
        fig.update_layout(coloraxis=dict(colorscale=[[0, "#f0f0f0"], [1, BASE_COLOR]], cmin=0, cmax=1,
                                         colorbar=dict(title="flip", tickvals=[0, 1])))
    # hoverdistance -1: a click anywhere in a panel picks the nearest swept shift
    fig.update_layout(title=_title(what, baseline), height=420, margin=dict(t=90), hoverdistance=-1,
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))
    return fig


# --- attention ----------------------------------------------------------------------------------
def _attention_maps(res: SweepResult, layer: str, k: int, align: bool) -> torch.Tensor:
    maps = res.aligned_attention(layer) if align else res.attention[layer]
    return maps[k].float()  # [heads, h, w]


def attention_grid(baseline: SweepResult, anchored: Optional[SweepResult] = None, current: int = 0,
                   layers: Optional[Sequence[str]] = None, heads: str = "mean", align: bool = False,
                   zmax: Optional[float] = None) -> go.Figure:
    """Attention maps at shift ``current``: ``heads='mean'`` → rows = models, columns = layers (+ rollout
    for ViT), each the head mean; ``heads='all'`` → one row per (model, layer), one column per head.
    ``align=True`` rolls each map back into the unshifted frame (``SweepResult.aligned_attention``), so
    an equivariant model shows the same picture at every shift. One colour scale (0..zmax) for all."""
    if heads not in ("mean", "all"):
        raise EquishiftError(f"heads must be 'mean' or 'all', got {heads!r}")
    pairs = _pair(baseline, anchored)
    for name, res in pairs:
        if not res.attention:
            raise EquishiftError(f"the {name} sweep recorded no attention; run it with 'attention' in record=")
    names = list(layers) if layers is not None else list(baseline.attention)
    cells = []  # (row label, column label, map)
    for name, res in pairs:
        for layer in names:
            if layer not in res.attention:
                raise EquishiftError(f"layer {layer!r} not in the {name} sweep; layers: {', '.join(res.attention)}")
            m = _attention_maps(res, layer, current, align)
            if heads == "mean":
                cells.append((name, layer, m.mean(0)))
            else:
                for h in range(m.shape[0]):
                    cells.append((f"{name} · {layer}", f"head {h}", m[h]))
    rows = list(dict.fromkeys(c[0] for c in cells))
    cols = list(dict.fromkeys(c[1] for c in cells))
    top = zmax if zmax is not None else _finite_max([c[2] for c in cells])
    fig = make_subplots(rows=len(rows), cols=len(cols), horizontal_spacing=0.02, vertical_spacing=0.06,
                        subplot_titles=[f"{r} · {c}" if heads == "mean" else f"{r} · {c}" for r in rows for c in cols])
    for r_lab, c_lab, m in cells:
        r, c = rows.index(r_lab) + 1, cols.index(c_lab) + 1
        fig.add_trace(go.Heatmap(z=clean(m.numpy()), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}<br>%{z:.4f}<extra>" + f"{r_lab} {c_lab}</extra>"),
                      row=r, col=c)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_annotations(font_size=10)
    fig.update_layout(coloraxis=dict(colorscale=SEQ, cmin=0, cmax=top, colorbar=dict(title="attention")))
    kinds = sorted(set(baseline.meta.get("attention_kind", {}).values()))
    arch = baseline.meta.get("architecture")
    what = {"cls": "CLS→patch", "received": "mean received per patch",
            "window": "windows: received per window, put back in place", "query": "row of the query token",
            "lsa": "LSA: received, windows assembled", "gsa": "GSA: row of the query token"}  # last two: older sweeps
    what.update({"twins": {"window": what["lsa"], "query": what["gsa"]},
                 "swin": {"window": "W-MSA: received per window, put back in place"},
                 "swin_v2": {"window": "W-MSA: received per window, put back in place"},
                 "pvt_v2": {"query": "spatial-reduction attention: row of the query token"}}.get(arch, {}))
    desc = ", ".join(what.get(k, k) for k in kinds)
    frame = "aligned to the unshifted frame" if align else "as seen (shifted frame)"
    fig.update_layout(title=_title(f"Attention maps at {_shift_text(baseline, current)}, {frame}", baseline,
                                   desc), height=max(300, 190 * len(rows) + 110), margin=dict(t=100))
    return fig


# --- polyphase indices --------------------------------------------------------------------------
def polyphase_panel(result: SweepResult, current: int = 0, path=None) -> go.Figure:
    """For every anchored module: top row, the s×s phase grid with the (row, col) selected at shift
    ``current`` marked; bottom row, the selected flat phase index a·s + b against the shift over the
    orbit (a heatmap over (dy, dx) for 2-D grids, else a line along ``path``)."""
    names = list(result.anchors)
    if not names:
        fig = go.Figure()
        fig.add_annotation(text="This model has no polyphase anchors (it is not anchored).", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper", font_size=16)
        fig.update_layout(title=_title("Polyphase anchor indices", result), height=300)
        return fig
    strides = result.meta.get("anchor_stride", {})
    ys, xs, _ = result.to_grid(torch.zeros(len(result)))
    two_d = len(ys) > 1 and len(xs) > 1
    margins = {r["module"]: r for r in result.anchor_margins(current)}

    def head(n: str) -> str:
        r = margins[n]
        if r["margin"] is None:
            return f"{n} (s={strides.get(n, '?')})"
        tie = " · near-tie: x⁴ key" if r["tie_tol"] is not None and r["margin"] <= r["tie_tol"] else ""
        return f"{n} (s={strides.get(n, '?')})<br>top-2 margin {fmt(r['margin'], '.2g')}{tie}"

    fig = make_subplots(rows=2, cols=len(names), vertical_spacing=0.18,
                        subplot_titles=[head(n) for n in names]
                        + [("index a·s+b over (dy, dx)" if two_d else "index a·s+b along path") for _ in names])
    for c, n in enumerate(names, start=1):
        s = int(strides.get(n, int(result.anchors[n].max()) + 1))
        a, b = result.anchors[n][current].tolist()
        z = np.zeros((s, s))
        z[a, b] = 1
        fig.add_trace(go.Heatmap(z=z, showscale=False, colorscale=[[0, "#eeeeee"], [1, ANCH_COLOR]], zmin=0, zmax=1,
                                 xgap=2, ygap=2, hovertemplate="phase (%{y}, %{x})<extra></extra>"), row=1, col=c)
        fig.add_annotation(text=f"({a}, {b})", x=b, y=a, showarrow=False, font=dict(color="white"), row=1, col=c)
        fig.update_yaxes(autorange="reversed", title_text="row phase a" if c == 1 else None, row=1, col=c)
        fig.update_xaxes(title_text="col phase b", row=1, col=c)
        flat = (result.anchors[n][:, 0] * s + result.anchors[n][:, 1]).float()
        if two_d:
            gy, gx, gz = result.to_grid(flat)
            fig.add_trace(go.Heatmap(x=clean(gx), y=clean(gy), z=clean(gz.numpy()), coloraxis="coloraxis",
                                     hovertemplate="dy=%{y}, dx=%{x}<br>index %{z}<extra>" + n + "</extra>"),
                          row=2, col=c)
            dy, dx = result.shifts[current].tolist()
            fig.add_trace(go.Scatter(x=clean([dx]), y=clean([dy]), mode="markers", showlegend=False, hoverinfo="skip",
                                     marker=dict(symbol="x", size=10, color="white", line=dict(color="black", width=1))),
                          row=2, col=c)
            fig.update_yaxes(autorange="reversed", title_text="dy" if c == 1 else None, row=2, col=c)
            fig.update_xaxes(title_text="dx", row=2, col=c)
        else:
            idx = _path(result, path)
            fig.add_trace(go.Scatter(x=list(range(len(idx))), y=flat[idx].tolist(), mode="lines+markers",
                                     showlegend=False, text=[_shift_text(result, int(k)) for k in idx],
                                     hovertemplate="%{text}: index %{y}<extra>" + n + "</extra>"), row=2, col=c)
            fig.update_xaxes(title_text="step along path", row=2, col=c)
    smax = max(int(strides.get(n, 1)) for n in names)
    fig.update_layout(coloraxis=dict(colorscale="Turbo", cmin=0, cmax=smax * smax - 1, colorbar=dict(title="a·s+b")))
    fig.update_layout(title=_title(f"Polyphase anchor selected per module at {_shift_text(result, current)}, and "
                                   "against the shift", result), height=640, margin=dict(t=130),
                      title_y=0.98, title_yanchor="top")  # two-line panel titles sit under the figure title
    return fig


# --- layer × shift equivariance error ----------------------------------------------------------
def layer_error_map(baseline: SweepResult, anchored: Optional[SweepResult] = None, path=None,
                    current: Optional[int] = None, zmax: Optional[float] = None, log: bool = False) -> go.Figure:
    """Feature equivariance error ||F(Tx) − R_t F(x)|| / ||F(x)|| per layer (rows) and shift (columns,
    along ``path``, default every shift in sweep order), one panel per model, one colour scale.
    ``log=True`` shows log10(error) (floored at 1e-8) so float-noise levels stay visible; exact zeros are
    left blank (NaN) and said to be exactly 0, not drawn as the floor."""
    pairs = _pair(baseline, anchored)
    for name, res in pairs:
        if not res.layer_error:
            raise EquishiftError(f"the {name} sweep recorded no features; run it with 'features' in record=")
    fig = make_subplots(rows=len(pairs), cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[n for n, _ in pairs])
    mats = []
    for name, res in pairs:
        idx = _path(res, path) if path is not None else torch.arange(len(res))
        layers = list(res.layer_error)
        m = torch.stack([res.layer_error[layer][idx] for layer in layers]).double()
        mats.append((name, res, idx, layers, m))
    top = zmax if zmax is not None else _finite_max([m for *_, m in mats])
    zeros = any(bool((m == 0).any()) for *_, m in mats)
    for r, (name, res, idx, layers, m) in enumerate(mats, start=1):
        # log: an exact 0 has no logarithm and must not pass for the floor (1e-8): it is left undrawn (the
        # background shows through) and named in the title and the hover text.
        z = torch.where(m > 0, torch.log10(m.clamp_min(1e-8)), torch.nan) if log else m
        text = [[_shift_text(res, int(k)) + (" · exactly 0" if log and float(m[i, j]) == 0 else "")
                 for j, k in enumerate(idx)] for i in range(len(layers))]
        fig.add_trace(go.Heatmap(z=clean(z.numpy()), y=layers, x=list(range(len(idx))), text=text,
                                 coloraxis="coloraxis",
                                 hovertemplate="%{y} at %{text}<br>error %{z:.3g}<extra>" + name + "</extra>"),
                      row=r, col=1)
        if current is not None:
            where = (idx == int(current)).nonzero()
            if where.numel():
                fig.add_vline(x=int(where[0, 0]), line=dict(color="white", dash="dot"), row=r, col=1)
        # categories and range given, so a panel whose every cell is blank (all exactly 0) keeps its axes
        fig.update_yaxes(autorange="reversed", type="category", categoryorder="array", categoryarray=layers,
                         automargin=True, row=r, col=1)
        fig.update_xaxes(range=[-0.5, len(idx) - 0.5], row=r, col=1)
        if log and bool((m == 0).all()):
            fig.add_annotation(text="every layer exactly 0 at every shift", showarrow=False, x=(len(idx) - 1) / 2,
                               y=layers[len(layers) // 2], row=r, col=1, font=dict(size=13, color="#444"))
    fig.update_xaxes(title_text="shift index (hover: shift)", row=len(pairs), col=1)
    if log:
        fig.update_layout(coloraxis=dict(colorscale="Magma", cmin=-8, cmax=float(np.log10(max(top, 1e-8))),
                                         colorbar=dict(title="log10 error")))
    else:
        fig.update_layout(coloraxis=dict(colorscale="Magma", cmin=0, cmax=top, colorbar=dict(title="rel. error")))
    fig.update_layout(title=_title("Feature equivariance error per layer (re-aligned by token shift / anchors)",
                                   baseline, "blank cells: exactly 0" if log and zeros else ""),
                      height=260 + 140 * len(pairs), margin=dict(t=90))
    return fig


# --- attributions --------------------------------------------------------------------------------
def attribution_overlay(image, maps: Dict[str, torch.Tensor], method: str = "attribution",
                        shift: Tuple[float, float] = (0, 0), mode: str = "circular",
                        scores: Optional[Dict[str, Tuple[float, float]]] = None, opacity: float = 0.55,
                        zmax: Optional[float] = None) -> go.Figure:
    """The (shifted) image with each model's attribution map [H, W] overlaid, one panel per entry of
    ``maps`` ({label: map}), one colour scale (|attribution| from 0 to the largest over all maps).
    ``scores`` {label: (pearson r, top-10% IoU)} of the un-shift-and-compare test go in the panel titles."""
    if not maps:
        raise EquishiftError("attribution_overlay needs at least one map")
    rgb = _np_image(image)
    labels = list(maps)
    absmaps = {k: torch.as_tensor(v).detach().float().abs().cpu() for k, v in maps.items()}
    top = zmax if zmax is not None else _finite_max(list(absmaps.values()))
    titles = []
    for k in labels:
        t = k
        if scores and k in scores:
            r, iou = scores[k]
            t += f"<br>r={fmt(r, '.3f')}, IoU@10%={fmt(iou, '.3f')}"
        titles.append(t)
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=titles, horizontal_spacing=0.04)
    for c, k in enumerate(labels, start=1):
        m = absmaps[k]
        if tuple(m.shape) != rgb.shape[:2]:
            raise EquishiftError(f"map {k!r} is {tuple(m.shape)} but the image is {rgb.shape[:2]}")
        fig.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=1, col=c)
        fig.add_trace(go.Heatmap(z=clean(m.numpy()), coloraxis="coloraxis", opacity=opacity,
                                 hovertemplate="y=%{y}, x=%{x}<br>|attr|=%{z:.3g}<extra>" + k + "</extra>"),
                      row=1, col=c)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{c if c > 1 else ''}", showticklabels=False, row=1, col=c)
        fig.update_xaxes(showticklabels=False, row=1, col=c)
    fig.update_layout(coloraxis=dict(colorscale="Inferno", cmin=0, cmax=top, colorbar=dict(title="|attr|")))
    # The panel titles take two lines above the plots: the figure title is pinned to the top of the
    # canvas and the top margin leaves room for both (they overlapped at t=90).
    fig.update_layout(title=dict(text=f"{method} at {mode} shift (dy={fmt(shift[0])}, dx={fmt(shift[1])})<br><sup>scores: "
                                      f"un-shift the map and compare with the unshifted one (Pearson r, IoU of the "
                                      f"top 10%)</sup>", y=0.95, yanchor="top"),
                      height=470, margin=dict(t=125))
    return fig


# --- the shifted image with its patch grid -------------------------------------------------------
def shifted_image(image, shift: Tuple[float, float] = (0, 0), mode: str = "circular", patch: Optional[int] = None,
                  anchor: Optional[Tuple[int, int]] = None, size: Optional[Tuple[int, int]] = None,
                  title: Optional[str] = None) -> go.Figure:
    """The image shifted by ``shift`` (``equishift.shifts``, same ``mode``/``size``) with the model's fixed
    patch grid (grey, every ``patch`` pixels from the corner) and, if ``anchor`` = (a, b) is given, the
    grid the anchored model actually cuts (blue, offset by the anchor) with its phase cell marked."""
    from .shifts import shift as shift_image

    x = torch.as_tensor(image).detach().float().cpu()
    x = x[None] if x.dim() == 2 else x
    y = shift_image(x, shift[0], shift[1], mode, size)
    rgb = _np_image(y)
    h, w = rgb.shape[:2]
    fig = go.Figure(go.Image(z=rgb, hovertemplate="y=%{y}, x=%{x}<extra></extra>"))
    lines = []
    if patch:
        for v in range(0, w + 1, patch):
            lines.append(dict(type="line", x0=v - 0.5, x1=v - 0.5, y0=-0.5, y1=h - 0.5, line=dict(color="rgba(200,200,200,0.7)", width=1)))
        for v in range(0, h + 1, patch):
            lines.append(dict(type="line", y0=v - 0.5, y1=v - 0.5, x0=-0.5, x1=w - 0.5, line=dict(color="rgba(200,200,200,0.7)", width=1)))
    if anchor is not None and patch:
        a, b = int(anchor[0]), int(anchor[1])
        for v in range(b, w, patch):
            lines.append(dict(type="line", x0=v - 0.5, x1=v - 0.5, y0=-0.5, y1=h - 0.5, line=dict(color=ANCH_COLOR, width=1.5)))
        for v in range(a, h, patch):
            lines.append(dict(type="line", y0=v - 0.5, y1=v - 0.5, x0=-0.5, x1=w - 0.5, line=dict(color=ANCH_COLOR, width=1.5)))
        lines.append(dict(type="rect", x0=b - 0.5, x1=b + 0.5, y0=a - 0.5, y1=a + 0.5, line=dict(color="yellow", width=2)))
    fig.update_layout(shapes=lines)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    grid_txt = f"grey: {patch}-px patch grid" if patch else "no patch grid"
    # on its own line: the figure is often drawn half-page wide, where one line would be cut off
    anc_txt = (f"<br>blue: anchored grid, phase ({anchor[0]}, {anchor[1]})" if anchor is not None and patch else "")
    fig.update_layout(title=title or f"Input at {mode} shift (dy={fmt(shift[0])}, dx={fmt(shift[1])})<br><sup>{grid_txt}{anc_txt}</sup>",
                      height=420, margin=dict(t=85 if anc_txt else 70, l=10, r=10, b=30),
                      title_font_size=13)  # drawn in half a column: plotly's 17 px title would be cut
    return fig
