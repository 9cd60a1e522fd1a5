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

from dataclasses import dataclass
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
    "attribution_overlay", "shifted_image", "default_path", "path_axis", "PathAxis", "phase_colours", "export_width", "FIGURES",
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


# Layout assumptions for figure heights: the dashboard draws a full-width figure ~1400 px wide and a
# half-column one ~700 px; heights are chosen so square maps fill their cells at those widths.
PAGE_WIDTH = 1400
# The one marker for "the current shift": a white × with a black outline on 2-D maps (reads on any colour),
# a dotted vertical line on 1-D axes (black on white, white on a heatmap).
CURRENT_MARKER = dict(symbol="x", size=12, color="white", line=dict(color="black", width=1.5))
CURRENT_LINE = dict(dash="dot", width=1.5)


def export_width(fig: go.Figure) -> int:
    """The width to render ``fig`` at as a file: its own, else the page width for grids of more than two
    panels (the builders size those for ``PAGE_WIDTH``), else kaleido's usual 700 px."""
    if fig.layout.width:
        return int(fig.layout.width)
    panels = sum(1 for k in fig.layout if k.startswith("xaxis"))
    return PAGE_WIDTH if panels > 2 else 700


def _pin_title(fig: go.Figure) -> None:
    """Pin the (two-line) figure title to the top of the canvas, above the subplot titles. The padding
    makes up for plotly placing a multi-line title with yanchor 'top' about one line too high."""
    fig.update_layout(title_y=1, title_yanchor="top", title_pad_t=30)


def _current_cross(x: float, y: float, showlegend: bool = False) -> go.Scatter:
    # meta: where the marker of another shift goes (x = its dx, y = its dy), so a page can move it without
    # rebuilding the figure (the dashboard's live view does, while the shift is dragged)
    return go.Scatter(x=clean([x]), y=clean([y]), mode="markers", name="current shift", showlegend=showlegend,
                      marker=CURRENT_MARKER, hovertemplate="current shift (dy=%{y}, dx=%{x})<extra></extra>",
                      meta={"es_current": {"x": "dx", "y": "dy"}})


def _shift_map(fig: go.Figure, row: int, col: int) -> None:
    """Record in ``layout.meta["es_maps"]`` that subplot (row, col) is a dy × dx map of shifts (x = dx,
    y = dy): a page that draws the current shift itself (the dashboard, from a figure built once per
    sweep with ``current=None``) knows where its marker goes."""
    xref, yref = fig._grid_ref[row - 1][col - 1][0].layout_keys
    meta = dict(fig.layout.meta or {})
    meta["es_maps"] = list(meta.get("es_maps", [])) + [{"xaxis": xref, "yaxis": yref}]
    fig.update_layout(meta=meta)


def _current_line(fig: go.Figure, ax: "PathAxis", current: Optional[int], color: str, row: int, col: int) -> None:
    """The dotted line at the current shift on a 1-D path axis, and in ``layout.meta["es_lines"]`` where
    the line of another shift goes (the path's coordinate; only while the shift stays on the path)."""
    at = ax.x_of(current)
    if at is None:
        return
    fig.add_vline(x=at, line=dict(color=color, **CURRENT_LINE), row=row, col=col, name="current shift")
    if ax.kind == "other":
        return
    xref, yref = fig._grid_ref[row - 1][col - 1][0].layout_keys
    dy, dx = (float(v) for v in ax.shift_of(current))
    on = {"row": {"dy": dy}, "column": {"dx": dx}, "diagonal": "diagonal"}[ax.kind]
    line = {"xaxis": xref, "yaxis": yref, "coord": "dy" if ax.kind == "column" else "dx", "on": on, "color": color}
    meta = dict(fig.layout.meta or {})
    meta["es_lines"] = list(meta.get("es_lines", [])) + [line]
    fig.update_layout(meta=meta)


def _integer_ticks(values: Sequence[float]) -> dict:
    """Axis settings for shift coordinates: integer ticks (every 1, 2 or 4 px, by span) when every value is
    an integer, else plotly's own ticks."""
    v = np.asarray(values, dtype=float)
    if not v.size or not np.all(v == np.round(v)):
        return {}
    span = float(v.max() - v.min())
    step = 1 if span <= 12 else 2 if span <= 24 else 4 if span <= 64 else None
    return dict(tick0=0, dtick=step, tickformat="d") if step else dict(tickformat="d")


