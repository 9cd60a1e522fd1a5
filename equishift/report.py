"""Comparison report: sweep a baseline/anchored pair on one image and write a self-contained bundle.

CLI::

    python -m equishift sweep --baseline zoo:fmnist-vit-baseline --anchored zoo:fmnist-vit-anchored \\
        --image shirt.png --mode circular --grid period --out report/ [--shift 2,1] [--zip] [--device cpu]

Python (the dashboard's "Download comparison report" button)::

    data = build_report(base_loaded, anch_loaded, pil_image, zip=True, shift=(2, 1),
                        view={"curve_path": "column", "attr_method": "gradcam"},
                        shift_origin="in the dashboard")                          # bytes of a zip
    path = build_report("zoo:a", "zoo:b", "shirt.png", out="report/")            # the folder

Bundle
- ``figures/NAME.png`` and ``figures/NAME.svg`` for every figure (kaleido with the system Chromium; if
  none is available, ``figures/STATIC_EXPORT_UNAVAILABLE.txt`` says why and everything else is written);
- ``report.html``: one comparison table (rows = metrics, columns = baseline | anchored, rounded for
  reading), every figure with a caption (what it shows, the models, mode, grid and shift), and a metadata
  table, plotly.js inline (opens offline); the exact summary and metadata are also embedded as JSON
  (``<script id="equishift-summary">``, ``<script id="equishift-metadata">``);
- ``data/baseline.npz``, ``data/anchored.npz`` (``SweepResult.save``, no pickle), ``data/per_shift.csv``
  (one row per shift), ``data/summary.json`` (metrics of each model over the swept grid, exact);
- ``metadata.json``: specs, model names, weights sha256 (of the state dict, and of the weights file when
  the model card has one), image sha256, mode, the shift grid summarised (label, count, range: every
  shift is a row of ``per_shift.csv``), the shown shift and why, the view choices, versions, device, time.

The view: every figure shows one shift and the dashboard tabs' choices (``VIEW_DEFAULTS``: logit-curve
path and value, attention layers / heads / alignment, layer-error log scale, attribution method and
GradCAM layer). ``shift=(dy, dx)`` picks the shift (the dashboard passes its current one); without it the
report shows the most damaging shift of the grid (``FOCUS_RULE``: where the baseline's probability of its
unshifted top-1 class is lowest) and says so above the figures.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import metrics as M
from . import plots
from .errors import EquishiftError, LimitError
from .formatting import clean, fmt
from .shifts import MODES, grid as shift_grid_xy, period_grid, square_grid
from .sweep import MAX_SHIFTS, SweepResult, sweep

__all__ = ["build_report", "choose_shifts", "summarize", "find_browser", "add_arguments", "run", "ROLES",
           "VIEW_DEFAULTS", "FOCUS_RULE", "resolve_view", "report_stages", "comparison_rows", "path_indices",
           "default_attention_layers"]

ROLES = ("baseline", "anchored")
# kaleido's browser server is a per-process singleton; one export at a time keeps its page use simple.
_EXPORT_LOCK = threading.Lock()


# --- inputs --------------------------------------------------------------------------------------
def _load(model, device):
    if isinstance(model, str):
        from .zoo import load_model

        return load_model(model, device=device)
    if not hasattr(model, "model") or not hasattr(model, "preprocess"):
        raise EquishiftError("models must be specs (e.g. 'zoo:fmnist-vit-baseline') or LoadedModel objects")
    return model


def _image(image) -> Tuple[Any, bytes]:
    """(PIL RGB image, bytes used for its sha256)."""
    from PIL import Image

    from .images import load_image

    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return image.convert("RGB"), buf.getvalue()
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes() if Path(image).is_file() else None
        if data is None:
            from .errors import ImageError

            raise ImageError(f"image file not found: {image}")
        return load_image(data), data
    if isinstance(image, (bytes, bytearray)):
        return load_image(bytes(image)), bytes(image)
    raise EquishiftError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")


def choose_shifts(grid: Union[str, int], stride: int, size: Tuple[int, int]) -> torch.Tensor:
    """The shift grid a report sweeps: ``'period'`` = {0..s-1}² for the models' patch stride s,
    ``'full'`` = every circular shift {0..H-1}×{0..W-1}, an integer R (or its string) = {-R..R}²."""
    if isinstance(grid, str) and grid not in ("period", "full"):
        try:
            grid = int(grid)
        except ValueError:
            raise EquishiftError(f"grid must be 'period', 'full' or a radius R, got {grid!r}") from None
    if grid == "period":
        s = period_grid(stride)
    elif grid == "full":
        s = shift_grid_xy(range(size[0]), range(size[1]))
    else:
        if grid < 0:
            raise EquishiftError(f"the grid radius must be ≥ 0, got {grid}")
        s = square_grid(int(grid))
    if len(s) > MAX_SHIFTS:
        raise LimitError(f"{len(s)} shifts exceed the limit of {MAX_SHIFTS}; choose a smaller grid")
    return s


# --- numbers ---------------------------------------------------------------------------------------
def _est(e: M.Estimate) -> Dict[str, Any]:
    return {"value": e.value, "ci95": [e.low, e.high], "n": e.n, "successes": e.successes}


def summarize(res: SweepResult) -> Dict[str, Any]:
    """Metrics of one sweep over its grid (metrics.md names; rates with Wilson 95% CIs, n = shifts).
    A ``-0.0`` (float noise, its sign differs between CPUs) is returned as ``0.0``."""
    c = res.ref_pred
    min_flip = float(M.minimal_flipping_shift(res.pred, c, res.shifts))
    out: Dict[str, Any] = {
        "shift_mode": res.meta.get("mode"), "shift_range": res.describe(), "num_shifts": len(res),
        "unshifted_top1": c, "unshifted_top1_name": (res.classes or [None] * (c + 1))[c] if res.classes else None,
        "unshifted_top1_prob": float(res.ref_probs[c]),
        "consistency_A_over_grid": _est(M.consistency_a(torch.full((len(res),), c), res.pred)),
        "orbit_consistent": bool((res.pred == c).all()),
        "top1_flips": int((res.pred != c).sum()),
        "minimal_flipping_shift_linf": None if math.isinf(min_flip) else min_flip,
        "mean_absolute_change": M.mean_absolute_change(res.ref_probs, res.probs),
        "kl_mean": float(M.kl_divergence(res.ref_logits, res.logits).mean()),
        "kl_max": float(M.kl_divergence(res.ref_logits, res.logits).max()),
        "logit_variance_top1": float(M.logit_variance(res.logits, c)),
        "min_prob_top1": float(res.probs[:, c].min()),
    }
    if res.layer_error:
        out["feature_equivariance_error_mean"] = {k: float(v.mean()) for k, v in res.layer_error.items()}
        out["feature_equivariance_error_max"] = {k: float(v.max()) for k, v in res.layer_error.items()}
    if res.anchors and res.meta.get("mode") == "circular":
        follow = {}
        for name, idx in res.anchors.items():
            if name in ("patch_embed.anchor", "patch_embeds.0.anchor"):  # on the image: (a0 + δ) mod s, unless tied
                s = res.meta["anchor_stride"][name]
                follow[name] = float(((res.ref_anchors[name] + res.shifts) % s == idx).all(1).double().mean())
        out["image_anchor_follows_shift_fraction"] = follow
    return clean(out)


def _focus(base: SweepResult) -> int:
    return int(base.probs[:, base.ref_pred].argmin())


def _per_shift_rows(pairs: List[Tuple[str, SweepResult]]) -> Tuple[List[str], List[List[Any]]]:
    header = ["dy", "dx"]
    cols = []
    for role, res in pairs:
        c = res.ref_pred
        kl = M.kl_divergence(res.ref_logits, res.logits)
        last = res.layers[-1] if res.layer_error else None
        names = [f"{role}_pred", f"{role}_pred_name", f"{role}_prob_unshifted_top1", f"{role}_flip", f"{role}_kl"]
        vals = [res.pred.tolist(), [(res.classes[p] if res.classes else "") for p in res.pred.tolist()],
                res.probs[:, c].tolist(), (res.pred != c).int().tolist(), kl.tolist()]
        if last is not None:
            names.append(f"{role}_feature_error_{last}")
            vals.append(res.layer_error[last].tolist())
        for name, idx in res.anchors.items():
            names += [f"{role}_anchor_{name}_row", f"{role}_anchor_{name}_col"]
            vals += [idx[:, 0].tolist(), idx[:, 1].tolist()]
        header += names
        cols += vals
    base = pairs[0][1]
    rows = [[*base.shifts[k].tolist(), *[col[k] for col in cols]] for k in range(len(base))]
    return header, clean(rows)


# --- the view: which shift and which tab choices the figures reproduce ---------------------------
CURVE_PATHS = ("row", "column", "diagonal")
ATTR_METHODS = {"saliency": "Saliency |∂f/∂x|", "gradcam": "GradCAM",
                "integrated_gradients": "Integrated gradients (32 steps)"}
# The dashboard's defaults (its tab widgets' initial values): a report built without choices shows what a
# freshly opened dashboard shows. ``att_layers`` None: every layer if there are at most 6, else the last 3.
VIEW_DEFAULTS: Dict[str, Any] = {"curve_path": "row", "curve_value": "prob", "att_layers": None,
                                 "att_heads": "mean", "att_align": True, "err_log": True,
                                 "attr_method": "saliency", "attr_layer": "patch"}
FOCUS_RULE = ("the most damaging shift of the grid: where the baseline's probability of its unshifted "
              "top-1 class is lowest")


def default_attention_layers(layers: Sequence[str]) -> List[str]:
    """The attention layers the dashboard shows until one picks others: all of them up to 6, else the last 3."""
    layers = list(layers)
    return layers if len(layers) <= 6 else layers[-3:]


def resolve_view(view: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``view`` (keys of ``VIEW_DEFAULTS``; missing or None ones take the default) checked and completed."""
    unknown = set(view or {}) - set(VIEW_DEFAULTS)
    if unknown:
        raise EquishiftError(f"unknown view choice(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(VIEW_DEFAULTS)}")
    v = dict(VIEW_DEFAULTS)
    v.update({k: x for k, x in (view or {}).items() if x is not None})
    for key, allowed in (("curve_path", CURVE_PATHS), ("curve_value", ("prob", "logit")),
                         ("att_heads", ("mean", "all")), ("attr_method", tuple(ATTR_METHODS))):
        if v[key] not in allowed:
            raise EquishiftError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {v[key]!r}")
    v["att_align"], v["err_log"] = bool(v["att_align"]), bool(v["err_log"])
    if v["att_layers"] is not None:
        v["att_layers"] = list(v["att_layers"])
    if v["attr_method"] != "gradcam":
        v["attr_layer"] = None  # only GradCAM has a layer
    elif v["attr_layer"] is None:
        v["attr_layer"] = "patch"
    return v