@dataclass
class PathAxis:
    """How a path of shift indices is laid on one axis. ``kind``: 'row' (dy fixed, x = dx), 'column'
    (dx fixed, x = dy), 'diagonal' (dy = dx, x = dx), or 'other' (x = k, the k-th shift along the path,
    ticks labelled (dy, dx)). ``idx``: the path's shift indices, sorted by the coordinate (for the first
    three kinds); ``x``: the x value of each; ``title``: the axis title; ``axis``: extra axis settings."""

    kind: str
    idx: torch.Tensor
    x: List[float]
    title: str
    axis: dict

    shifts: Optional[torch.Tensor] = None

    def shift_of(self, k: int) -> torch.Tensor:
        """(dy, dx) of shift index ``k``."""
        return self.shifts[int(k)]

    def x_of(self, k: Optional[int]) -> Optional[float]:
        """x position of shift index ``k`` on this path (None when ``k`` is not on it)."""
        if k is None:
            return None
        where = (self.idx == int(k)).nonzero()
        return self.x[int(where[0, 0])] if where.numel() else None


def path_axis(res: SweepResult, idx: torch.Tensor) -> PathAxis:
    """Detect the kind of path ``idx`` (shift indices of ``res``) from its shifts; see ``PathAxis``."""
    idx = torch.as_tensor(idx).long().reshape(-1)
    s = res.shifts[idx].double()
    dy, dx = s[:, 0], s[:, 1]

    def along(coord: torch.Tensor, kind: str, title: str) -> Optional[PathAxis]:
        if torch.unique(coord).numel() != coord.numel():
            return None  # a repeated shift: no one-to-one coordinate
        order = torch.sort(coord, stable=True).indices
        x = clean(coord[order].tolist())
        return PathAxis(kind, idx[order], x, title, _integer_ticks(x), res.shifts)

    out = None
    if len(idx) and bool((dy == dy[0]).all()):
        out = along(dx, "row", f"dx (px), along the row dy = {fmt(float(dy[0]), 'g')}")
    elif len(idx) and bool((dx == dx[0]).all()):
        out = along(dy, "column", f"dy (px), along the column dx = {fmt(float(dx[0]), 'g')}")
    elif len(idx) and bool((dy == dx).all()):
        out = along(dx, "diagonal", "dy = dx (px), along the diagonal")
    if out is not None:
        return out
    n = len(idx)
    every = max(1, int(np.ceil(n / 12)))
    ticks = list(range(0, n, every))
    return PathAxis("other", idx, list(range(n)), "shift k along the path (ticks: (dy, dx))",
                    dict(tickmode="array", tickvals=ticks,
                         ticktext=[f"({fmt(float(dy[k]), 'g')}, {fmt(float(dx[k]), 'g')})" for k in ticks]),
                    res.shifts)


def _axis_range(x: Sequence[float]) -> List[float]:
    """[first - half a step, last + half a step] for cells centred on the sorted values ``x``."""
    v = np.asarray(x, dtype=float)
    half = 0.5 * (float(np.diff(v).min()) if v.size > 1 else 1.0)
    return [float(v.min()) - half, float(v.max()) + half]