def path_indices(res: SweepResult, shift: Sequence[float], kind: str) -> torch.Tensor:
    """Shift indices of the logit-curve path: the row (dy fixed, dx varies) or the column through ``shift``,
    or the diagonal dy = dx (``plots.default_path``) — the dashboard's curve tab."""
    s = res.shifts
    if kind == "row":
        return (s[:, 0] == shift[0]).nonzero()[:, 0]
    if kind == "column":
        return (s[:, 1] == shift[1]).nonzero()[:, 0]
    return plots.default_path(res)


def _shift_str(shift: Sequence[float]) -> str:
    return f"({fmt(shift[0], 'g')}, {fmt(shift[1], 'g')})"


def _path_text(kind: str, shift: Sequence[float]) -> str:
    if kind == "row":
        return f"the row dy = {fmt(shift[0], 'g')} through the shown shift (dx varies)"
    if kind == "column":
        return f"the column dx = {fmt(shift[1], 'g')} through the shown shift (dy varies)"
    return "the diagonal dy = dx"


def _static_axes(fig) -> None:
    """Axis titles for a page and a PNG: '(hover: …)' means nothing where nothing hovers."""
    import re

    def strip(ax):
        text = ax.title.text if ax.title is not None else None
        if text and "(hover:" in text:
            ax.update(title_text=re.sub(r"\s*\(hover:[^)]*\)", "", text))
    fig.for_each_xaxis(strip)
    fig.for_each_yaxis(strip)


def _path_ticks(fig, res: SweepResult, idx: torch.Tensor, title: str) -> None:
    """Tick labels (dy, dx) on a figure whose x axis is the step along a path of shifts."""
    n = len(idx)
    every = max(1, math.ceil(n / 12))
    steps = list(range(0, n, every))
    fig.update_xaxes(tickmode="array", tickvals=steps,
                     ticktext=[_shift_str(res.shifts[int(idx[s])].tolist()) for s in steps], title_text=title)


# --- figures -----------------------------------------------------------------------------------
def _figures(loaded: Dict[str, Any], res: Dict[str, SweepResult], x: Dict[str, torch.Tensor], mode: str,
             size, k: int, view: Dict[str, Any], context: str,
             progress: Optional[Callable[[str, int, int], None]] = None,
             skipped: Optional[List[Dict[str, str]]] = None) -> List[Tuple[str, str, Any, str]]:
    """(name, heading, figure, caption) of every figure, all at shift index ``k`` with ``view``'s choices.
    ``context`` (models, mode, grid, shift) ends every caption. With ``skipped`` (a list), a figure whose
    builder raises EquishiftError is left out and listed there with the reason; without, it raises."""
    from .attribution import METHODS, compare

    base, anch = res["baseline"], res["anchored"]
    shift = base.shifts[k].tolist()
    dy, dx = shift
    at = f"shift (dy, dx) = {_shift_str(shift)}"
    plan: List[Tuple[str, str, Callable[[], Any], str]] = []

    for role in ROLES:
        def make_input(role=role):
            r, lm = res[role], loaded[role]
            first = [n for n in r.anchors if n in ("patch_embed.anchor", "patch_embeds.0.anchor")]
            anchor = tuple(r.anchors[first[0]][k].tolist()) if first else None
            return plots.shifted_image(lm.denormalize(x[role][0].cpu()), (dy, dx), mode, patch=lm.stride,
                                       anchor=anchor, size=size)
        anchored_grid = bool([n for n in res[role].anchors if n in ("patch_embed.anchor", "patch_embeds.0.anchor")])
        plan.append((f"input_{role}", f"{role.capitalize()} model's input", make_input,
                     f"The image as the {role} model sees it at {at}, with the model's fixed "
                     f"{loaded[role].stride}-px patch grid in grey"
                     + (" and, in blue, the grid the anchored model actually cuts (offset by its anchor)."
                        if anchored_grid else ".")))

    idx = path_indices(base, shift, view["curve_path"])
    marked = bool((idx == k).any())
    what = "probability" if view["curve_value"] == "prob" else "logit"

    def make_curve():
        fig = plots.logit_curve(base, anch, path=idx, current=k, value=view["curve_value"])
        _path_ticks(fig, base, idx, "shift (dy, dx) along the path")
        return fig
    plan.append(("logit_curve", f"Per-shift {what} along a path", make_curve,
                 f"The {what} of each model's unshifted top-1 class along {_path_text(view['curve_path'], shift)}; "
                 "left: baseline, right: anchored (one y scale). "
                 + ("The shown shift is marked by the dotted line and the open circles."
                    if marked else "The shown shift is off this path, so it is not marked.")))
    plan.append(("orbit_probability", "Probability over the orbit",
                 lambda: plots.orbit_heatmap(base, anch, "prob", current=k),
                 "The probability of each model's unshifted top-1 class at every swept shift (rows dy, columns "
                 "dx); × marks the shown shift."))
    plan.append(("orbit_flips", "Top-1 flips over the orbit",
                 lambda: plots.orbit_heatmap(base, anch, "flip", current=k),
                 "1 where the model's top-1 differs from its unshifted top-1, 0 where it holds, at every swept "
                 "shift (rows dy, columns dx); × marks the shown shift."))
    if base.attention and anch.attention:
        layers = view["att_layers"] if view["att_layers"] is not None else default_attention_layers(base.attention)
        missing = [layer for layer in layers if layer not in base.attention]
        if missing:
            raise EquishiftError(f"attention layer(s) {', '.join(missing)} not in the baseline sweep; "
                                 f"layers: {', '.join(base.attention)}")
        both = all(layer in anch.attention for layer in layers)
        if layers:
            align = view["att_align"]
            plan.append(("attention_aligned" if align else "attention_as_seen", "Attention maps",
                         lambda: plots.attention_grid(base, anch if both else None, current=k, layers=layers,
                                                      heads=view["att_heads"], align=align),
                         f"Attention maps at the shown shift, layer{'s' if len(layers) > 1 else ''} "
                         f"{', '.join(layers)}; " + ("the mean over heads" if view["att_heads"] == "mean"
                                                     else "every head")
                         + (", rolled back into the unshifted frame (an equivariant model shows the same "
                            "picture at every shift)" if align else ", as seen in the shifted frame")
                         + ("; rows: baseline, anchored (one colour scale)." if both else
                            "; the baseline only (the anchored model has different layers).")))
    def make_polyphase():
        fig = plots.polyphase_panel(anch, current=k)
        if anch.anchors:  # whole-number ticks: phases and shifts are integers (no 0.5 between them)
            fig.update_xaxes(dtick=1, row=1)
            fig.update_yaxes(dtick=1, row=1)
            span = max(int(anch.shifts[:, 0].max() - anch.shifts[:, 0].min()),
                       int(anch.shifts[:, 1].max() - anch.shifts[:, 1].min()), 1)
            fig.update_xaxes(dtick=max(1, math.ceil(span / 8)), row=2)
            fig.update_yaxes(dtick=max(1, math.ceil(span / 8)), row=2)
        return fig
    plan.append(("polyphase_anchored", "Polyphase anchors of the anchored model", make_polyphase,
                 "For every anchored module of the anchored model: the phase (a, b) it selects at the shown "
                 "shift (top) and its flat index a·s+b at every swept shift (bottom; × the shown shift)."))
    if base.layer_error and anch.layer_error:
        log = view["err_log"]

        def make_error():
            return plots.layer_error_map(base, anch, current=k, log=log)
        plan.append(("layer_error", "Feature equivariance error per layer", make_error,
                     "The relative feature equivariance error ||F(Tx) − R F(x)|| / ||F(x)|| at every swept "
                     "shift, one dy × dx map per layer" + (" on a log10 scale (blank: exactly 0)"
                                                           if log else " on a linear scale")
                     + "; top row: baseline, bottom row: anchored; × marks the shown shift."))
    method, layer = view["attr_method"], view["attr_layer"]
    label = ATTR_METHODS[method] + (f" (layer {layer})" if method == "gradcam" else "")

    def make_attr():
        fn = METHODS[method]
        kwargs = {"layer": None if layer == "patch" else layer} if method == "gradcam" else {}
        display = loaded["baseline"].denormalize(plots_input(x["baseline"], (dy, dx), mode, size)[0].cpu())
        maps, scores = {}, {}
        for role in ROLES:
            lm = loaded[role]
            ref = fn(lm.model, x[role], shift=(0, 0), mode=mode, size=size, **kwargs)
            att = fn(lm.model, x[role], shift=(dy, dx), mode=mode, size=size, target=ref.target, **kwargs)
            maps[role] = att.map
            scores[role] = compare(att, ref)
        return plots.attribution_overlay(display, maps, method=label, shift=(dy, dx), mode=mode, scores=scores)
    plan.append((f"attribution_{method}", f"Attribution: {label}", make_attr,
                 f"{label} of each model's unshifted top-1 class at the shown shift, over the shifted input; "
                 "r and IoU@10%: the map rolled back by the shift against the unshifted map (1 = the "
                 "explanation moves with the image)."))

    out = []
    for i, (name, heading, make, caption) in enumerate(plan):
        if progress is not None:
            progress("figures", i, len(plan))
        try:
            fig = make()
        except EquishiftError as e:  # one view choice that cannot be drawn (e.g. GradCAM on a layer the
            if skipped is None:      # score never reads) must not cost the rest of the report
                raise
            skipped.append({"figure": name, "heading": heading, "reason": str(e)})
            continue
        _static_axes(fig)
        out.append((name, heading, fig, f"{caption} {context}"))
    if progress is not None:
        progress("figures", len(plan), len(plan))
    return out