def _square(fig: go.Figure, row: int, col: int) -> None:
    """Make the subplot at (row, col) draw one data unit as long in y as in x (square cells)."""
    sub = fig.get_subplot(row, col)
    fig.update_yaxes(scaleanchor=sub.xaxis.plotly_name.replace("axis", ""), constrain="domain", constraintoward="top",
                     row=row, col=col)
    fig.update_xaxes(constrain="domain", row=row, col=col)


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
    ``current`` (a shift index) is marked where it lies on the path. The x axis is the shift coordinate
    that varies along the path (``path_axis``): dx along a row, dy along a column, dy = dx along the
    diagonal (points sorted by it); any other path is drawn in its own order with (dy, dx) tick labels."""
    if value not in ("prob", "logit"):
        raise EquishiftError(f"value must be 'prob' or 'logit', got {value!r}")
    pairs = _pair(baseline, anchored)
    heads = {int(r.probs.shape[1]) for _, r in pairs}
    shared = len(heads) == 1  # two heads of different sizes share no class index (a 10- and a 3-class model)

    def classes_of(res) -> List[int]:
        if classes is not None:  # those the model has
            return [int(c) for c in classes if 0 <= int(c) < res.probs.shape[1]]
        return sorted({r.ref_pred for _, r in pairs}) if shared else [res.ref_pred]

    fig = make_subplots(rows=1, cols=len(pairs), shared_yaxes=True, subplot_titles=[n for n, _ in pairs])
    lo, hi = (0.0, 1.0) if value == "prob" else (np.inf, -np.inf)
    palette = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    for col, (name, res) in enumerate(pairs, start=1):
        ax = path_axis(res, _path(res, path))
        idx = ax.idx
        vals = (res.probs if value == "prob" else res.logits)[idx]
        hover = [_shift_text(res, int(k)) for k in idx]
        cls = classes_of(res)
        for j, c in enumerate(cls):
            fig.add_trace(go.Scatter(
                x=ax.x, y=clean(vals[:, c].tolist()), mode="lines+markers", name=_class_name(res, c),
                legendgroup=str(c) if shared else f"{col}:{c}", showlegend=col == 1 or not shared,
                line=dict(color=palette[j % len(palette)]),
                text=hover, hovertemplate="%{text}<br>%{y:.4f}<extra>" + _class_name(res, c) + "</extra>",
            ), row=1, col=col)
        if value == "logit" and cls:
            lo, hi = min(lo, float(vals[:, cls].min())), max(hi, float(vals[:, cls].max()))
        at = ax.x_of(current)
        if at is not None:
            s = ax.x.index(at)
            _current_line(fig, ax, current, "black", 1, col)
            fig.add_trace(go.Scatter(x=[at] * len(cls), y=clean([float(vals[s, c]) for c in cls]), mode="markers",
                                     marker=dict(size=11, symbol="circle-open", color="black"),
                                     name="current shift", showlegend=col == 1, hoverinfo="skip"),
                          row=1, col=col)
        fig.update_xaxes(title_text=ax.title, row=1, col=col, **ax.axis)
    if yrange is None:
        if not np.isfinite(lo) or not np.isfinite(hi):  # (no class of the request in either model)
            lo, hi = 0.0, 1.0
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
            fig.add_trace(_current_cross(dx, dy, showlegend=col == 1), row=1, col=col)
        else:
            _shift_map(fig, 1, col)
        fig.update_xaxes(title_text="dx (pixels)", range=_axis_range(xs), row=1, col=col, **_integer_ticks(xs))
        fig.update_yaxes(title_text="dy (pixels)", range=_axis_range(ys)[::-1], row=1, col=col, **_integer_ticks(ys))
        _square(fig, 1, col)
    if value == "prob":
        what = "Probability of the unshifted top-1 class"
        fig.update_layout(coloraxis=dict(colorscale=SEQ, cmin=0, cmax=1, colorbar=dict(title="p")))
    else:
        what = "Where the top-1 flips (1 = differs from the unshifted prediction)"
        fig.update_layout(coloraxis=dict(colorscale=[[0, "#f0f0f0"], [1, BASE_COLOR]], cmin=0, cmax=1,
                                         colorbar=dict(title="flip", tickvals=[0, 1])))
    # hoverdistance -1: a click anywhere in a panel picks the nearest swept shift
    # height: two square maps side by side fill ~1400 px of page width (at ~700 px they shrink, still square)
    fig.update_layout(title=_title(what, baseline), height=560, margin=dict(t=90, b=90), hoverdistance=-1,
                      legend=dict(orientation="h", yanchor="top", y=-0.12, x=0))
    return fig


# --- attention ----------------------------------------------------------------------------------
def _attention_maps(res: SweepResult, layer: str, k: int, align: bool) -> torch.Tensor:
    maps = res.aligned_attention(layer, index=k)[0] if align else res.attention[layer][k]
    return maps.float()  # [heads, h, w]


def attention_grid(baseline: SweepResult, anchored: Optional[SweepResult] = None, current: int = 0,
                   layers: Optional[Sequence[str]] = None, heads: str = "mean", align: bool = False,
                   zmax: Optional[float] = None, head_columns: int = 6, width: Optional[int] = None) -> go.Figure:
    """Attention maps at shift ``current``, every map square, one colour scale (0..zmax) for all.
    ``heads='mean'`` → rows = models, columns = layers (+ rollout for ViT), each the head mean;
    ``heads='all'`` → baseline and anchored side by side (a block of columns each), one row per layer
    with one map per head (at most ``head_columns`` heads to a row, more wrap onto the next), the
    rollout (one map) as a single map per model. ``align=True`` rolls each map back into the unshifted
    frame (``SweepResult.aligned_attention``), so an equivariant model shows the same picture at every
    shift. The height is sized for a page ``width`` px wide (default ``PAGE_WIDTH``, the dashboard's full
    width; given, it is also set as the figure's width, e.g. for a static export)."""
    if heads not in ("mean", "all"):
        raise EquishiftError(f"heads must be 'mean' or 'all', got {heads!r}")
    pairs = _pair(baseline, anchored)
    for name, res in pairs:
        if not res.attention:
            raise EquishiftError(f"the {name} sweep recorded no attention; run it with 'attention' in record=")
    names = list(layers) if layers is not None else list(baseline.attention)
    maps = {}  # (model, layer) -> [heads, h, w]
    for name, res in pairs:
        for layer in names:
            if layer not in res.attention:
                raise EquishiftError(f"layer {layer!r} not in the {name} sweep; layers: {', '.join(res.attention)}")
            maps[name, layer] = _attention_maps(res, layer, current, align)
    cells = []  # (row, col, title, hover label, map)
    if heads == "mean":
        for r, (name, _) in enumerate(pairs, start=1):
            for c, layer in enumerate(names, start=1):
                cells.append((r, c, f"{name} · {layer}", f"{name} {layer}", maps[name, layer].mean(0)))
        n_rows, n_cols, widths, headers = len(pairs), len(names), None, []
    else:
        hc = max(1, min(int(head_columns), max(m.shape[0] for m in maps.values())))
        gap = 1 if len(pairs) > 1 else 0  # a narrow empty column between the two models' blocks
        row = 1
        for layer in names:
            n_h = max(maps[name, layer].shape[0] for name, _ in pairs)
            for g, (name, _) in enumerate(pairs):
                m = maps[name, layer]
                for h in range(m.shape[0]):
                    title = layer if m.shape[0] == 1 else f"{layer} · head {h}"
                    cells.append((row + h // hc, g * (hc + gap) + h % hc + 1, title, f"{name} {title}", m[h]))
            row += -(-n_h // hc)
        n_rows, n_cols = row - 1, len(pairs) * hc + gap * (len(pairs) - 1)
        widths = ([1.0] * hc + [0.35] + [1.0] * hc) if gap else None
        headers = [(name, g * (hc + gap) + 1, g * (hc + gap) + hc) for g, (name, _) in enumerate(pairs)]
    used = {(r, c) for r, c, *_ in cells}
    specs = [[{} if (r, c) in used else None for c in range(1, n_cols + 1)] for r in range(1, n_rows + 1)]
    titles = {(r, c): t for r, c, t, *_ in cells}
    # cell size at the dashboard's full width, capped so a few large maps stay a sensible size
    units = sum(widths) if widths else n_cols
    cell = min(240.0, ((width or PAGE_WIDTH) - 140) / units)
    title_px, top = 34, (130 if headers else 100)
    height = int(top + 40 + n_rows * (cell + title_px))
    fig = make_subplots(rows=n_rows, cols=n_cols, specs=specs, column_widths=widths,
                        horizontal_spacing=min(0.02, 0.2 / max(n_cols, 1)),
                        vertical_spacing=min(title_px / (height - top - 40), 0.3 / max(n_rows - 1, 1)),
                        subplot_titles=[titles[r, c] for r in range(1, n_rows + 1) for c in range(1, n_cols + 1)
                                        if (r, c) in used])
    top_val = zmax if zmax is not None else _finite_max([m for *_, m in cells])
    # one batched add and one layout update: per-subplot update_xaxes/update_yaxes calls cost ~2 ms each
    # (plotly validates every property), 0.2-0.3 s for a dozen maps, on every shift change
    fig.add_traces([go.Heatmap(z=clean(m.numpy()), coloraxis="coloraxis",
                               hovertemplate="row %{y}, col %{x}<br>%{z:.4f}<extra>" + label + "</extra>")
                    for _, _, _, label, m in cells], rows=[r for r, *_ in cells], cols=[c for _, c, *_ in cells])
    axes = {}
    for r, c, _, _, m in cells:
        xk, yk = fig._grid_ref[r - 1][c - 1][0].layout_keys
        h, w = m.shape
        hidden = dict(showticklabels=False, showgrid=False, zeroline=False)
        axes[xk] = dict(range=[-0.5, w - 0.5], constrain="domain", **hidden)
        axes[yk] = dict(range=[h - 0.5, -0.5], scaleanchor=xk.replace("axis", ""), constrain="domain",
                        constraintoward="top", **hidden)
    fig.update_layout(axes)
    fig.update_annotations(font_size=11)
    for name, c0, c1 in headers:  # model names over their blocks of columns
        x0 = fig.get_subplot(1, c0).xaxis.domain[0] if (1, c0) in used else None
        x1 = fig.get_subplot(1, c1).xaxis.domain[1] if (1, c1) in used else None
        doms = [fig.get_subplot(r, c).xaxis.domain for r, c in used if c0 <= c <= c1]
        x0 = min(d[0] for d in doms) if x0 is None else x0
        x1 = max(d[1] for d in doms) if x1 is None else x1
        fig.add_annotation(text=f"<b>{name}</b>", x=(x0 + x1) / 2, xref="paper", y=1, yref="paper",
                           yshift=title_px, yanchor="bottom", showarrow=False, font=dict(size=14))
    fig.update_layout(coloraxis=dict(colorscale=SEQ, cmin=0, cmax=top_val, colorbar=dict(title="attention")))
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
                                   desc), height=height, margin=dict(t=top, b=40, l=30, r=110))
    _pin_title(fig)
    if width:
        fig.update_layout(width=int(width))
    return fig


# --- polyphase indices --------------------------------------------------------------------------
def phase_colours(s: int) -> List[str]:
    """One colour per phase (a, b) of an s×s grid, listed by a·s + b: the hue turns once around the
    colour wheel along the column phase b (cyclic, as b is taken mod s), the lightness steps with the row
    phase a. Phases are categories, so every phase gets its own flat colour (no gradient between them)."""
    import colorsys

    out = []
    for a in range(s):
        light = 0.5 if s == 1 else 0.30 + 0.45 * a / (s - 1)
        for b in range(s):
            r, g, bl = colorsys.hls_to_rgb(b / s, light, 0.8)
            out.append(f"rgb({round(r * 255)},{round(g * 255)},{round(bl * 255)})")
    return out


def _phase_colorscale(s: int) -> list:
    """Step colour scale over the phase codes 0 .. s²-1 (cmin -0.5, cmax s² - 0.5): one flat band each."""
    cols, n = phase_colours(s), s * s
    scale = []
    for i, c in enumerate(cols):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def polyphase_panel(result: SweepResult, current: int = 0, path=None) -> go.Figure:
    """For every anchored module: top row, the s×s phase grid — each phase (a, b) in its colour (the key
    to the colours below) with the phase selected at shift ``current`` outlined and labelled; bottom row,
    the selected phase against the shift over the orbit (a map over (dy, dx) for 2-D grids, else a line
    along ``path`` with the path's shift coordinate on x). Phases are categories: one flat colour per
    (a, b) (``phase_colours``: hue = column phase b, lightness = row phase a), the same (a, b) the same
    colour in every module, and the colour bar names the phases. The colour code of a phase is
    a·S + b with S the largest anchor stride; the hover gives the module's own index a·s + b."""
    names = list(result.anchors)
    if not names:
        fig = go.Figure()
        fig.add_annotation(text="This model has no polyphase anchors (it is not anchored).", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper", font_size=16)
        fig.update_layout(title=_title("Polyphase anchor indices", result), height=300)
        return fig
    strides = {n: int(result.meta.get("anchor_stride", {}).get(n, int(result.anchors[n].max()) + 1)) for n in names}
    big = max(strides.values())
    ys, xs, _ = result.to_grid(torch.zeros(len(result)))
    two_d = len(ys) > 1 and len(xs) > 1
    margins = {r["module"]: r for r in result.anchor_margins(current)}

    def head(n: str) -> str:
        r = margins[n]
        if r["margin"] is None:
            return f"{n} (s={strides[n]})"
        tie = " · near-tie: x⁴ key" if r["tie_tol"] is not None and r["margin"] <= r["tie_tol"] else ""
        return f"{n} (s={strides[n]})<br>top-2 margin {fmt(r['margin'], '.2g')}{tie}"

    phase_ticks = lambda s: dict(tickmode="array", tickvals=list(range(s)), ticktext=[str(v) for v in range(s)],
                                 range=[-0.5, s - 0.5], showgrid=False, zeroline=False)
    fig = make_subplots(rows=2, cols=len(names), vertical_spacing=0.2, horizontal_spacing=min(0.08, 0.5 / max(len(names), 1)),
                        row_heights=[0.4, 0.6],
                        subplot_titles=[head(n) for n in names]
                        + [("selected phase over (dy, dx)" if two_d else "selected phase along the path")
                           for _ in names])
    for c, n in enumerate(names, start=1):
        s = strides[n]
        a, b = result.anchors[n][current].tolist()
        pa, pb = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
        fig.add_trace(go.Heatmap(z=pa * big + pb, coloraxis="coloraxis", xgap=2, ygap=2,
                                 customdata=pa * s + pb,
                                 hovertemplate="phase (%{y}, %{x}): index %{customdata}<extra>" + n + "</extra>"),
                      row=1, col=c)
        fig.add_shape(type="rect", x0=b - 0.5, x1=b + 0.5, y0=a - 0.5, y1=a + 0.5, row=1, col=c,
                      line=dict(color="black", width=3))
        fig.add_annotation(text=f"<b>({a}, {b})</b>", x=b, y=a, showarrow=False, row=1, col=c,
                           font=dict(color="black", size=12), bgcolor="rgba(255,255,255,0.85)")
        fig.update_yaxes(title_text="row phase a", autorange=None, row=1, col=c, **phase_ticks(s))
        fig.update_yaxes(range=[s - 0.5, -0.5], row=1, col=c)
        fig.update_xaxes(title_text="col phase b", row=1, col=c, **phase_ticks(s))
        _square(fig, 1, c)
        code = (result.anchors[n][:, 0] * big + result.anchors[n][:, 1]).float()
        flat = result.anchors[n][:, 0] * s + result.anchors[n][:, 1]
        if two_d:
            gy, gx, gz = result.to_grid(code)
            _, _, gi = result.to_grid(flat.float())
            text = np.array([["" if np.isnan(v) else f"({int(v) // s}, {int(v) % s}), index {int(v)}" for v in row]
                             for row in gi.numpy()])
            fig.add_trace(go.Heatmap(x=clean(gx), y=clean(gy), z=clean(gz.numpy()), coloraxis="coloraxis",
                                     text=text, hovertemplate="dy=%{y}, dx=%{x}<br>phase %{text}<extra>" + n + "</extra>"),
                          row=2, col=c)
            dy, dx = result.shifts[current].tolist()
            fig.add_trace(_current_cross(dx, dy), row=2, col=c)
            fig.update_yaxes(title_text="dy (px)" if c == 1 else None, range=_axis_range(gy)[::-1], row=2, col=c,
                             **_integer_ticks(gy))
            fig.update_xaxes(title_text="dx (px)", range=_axis_range(gx), row=2, col=c, **_integer_ticks(gx))
            _square(fig, 2, c)
        else:
            ax = path_axis(result, _path(result, path))
            idx = ax.idx
            sel = result.anchors[n][idx]
            fig.add_trace(go.Scatter(
                x=ax.x, y=flat[idx].tolist(), mode="lines+markers", showlegend=False, line=dict(color="#999"),
                marker=dict(size=9, color=code[idx].tolist(), coloraxis="coloraxis"),
                text=[f"{_shift_text(result, int(k))}: phase ({p}, {q})" for k, (p, q) in zip(idx.tolist(), sel.tolist())],
                hovertemplate="%{text}, index %{y}<extra>" + n + "</extra>"), row=2, col=c)
            _current_line(fig, ax, current, "black", 2, c)
            fig.update_xaxes(title_text=ax.title, row=2, col=c, **ax.axis)
            fig.update_yaxes(title_text="phase (a, b)" if c == 1 else None, tickmode="array",
                             tickvals=list(range(s * s)), ticktext=[f"({p}, {q})" for p in range(s) for q in range(s)],
                             range=[-0.5, s * s - 0.5], row=2, col=c)
    n_codes = big * big
    every = 1 if n_codes <= 36 else big  # more than 36 phases: label the first of each row phase
    fig.update_layout(coloraxis=dict(
        colorscale=_phase_colorscale(big), cmin=-0.5, cmax=n_codes - 0.5,
        colorbar=dict(title="phase<br>(a, b)", tickmode="array", tickvals=list(range(0, n_codes, every)),
                      ticktext=[f"({v // big}, {v % big})" for v in range(0, n_codes, every)], len=0.9)))
    fig.update_layout(title=_title(f"Polyphase anchor selected per module at {_shift_text(result, current)}, and "
                                   "against the shift", result), height=760, margin=dict(t=140))
    _pin_title(fig)  # two-line panel titles sit under the figure title
    return fig


# --- layer × shift equivariance error ----------------------------------------------------------
def layer_error_map(baseline: SweepResult, anchored: Optional[SweepResult] = None, path=None,
                    current: Optional[int] = None, zmax: Optional[float] = None, log: bool = False,
                    layout: str = "auto", map_columns: int = 6, width: Optional[int] = None) -> go.Figure:
    """Feature equivariance error ||F(Tx) − R_t F(x)|| / ||F(x)|| per layer and shift, one colour scale.

    ``layout='maps'``: one small square dy × dx map per layer (``map_columns`` to a row), a block of rows per
    model, the current shift marked ×. ``'strip'``: one panel per model, layers (rows) × the shifts
    along ``path`` (default every shift in sweep order), the x axis in shift coordinates
    (``path_axis``: dx along a row, dy along a column, dy = dx on the diagonal, else the k-th shift with
    (dy, dx) ticks), the current shift a dotted line. ``'auto'``: maps when no ``path`` is given and the
    sweep covers a 2-D grid of shifts, else the strip.
    ``log=True`` shows log10(error) (floored at 1e-8) so float-noise levels stay visible; exact zeros are
    left blank (NaN) and said to be exactly 0, not drawn as the floor. The maps' height is sized for a
    page ``width`` px wide (default ``PAGE_WIDTH``, the dashboard's full width; given, it is also set as
    the figure's width, e.g. for a static export)."""
    if layout not in ("auto", "maps", "strip"):
        raise EquishiftError(f"layout must be 'auto', 'maps' or 'strip', got {layout!r}")
    pairs = _pair(baseline, anchored)
    for name, res in pairs:
        if not res.layer_error:
            raise EquishiftError(f"the {name} sweep recorded no features; run it with 'features' in record=")
    if layout == "auto":
        ys, xs, _ = baseline.to_grid(torch.zeros(len(baseline)))
        layout = "maps" if path is None and len(ys) > 1 and len(xs) > 1 else "strip"
    if layout == "maps" and path is not None:
        raise EquishiftError("layout='maps' shows every swept shift; drop path= or use layout='strip'")
    mats = []
    for name, res in pairs:
        layers = list(res.layer_error)
        m = torch.stack([res.layer_error[layer] for layer in layers]).double()  # [layers, K]
        mats.append((name, res, layers, m))
    top = zmax if zmax is not None else _finite_max([m for *_, m in mats])
    zeros = any(bool((m == 0).any()) for *_, m in mats)

    def shown(m: torch.Tensor) -> torch.Tensor:
        # log: an exact 0 has no logarithm and must not pass for the floor (1e-8): it is left undrawn (the
        # background shows through) and named in the title and the hover text.
        return torch.where(m > 0, torch.log10(m.clamp_min(1e-8)), torch.nan) if log else m

    if layout == "maps":
        fig = _layer_maps(mats, shown, current, log, max(1, int(map_columns)), width or PAGE_WIDTH)
    else:
        fig = _layer_strips(mats, shown, path, current, log)
    if log:
        fig.update_layout(coloraxis=dict(colorscale="Magma", cmin=-8, cmax=float(np.log10(max(top, 1e-8))),
                                         colorbar=dict(title="log10 error")))
    else:
        fig.update_layout(coloraxis=dict(colorscale="Magma", cmin=0, cmax=top, colorbar=dict(title="rel. error")))
    fig.update_layout(title=_title("Feature equivariance error per layer (re-aligned by token shift / anchors)",
                                   baseline, "blank cells: exactly 0" if log and zeros else ""))
    _pin_title(fig)
    if width:
        fig.update_layout(width=int(width))
    return fig


def _layer_strips(mats, shown, path, current, log) -> go.Figure:
    height = 200 + 200 * len(mats)
    fig = make_subplots(rows=len(mats), cols=1, vertical_spacing=110 / (height - 130),
                        subplot_titles=[n for n, *_ in mats])
    for r, (name, res, layers, m) in enumerate(mats, start=1):
        ax = path_axis(res, _path(res, path) if path is not None else torch.arange(len(res)))
        idx = ax.idx
        mm = m[:, idx]
        text = [[_shift_text(res, int(k)) + (" · exactly 0" if log and float(mm[i, j]) == 0 else "")
                 for j, k in enumerate(idx)] for i in range(len(layers))]
        fig.add_trace(go.Heatmap(z=clean(shown(mm).numpy()), y=layers, x=ax.x, text=text, coloraxis="coloraxis",
                                 hovertemplate="%{y} at %{text}<br>error %{z:.3g}<extra>" + name + "</extra>"),
                      row=r, col=1)
        _current_line(fig, ax, current, "white", r, 1)
        # categories and range given, so a panel whose every cell is blank (all exactly 0) keeps its axes
        fig.update_yaxes(autorange="reversed", type="category", categoryorder="array", categoryarray=layers,
                         automargin=True, row=r, col=1)
        rng = _axis_range(ax.x)
        fig.update_xaxes(range=rng, title_text=ax.title, row=r, col=1, **ax.axis)
        if log and bool((mm == 0).all()):
            fig.add_annotation(text="every layer exactly 0 at every shift", showarrow=False, x=sum(rng) / 2,
                               y=layers[len(layers) // 2], row=r, col=1, font=dict(size=13, color="#444"))
    fig.update_layout(height=height, margin=dict(t=100, b=30))
    return fig


def _layer_maps(mats, shown, current, log, max_cols: int, page: int) -> go.Figure:
    n_layers = max(len(layers) for _, _, layers, _ in mats)
    per = -(-n_layers // max_cols)  # rows per model, then as few columns as fill them evenly
    cols = -(-n_layers // per)
    cell = min(260.0, (page - 200) / cols)
    title_px, top, bottom = 40, 110, 60
    n_rows = per * len(mats)
    height = int(top + bottom + n_rows * (cell + title_px + 12))
    cells = {}
    for g, (name, res, layers, m) in enumerate(mats):
        for i, layer in enumerate(layers):
            cells[g * per + i // cols + 1, i % cols + 1] = (g, i)
    specs = [[{} if (r, c) in cells else None for c in range(1, cols + 1)] for r in range(1, n_rows + 1)]
    titles = [mats[g][2][i] for (r, c), (g, i) in sorted(cells.items())]  # the model: on the left
    fig = make_subplots(rows=n_rows, cols=cols, specs=specs, subplot_titles=titles,
                        horizontal_spacing=min(0.06, 0.3 / cols),
                        vertical_spacing=min((title_px + 12) / (height - top - bottom), 0.3 / max(n_rows - 1, 1)))
    for (r, c), (g, i) in sorted(cells.items()):
        name, res, layers, m = mats[g]
        ys, xs, z = res.to_grid(shown(m[i]))
        _, _, raw = res.to_grid(m[i])
        text = np.array([[("not swept" if np.isnan(v) else f"(dy={fmt(dy, 'g')}, dx={fmt(dx, 'g')})"
                           + (" · exactly 0" if log and v == 0 else "")) for dx, v in zip(xs, row)]
                         for dy, row in zip(ys, raw.numpy())])
        fig.add_trace(go.Heatmap(x=clean(xs), y=clean(ys), z=clean(z.numpy()), text=text, coloraxis="coloraxis",
                                 hovertemplate="%{text}<br>error %{z:.3g}<extra>" + f"{name} · {layers[i]}</extra>"),
                      row=r, col=c)
        if current is not None:
            dy, dx = res.shifts[int(current)].tolist()
            fig.add_trace(_current_cross(dx, dy, showlegend=(r, c) == (1, 1)), row=r, col=c)
        else:
            _shift_map(fig, r, c)
        # ranges given, so a map whose every cell is blank (all exactly 0) keeps its axes
        fig.update_xaxes(range=_axis_range(xs), title_text="dx (px)" if r == n_rows or (r + 1, c) not in cells else None,
                         row=r, col=c, **_integer_ticks(xs))
        fig.update_yaxes(range=_axis_range(ys)[::-1], title_text=f"<b>{name}</b><br>dy (px)" if c == 1 else None,
                         row=r, col=c, **_integer_ticks(ys))
        _square(fig, r, c)
        if log and bool((m[i] == 0).all()):
            fig.add_annotation(text="exactly 0<br>at every shift", showarrow=False, x=float(np.mean(xs)),
                               y=float(np.mean(ys)), row=r, col=c, font=dict(size=12, color="#444"))
    fig.update_xaxes(tickfont_size=9, title_standoff=4)
    fig.update_yaxes(tickfont_size=9, title_standoff=4)
    fig.update_annotations(font_size=11, selector=dict(showarrow=False, xref="paper"))
    fig.update_layout(height=height, margin=dict(t=top, b=bottom), showlegend=current is not None,
                      legend=dict(orientation="h", yanchor="top", y=-0.01, x=0))
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
    # Pixel axes, labelled, ticks every patch (else plotly's own). Margins are fixed (no automargin) and the
    # same with or without a patch grid or an anchor line in the title, so two models' inputs of one size
    # are drawn at one pixel size side by side, whatever their patch or grid.
    step = dict(tick0=0, dtick=patch) if patch and max(h, w) // patch <= 16 else {}
    fig.update_yaxes(autorange=None, range=[h - 0.5, -0.5], scaleanchor="x", constrain="domain", title_text="row (px)", title_font_size=12,
                     title_standoff=2, automargin=False, tickfont_size=10, showgrid=False, zeroline=False, **step)
    fig.update_xaxes(range=[-0.5, w - 0.5], constrain="domain", title_text="column (px)", title_standoff=2, title_font_size=12,
                     automargin=False, tickfont_size=10, showgrid=False, zeroline=False, **step)
    grid_txt = f"grey: {patch}-px patch grid" if patch else "no patch grid"
    # on its own line: the figure is often drawn half-page wide, where one line would be cut off
    anc_txt = (f"<br>blue: anchored grid, phase ({anchor[0]}, {anchor[1]})" if anchor is not None and patch else "")
    fig.update_layout(title=title or f"Input at {mode} shift (dy={fmt(shift[0])}, dx={fmt(shift[1])})<br><sup>{grid_txt}{anc_txt}</sup>",
                      height=420, margin=dict(t=90, l=55, r=10, b=50), title_y=1, title_yanchor="top", title_pad_t=22,
                      title_font_size=13)  # drawn in half a column: plotly's 17 px title would be cut
    return fig