def plots_input(x: torch.Tensor, shift: Tuple[float, float], mode: str, size) -> torch.Tensor:
    """The shifted model input (1, C, H, W) the figures show."""
    from .shifts import shift as shift_image

    return shift_image(x[0], shift[0], shift[1], mode, size)[None]


def find_browser() -> Optional[str]:
    """The Chrome/Chromium executable kaleido would start for PNG/SVG export, or None when there is none.

    Found the way kaleido finds it (choreographer: ``$BROWSER_PATH`` first, then the PATH and the usual
    install locations), so ``BROWSER_PATH=/nonexistent`` makes a machine look browserless. Check this
    before exporting: kaleido does not report a missing browser — its server starts, the server's
    thread dies, and the first ``to_image`` then waits forever."""
    try:
        from choreographer.browsers.chromium import Chromium

        path = Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - choreographer missing or changed: the plain search
        path = os.environ.get("BROWSER_PATH") or next(
            (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
    return str(path) if path and Path(path).is_file() and os.access(path, os.X_OK) else None


def _export_static(figs: Dict[str, Any], folder: Path,
                   progress: Optional[Callable[[str, int, int], None]] = None) -> Optional[str]:
    """Write PNG and SVG of every figure; returns None, or why static export was impossible.
    ``progress("static export", done, total)`` after each figure."""
    try:
        import kaleido

        if find_browser() is None:
            raise RuntimeError("no Chrome or Chromium browser found (kaleido renders PNG/SVG with one)")
        with _EXPORT_LOCK:
            kaleido.start_sync_server(silence_warnings=True)
            for i, (name, fig) in enumerate(figs.items()):
                if progress is not None:
                    progress("static export", i, len(figs))
                width = plots.export_width(fig)
                (folder / f"{name}.png").write_bytes(fig.to_image(format="png", scale=2, width=width))
                (folder / f"{name}.svg").write_bytes(fig.to_image(format="svg", width=width))
        if progress is not None:
            progress("static export", len(figs), len(figs))
        return None
    except Exception as e:  # noqa: BLE001 - no Chromium, sandbox trouble...: the rest of the bundle stays
        for p in folder.glob("*.png"):
            p.unlink()
        for p in folder.glob("*.svg"):
            p.unlink()
        return f"{type(e).__name__}: {e}"


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{fmt(100 * v, '.1f')}%"


def _num(v: Optional[float]) -> str:
    return "—" if v is None else fmt(v, ".3g")


def _class_at(res: SweepResult, c: int) -> str:
    return res.classes[c] if res.classes and 0 <= c < len(res.classes) else f"class {c}"


def comparison_rows(summary: Dict[str, Dict[str, Any]], res: Dict[str, SweepResult], k: int) -> List[Tuple[str, List[str]]]:
    """The report's comparison table: (metric, [baseline, anchored]) rounded for reading (percentages to
    0.1, 95% CIs as [lo, hi], other numbers to 3 significant digits). summary.json keeps them exact."""
    shift = _shift_str(res["baseline"].shifts[k].tolist())
    rows: List[Tuple[str, List[str]]] = []

    def row(label, fn):
        rows.append((label, [fn(summary[role], res[role]) for role in ROLES]))

    def ci(e):
        lo, hi = e["ci95"]
        return f"{_pct(e['value'])} [{fmt(100 * lo, '.1f')}, {fmt(100 * hi, '.1f')}]"

    row("model", lambda s, r: s["spec"])
    row("unshifted top-1 (probability)", lambda s, r: f"{_class_at(r, s['unshifted_top1'])} "
                                                      f"({_pct(s['unshifted_top1_prob'])})")
    row(f"top-1 at the shown shift {shift} (its probability)",
        lambda s, r: f"{_class_at(r, int(r.pred[k]))} ({_pct(float(r.probs[k, int(r.pred[k])]))})")
    row(f"probability of the unshifted top-1 at {shift}", lambda s, r: _pct(float(r.probs[k, r.ref_pred])))
    row("consistency A over the grid [95% CI]", lambda s, r: ci(s["consistency_A_over_grid"]))
    row("top-1 flips", lambda s, r: f"{s['top1_flips']} of {s['num_shifts']} shifts")
    row("smallest flipping shift (L∞, px)", lambda s, r: "none" if s["minimal_flipping_shift_linf"] is None
        else fmt(s["minimal_flipping_shift_linf"], "g"))
    row("lowest probability of the unshifted top-1", lambda s, r: _pct(s["min_prob_top1"]))
    row("mean absolute change of that probability (points)", lambda s, r: _pct(s["mean_absolute_change"]))
    row("KL(unshifted ‖ shifted): mean / max", lambda s, r: f"{_num(s['kl_mean'])} / {_num(s['kl_max'])}")
    row("variance of the top-1 logit over the grid", lambda s, r: _num(s["logit_variance_top1"]))
    if all("feature_equivariance_error_mean" in summary[role] for role in ROLES):
        row("feature equivariance error, last layer, mean over shifts",
            lambda s, r: _num(s["feature_equivariance_error_mean"].get(r.layers[-1] if r.layers else "", None)))
        row("feature equivariance error, max over layers and shifts",
            lambda s, r: _num(max(s["feature_equivariance_error_max"].values(), default=None)))
    if any("image_anchor_follows_shift_fraction" in summary[role] for role in ROLES):
        row("image anchor follows the shift", lambda s, r: _pct(next(iter(
            s.get("image_anchor_follows_shift_fraction", {}).values()), None)))
    return rows


def _meta_rows(meta: Dict[str, Any]) -> List[Tuple[str, Optional[str], str]]:
    """(section, key, text) rows of the metadata table: what a reader scans; metadata.json has it all."""
    sh = meta["shifts"]
    v = meta["view"]
    rows: List[Tuple[str, Optional[str], str]] = [
        ("shifts", "mode", meta["mode"]),
        ("shifts", "grid", f"{sh['grid']}: {sh['count']} shifts, {sh['range']} (every shift: {sh['list']})"),
        ("shifts", "shown shift (dy, dx)", f"{_shift_str(meta['shift'])}, {meta['shift_origin']}"),
        ("view", "logit curves", f"{'probability' if v['curve_value'] == 'prob' else 'logit'} along "
                                 f"{_path_text(v['curve_path'], meta['shift'])}"),
        ("view", "attention", ("layers " + ", ".join(v["att_layers"]) if v["att_layers"] else "no layer")
         + f"; heads: {v['att_heads']}; " + ("aligned to the unshifted frame" if v["att_align"] else "as seen")),
        ("view", "layer error", "log10 scale" if v["err_log"] else "linear scale"),
        ("view", "attribution", ATTR_METHODS[v["attr_method"]]
         + (f", layer {v['attr_layer']}" if v["attr_method"] == "gradcam" else "")),
    ]
    for role in ROLES:
        m = meta[role]
        rows += [(role, "spec", m["spec"]), (role, "name", m["name"]), (role, "anchoring", str(m["anchoring"])),
                 (role, "patch stride", f"{m['stride']} px"), (role, "state dict sha256", m["state_dict_sha256"]),
                 (role, "weights file sha256", m["weights_file_sha256"] or "—")]
        if m["untrained"]:
            rows.append((role, "untrained", "yes: random weights"))
    c, h, w = meta["model_input_size"]
    rows += [("image", "sha256", meta["image_sha256"]),
             ("image", "size", f"{meta['image_size'][0]}×{meta['image_size'][1]} (H×W)"),
             ("image", "model input", f"{c}×{h}×{w}" + (f", crop margin {meta['crop_margin']} px"
                                                         if meta["crop_margin"] else "")),
             ("run", "created (UTC)", meta["created"]), ("run", "device", meta["device"]),
             ("run", "PNG/SVG figures", meta["static_export"]),
             ("run", "versions", " · ".join(f"{k} {x}" for k, x in meta["versions"].items() if k != "platform")),
             ("run", "platform", meta["versions"].get("platform", "?"))]
    return rows


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:14px;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "thead th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
        "th.section{background:#fafafa;color:#555;font-weight:600}code{font-size:12px;word-break:break-all}"
        "figure{margin:1.5em 0 2.5em}figcaption{font-size:14px;color:#333;margin-top:0.4em;line-height:1.4}"
        ".view{background:#f6f8fa;border-left:4px solid #1f77b4;padding:0.6em 1em}")


def _html(figs: List[Tuple[str, str, Any, str]], summary: Dict[str, Any], meta: Dict[str, Any],
          rows: List[Tuple[str, List[str]]]) -> str:
    from html import escape

    from plotly.offline import get_plotlyjs

    b, a = meta["baseline"], meta["anchored"]
    sh = meta["shifts"]
    table = ["<table class='comparison'><thead><tr><th>metric</th><th>baseline</th><th>anchored</th></tr></thead>"
             "<tbody>"]
    for label, vals in rows:
        table.append(f"<tr><th>{escape(label)}</th>" + "".join(f"<td class='num'>{escape(v)}</td>" for v in vals)
                     + "</tr>")
    table.append("</tbody></table>")
    meta_table = ["<table class='metadata'><tbody>"]
    section = None
    for sec, key, text in _meta_rows(meta):
        if sec != section:
            meta_table.append(f"<tr><th class='section' colspan='2'>{escape(sec)}</th></tr>")
            section = sec
        cell = f"<code>{escape(text)}</code>" if "sha256" in (key or "") else escape(text)
        meta_table.append(f"<tr><th>{escape(key or '')}</th><td>{cell}</td></tr>")
    meta_table.append("</tbody></table>")
    sep = "," if meta["shift_origin"].startswith("chosen") else ":"
    shown = (f"All figures show <b>shift (dy, dx) = {escape(_shift_str(meta['shift']))}</b>{sep} "
             f"{escape(meta['shift_origin'])}.")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>equishift comparison report</title>",
        f"<style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        "<h1>equishift comparison report</h1>",
        f"<p><b>baseline</b> {escape(b['spec'])} vs <b>anchored</b> {escape(a['spec'])} — "
        f"{escape(meta['mode'])} shifts over the {escape(sh['grid'])} grid: {sh['count']} shifts, "
        f"{escape(sh['range'])}.</p>",
        f"<p class='view'>{shown}</p>",
        "<h2>Summary</h2>",
        "<p>Rates over the swept grid with Wilson 95% confidence intervals; exact values in "
        "<code>data/summary.json</code>, per shift in <code>data/per_shift.csv</code>.</p>",
        "".join(table),
        "<h2>Figures</h2>",
        f"<p class='view'>{shown}</p>",
    ]
    for i, (name, heading, fig, caption) in enumerate(figs, start=1):
        parts += [f"<figure id='{escape(name)}'><h3>Figure {i}. {escape(heading)}</h3>",
                  fig.to_html(full_html=False, include_plotlyjs=False),
                  f"<figcaption><b>Figure {i}.</b> {escape(caption)}</figcaption></figure>"]
    for item in meta.get("figures_not_drawn") or []:
        parts.append(f"<p class='not-drawn'><b>Not drawn: {escape(item['heading'])}</b> — "
                     f"{escape(item['reason'])}</p>")
    parts += ["<h2>Metadata</h2>", "".join(meta_table),
              "<script type='application/json' id='equishift-summary'>"
              f"{json.dumps(clean(summary), ensure_ascii=False)}</script>",
              "<script type='application/json' id='equishift-metadata'>"
              f"{json.dumps(clean(meta), default=str, ensure_ascii=False)}</script>",
              "</body></html>"]
    return "\n".join(parts)


# --- metadata ------------------------------------------------------------------------------------
def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("equishift", "torch", "timm", "numpy", "plotly", "kaleido", "captum"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- the report ----------------------------------------------------------------------------------
def report_stages(sweeps: bool = True, static: bool = True) -> List[str]:
    """The stages ``build_report`` reports to ``progress``, in order: ``sweep baseline`` and ``sweep
    anchored`` (unless sweeps are passed in), ``figures``, ``static export`` (with ``static``), ``files``."""
    return ([f"sweep {role}" for role in ROLES] if sweeps else []) + ["figures"] + \
        (["static export"] if static else []) + ["files"]


def build_report(baseline, anchored, image, out: Optional[Union[str, Path]] = None, *, mode: str = "circular",
                 grid: Union[str, int] = "period", device: Optional[str] = None, zip: bool = False,
                 progress: Optional[Callable[[str, int, int], None]] = None, static: bool = True,
                 results: Optional[Sequence[SweepResult]] = None, shift: Optional[Sequence[float]] = None,
                 view: Optional[Dict[str, Any]] = None, shift_origin: Optional[str] = None) -> Union[Path, bytes]:
    """Sweep ``baseline`` and ``anchored`` (specs or ``LoadedModel``) on ``image`` (path, bytes or PIL)
    and write the bundle (module doc) to ``out``.

    Returns the folder; with ``zip=True`` the path of ``out`` + ``.zip`` (the folder is written too), or,
    when ``out`` is None, the zip's bytes. ``results`` = (baseline, anchored) SweepResults already computed
    on this image and mode (the dashboard's cached sweeps) skip the sweeps; their shifts are used and
    ``grid`` is only a label (for crop sweeps the canvas margin is the largest |shift|). ``static=False``
    skips PNG/SVG.

    The view the figures reproduce: ``shift`` (dy, dx), one of the swept shifts (default: the most
    damaging one, ``FOCUS_RULE``), said to be chosen ``shift_origin`` (e.g. ``"in the dashboard"``);
    ``view``: the tab choices (``VIEW_DEFAULTS`` keys: ``curve_path`` row|column|diagonal, ``curve_value``
    prob|logit, ``att_layers``, ``att_heads`` mean|all, ``att_align``, ``err_log``, ``attr_method``
    saliency|gradcam|integrated_gradients, ``attr_layer``; missing ones take the dashboard's defaults).

    ``progress(stage, done, total)`` is called as each stage (``report_stages``) advances, ``done`` rising
    from 0 to ``total`` within a stage."""
    if mode not in MODES:
        raise EquishiftError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode in ("bilinear", "fourier"):
        raise EquishiftError("reports sweep integer shift grids; use mode circular, zero, reflect or crop")
    if out is None and not zip:
        raise EquishiftError("give an output folder, or zip=True to get the bundle as bytes")
    choices = resolve_view(view)
    loaded = {"baseline": _load(baseline, device), "anchored": _load(anchored, device)}
    pil, raw = _image(image)
    stride = max(lm.stride for lm in loaded.values())
    c, h, w = loaded["baseline"].input_size
    if tuple(loaded["anchored"].input_size[1:]) != (h, w):
        raise EquishiftError(f"the two models take different input sizes ({h}x{w} vs "
                             f"{loaded['anchored'].input_size[1]}x{loaded['anchored'].input_size[2]})")
    # Results passed in (the dashboard's cached sweeps) define the grid; ``grid`` is then only a label.
    shifts = choose_shifts(grid, stride, (h, w)) if results is None else results[0].shifts
    if shift is not None:
        if len(shift) != 2:
            raise EquishiftError(f"shift must be (dy, dx), got {shift!r}")
        hit = ((shifts[:, 0] == shift[0]) & (shifts[:, 1] == shift[1])).nonzero()
        if hit.numel() == 0:
            from .sweep import describe_shifts

            raise EquishiftError(f"shift (dy={fmt(shift[0], 'g')}, dx={fmt(shift[1], 'g')}) is not in the "
                                 f"swept grid ({describe_shifts(shifts)})")
    size = (h, w) if mode == "crop" else None
    margin = int(shifts.abs().max()) if mode == "crop" else 0
    x = {role: lm.preprocess(pil, margin=margin) for role, lm in loaded.items()}

    res: Dict[str, SweepResult] = {}
    for i, role in enumerate(ROLES):
        if results is not None:
            res[role] = results[i]
            continue
        cb = (lambda d, t, role=role: progress(f"sweep {role}", d, t)) if progress is not None else None
        r = sweep(loaded[role], x[role], shifts, mode, progress=cb, size=size)
        r.meta["label"] = role
        res[role] = r
    if not torch.equal(res["baseline"].shifts, res["anchored"].shifts):
        raise EquishiftError("the baseline and anchored sweeps cover different shifts")

    summary = {role: {"spec": loaded[role].spec, "name": loaded[role].name, **summarize(res[role])} for role in ROLES}
    if shift is None:
        k = _focus(res["baseline"])
        origin = ("no shift was given, so the report shows " + FOCUS_RULE + " (baseline probability "
                  f"{_pct(float(res['baseline'].probs[k, res['baseline'].ref_pred]))})")
    else:
        k = res["baseline"].index_of(*shift)
        origin = f"chosen {shift_origin}" if shift_origin else "chosen by the caller"
    shown = res["baseline"].shifts[k].tolist()
    if choices["att_layers"] is None and res["baseline"].attention:
        choices["att_layers"] = default_attention_layers(res["baseline"].attention)
    from .sweep import describe_shifts

    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "grid": str(grid), "shift_range": res["baseline"].describe(), "num_shifts": len(shifts),
        # a summary a reader can scan; every shift is a row of data/per_shift.csv (and in the .npz files)
        "shifts": {"grid": str(grid), "count": len(shifts),
                   "range": describe_shifts(shifts).rsplit(" (", 1)[0], "list": "data/per_shift.csv (dy, dx)"},
        "shift": shown, "shift_origin": origin, "view": choices,
        "image_sha256": hashlib.sha256(raw).hexdigest(), "image_size": list(pil.size[::-1]),
        "model_input_size": [c, h, w], "crop_margin": margin,
        "device": str(next(loaded["baseline"].model.parameters()).device),
        "versions": _versions(),
    }
    for role in ROLES:
        lm = loaded[role]
        meta[role] = {"spec": lm.spec, "name": lm.name, "anchoring": lm.card.get("anchoring", "none"),
                      "state_dict_sha256": _state_sha256(lm.model),
                      "weights_file_sha256": lm.card.get("weights_sha256"), "stride": lm.stride,
                      "untrained": bool(lm.card.get("untrained", False))}
    context = (f"Models: baseline {lm_label(loaded['baseline'])}, anchored {lm_label(loaded['anchored'])}. "
               f"{mode.capitalize()} shifts, {meta['shifts']['grid']} grid ({len(shifts)} shifts, "
               f"{meta['shifts']['range']}); shown shift (dy, dx) = {_shift_str(shown)}.")

    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="equishift-report-")
        folder = Path(tmp) / "equishift-report"
    else:
        folder = Path(out)
    try:
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        skipped: List[Dict[str, str]] = []
        figs = _figures(loaded, res, x, mode, size, k, choices, context, progress, skipped=skipped)
        meta["figures_not_drawn"] = skipped
        problem = (_export_static({name: fig for name, _, fig, _ in figs}, folder / "figures", progress)
                   if static else "static export not requested")
        if problem is not None:
            why = ("" if not static else "\nThey need Chromium for kaleido (Debian: apt-get install chromium).")
            (folder / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt").write_text(
                "PNG/SVG figures were not written: " + problem + why
                + "\nreport.html has every figure and opens offline.\n")
        meta["static_export"] = "ok" if problem is None else problem
        steps = 3 + (1 if zip else 0)
        if progress is not None:
            progress("files", 0, steps)
        rows = comparison_rows(summary, res, k)
        (folder / "report.html").write_text(_html(figs, summary, meta, rows), encoding="utf-8")
        if progress is not None:
            progress("files", 1, steps)
        for role in ROLES:
            res[role].save(folder / "data" / f"{role}.npz")
        header, per_shift = _per_shift_rows([(role, res[role]) for role in ROLES])
        with open(folder / "data" / "per_shift.csv", "w", newline="", encoding="utf-8") as f:
            wr = csv.writer(f)
            wr.writerow(header)
            wr.writerows(per_shift)
        if progress is not None:
            progress("files", 2, steps)
        (folder / "data" / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
        (folder / "metadata.json").write_text(json.dumps(meta, indent=2, default=str, ensure_ascii=False),
                                              encoding="utf-8")
        if progress is not None:
            progress("files", 3, steps)
        if not zip:
            return folder
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, Path(folder.name) / p.relative_to(folder))
        if progress is not None:
            progress("files", 4, steps)
        if out is None:
            return buf.getvalue()
        target = folder.with_name(folder.name + ".zip")
        target.write_bytes(buf.getvalue())
        return target
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def lm_label(lm) -> str:
    """A model as captions name it: its spec, and its name where the spec does not already say it."""
    return lm.spec if not lm.name or str(lm.spec).endswith(str(lm.name)) else f"{lm.spec} ({lm.name})"


# --- CLI -----------------------------------------------------------------------------------------
def parse_shift(text: str) -> Tuple[int, int]:
    """``'DY,DX'`` (e.g. ``'2,1'`` or ``'-1,3'``) → (dy, dx)."""
    try:
        dy, dx = (int(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift takes DY,DX (two integers, e.g. 2,1), got {text!r}") from None
    return dy, dx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", required=True, help="model spec, e.g. zoo:fmnist-vit-baseline")
    parser.add_argument("--anchored", required=True, help="model spec, e.g. zoo:fmnist-vit-anchored")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, BMP, TIFF, GIF)")
    parser.add_argument("--mode", default="circular", choices=[m for m in MODES if m not in ("bilinear", "fourier")],
                        help="shift mode (default circular)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--zip", action="store_true", help="also write OUT.zip")
    parser.add_argument("--grid", default="period",
                        help="'period' (the s×s patch period, default), 'full' (every circular shift) or a radius R ({-R..R}²)")
    parser.add_argument("--shift", type=parse_shift, default=None, metavar="DY,DX",
                        help="the shift the figures show, one of the grid's (default: the most damaging one, "
                             "where the baseline's probability of its unshifted top-1 is lowest)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--no-static", action="store_true", help="skip PNG/SVG (no Chromium needed)")


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    bars: Dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit = "shift" if stage.startswith("sweep") else "figure" if stage != "files" else "step"
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    import warnings

    # plotly warns on every static export through kaleido's server that an unused option is ignored;
    # this is the CLI's own process, so a process-wide filter is harmless here.
    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
    try:
        path = build_report(args.baseline, args.anchored, args.image, args.out, mode=args.mode, grid=args.grid,
                            device=args.device, zip=args.zip, progress=progress, static=not args.no_static,
                            shift=getattr(args, "shift", None), shift_origin="on the command line (--shift)")
    except EquishiftError as e:
        print(f"equishift sweep: {e}", file=sys.stderr)
        return 2
    folder = Path(args.out)
    note = folder / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt"
    print(f"report written to {path}")
    if note.exists():
        print(note.read_text().splitlines()[0], file=sys.stderr)
    return 0
