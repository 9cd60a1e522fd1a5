"""Comparison report: sweep a baseline/anchored pair on one image and write a self-contained bundle.

CLI::

    python -m equishift sweep --baseline zoo:fmnist-vit-baseline --anchored zoo:fmnist-vit-anchored \\
        --image shirt.png --mode circular --grid period --out report/ [--zip] [--device cpu]

Python (the dashboard's "Download comparison report" button)::

    data = build_report(base_loaded, anch_loaded, pil_image, zip=True)            # bytes of a zip
    path = build_report("zoo:a", "zoo:b", "shirt.png", out="report/")            # the folder

Bundle
- ``figures/NAME.png`` and ``figures/NAME.svg`` for every figure (kaleido with the system Chromium; if
  none is available, ``figures/STATIC_EXPORT_UNAVAILABLE.txt`` says why and everything else is written);
- ``report.html``: every figure, the summary and the metadata in one page with plotly.js inline (opens
  offline); the summary is also embedded as JSON (``<script id="equishift-summary">``);
- ``data/baseline.npz``, ``data/anchored.npz`` (``SweepResult.save``, no pickle), ``data/per_shift.csv``
  (one row per shift), ``data/summary.json`` (metrics of each model over the swept grid);
- ``metadata.json``: specs, model names, weights sha256 (of the state dict, and of the weights file when
  the model card has one), image sha256, shift grid, mode, versions, device, focus shift, time.

The *focus* shift (the one the attention, image and attribution figures show) is where the baseline's
probability of its own unshifted top-1 class is lowest: the most damaging shift of the grid.
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

__all__ = ["build_report", "choose_shifts", "summarize", "find_browser", "add_arguments", "run", "ROLES"]

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


# --- figures -----------------------------------------------------------------------------------
def _figures(loaded: Dict[str, Any], res: Dict[str, SweepResult], x: Dict[str, torch.Tensor], mode: str,
             size) -> Dict[str, Any]:
    from .attribution import compare, gradcam, saliency

    base, anch = res["baseline"], res["anchored"]
    k = _focus(base)
    dy, dx = base.shifts[k].tolist()
    figs: Dict[str, Any] = {}
    for role in ROLES:
        r, lm = res[role], loaded[role]
        anchor = None
        first = [n for n in r.anchors if n in ("patch_embed.anchor", "patch_embeds.0.anchor")]
        if first:
            anchor = tuple(r.anchors[first[0]][k].tolist())
        figs[f"input_{role}"] = plots.shifted_image(lm.denormalize(x[role][0].cpu()), (dy, dx), mode, patch=lm.stride,
                                                    anchor=anchor, size=size)
    figs["logit_curve"] = plots.logit_curve(base, anch, current=k)
    figs["orbit_probability"] = plots.orbit_heatmap(base, anch, "prob", current=k)
    figs["orbit_flips"] = plots.orbit_heatmap(base, anch, "flip", current=k)
    if base.attention and anch.attention:
        figs["attention_aligned"] = plots.attention_grid(base, anch, current=k, align=True)
        figs["attention_as_seen"] = plots.attention_grid(base, anch, current=k, align=False)
    figs["polyphase_anchored"] = plots.polyphase_panel(anch, current=k)
    if base.layer_error and anch.layer_error:
        figs["layer_error"] = plots.layer_error_map(base, anch, current=k, log=True)
    display = loaded["baseline"].denormalize(plots_input(x["baseline"], (dy, dx), mode, size)[0].cpu())
    for name, fn in (("saliency", saliency), ("GradCAM", gradcam)):
        maps, scores = {}, {}
        for role in ROLES:
            lm = loaded[role]
            ref = fn(lm.model, x[role], shift=(0, 0), mode=mode, size=size)
            att = fn(lm.model, x[role], shift=(dy, dx), mode=mode, size=size, target=ref.target)
            maps[role] = att.map
            scores[role] = compare(att, ref)
        figs[f"attribution_{name.lower()}"] = plots.attribution_overlay(display, maps, method=name, shift=(dy, dx),
                                                                mode=mode, scores=scores)
    return figs


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


def _export_static(figs: Dict[str, Any], folder: Path) -> Optional[str]:
    """Write PNG and SVG of every figure; returns None, or why static export was impossible."""
    try:
        import kaleido

        if find_browser() is None:
            raise RuntimeError("no Chrome or Chromium browser found (kaleido renders PNG/SVG with one)")
        with _EXPORT_LOCK:
            kaleido.start_sync_server(silence_warnings=True)
            for name, fig in figs.items():
                (folder / f"{name}.png").write_bytes(fig.to_image(format="png", scale=2))
                (folder / f"{name}.svg").write_bytes(fig.to_image(format="svg"))
        return None
    except Exception as e:  # noqa: BLE001 - no Chromium, sandbox trouble...: the rest of the bundle stays
        for p in folder.glob("*.png"):
            p.unlink()
        for p in folder.glob("*.svg"):
            p.unlink()
        return f"{type(e).__name__}: {e}"


def _for_display(v: Any) -> Any:
    """A summary or metadata value for the HTML tables: floats to 6 significant digits, never ``-0.0``
    (``equishift.formatting.fmt``); containers element by element; anything else as it is."""
    if isinstance(v, float):
        return float(fmt(v, ".6g"))
    if isinstance(v, dict):
        return {k: _for_display(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_for_display(x) for x in v]
    return v


def _html(figs: Dict[str, Any], summary: Dict[str, Any], meta: Dict[str, Any]) -> str:
    from html import escape

    from plotly.offline import get_plotlyjs

    def table(d: Dict[str, Any]) -> str:
        rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(_for_display(v), default=str))}"
                       "</td></tr>" for k, v in d.items())
        return f"<table>{rows}</table>"

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>equishift comparison report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        "<h1>equishift comparison report</h1>",
        f"<p>{escape(meta['baseline']['spec'])} vs {escape(meta['anchored']['spec'])} — {escape(meta['mode'])} shifts, "
        f"{escape(meta['shift_range'])}; focus shift (dy={fmt(meta['focus_shift'][0])}, "
        f"dx={fmt(meta['focus_shift'][1])}).</p>",
        "<h2>Summary</h2>",
    ]
    for role in ROLES:
        parts += [f"<h3>{role}</h3>", table(summary[role])]
    parts.append("<h2>Figures</h2>")
    for name, fig in figs.items():
        parts += [f"<h3>{escape(name)}</h3>", fig.to_html(full_html=False, include_plotlyjs=False)]
    parts += ["<h2>Metadata</h2>", table(meta),
              f"<script type='application/json' id='equishift-summary'>{json.dumps(clean(summary))}</script>",
              f"<script type='application/json' id='equishift-metadata'>{json.dumps(clean(meta), default=str)}</script>",
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
def build_report(baseline, anchored, image, out: Optional[Union[str, Path]] = None, *, mode: str = "circular",
                 grid: Union[str, int] = "period", device: Optional[str] = None, zip: bool = False,
                 progress: Optional[Callable[[str, int, int], None]] = None, static: bool = True,
                 results: Optional[Sequence[SweepResult]] = None) -> Union[Path, bytes]:
    """Sweep ``baseline`` and ``anchored`` (specs or ``LoadedModel``) on ``image`` (path, bytes or PIL)
    and write the bundle (module doc) to ``out``.

    Returns the folder; with ``zip=True`` the path of ``out`` + ``.zip`` (the folder is written too), or,
    when ``out`` is None, the zip's bytes. ``progress(role, done, total)`` follows each sweep.
    ``results`` = (baseline, anchored) SweepResults already computed on this image and mode (the
    dashboard's cached sweeps) skip the sweeps; their shifts are used and ``grid`` is only a label (for
    crop sweeps the canvas margin is the largest |shift|). ``static=False`` skips PNG/SVG."""
    if mode not in MODES:
        raise EquishiftError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode in ("bilinear", "fourier"):
        raise EquishiftError("reports sweep integer shift grids; use mode circular, zero, reflect or crop")
    if out is None and not zip:
        raise EquishiftError("give an output folder, or zip=True to get the bundle as bytes")
    loaded = {"baseline": _load(baseline, device), "anchored": _load(anchored, device)}
    pil, raw = _image(image)
    stride = max(lm.stride for lm in loaded.values())
    c, h, w = loaded["baseline"].input_size
    if tuple(loaded["anchored"].input_size[1:]) != (h, w):
        raise EquishiftError(f"the two models take different input sizes ({h}x{w} vs "
                             f"{loaded['anchored'].input_size[1]}x{loaded['anchored'].input_size[2]})")
    # Results passed in (the dashboard's cached sweeps) define the grid; ``grid`` is then only a label.
    shifts = choose_shifts(grid, stride, (h, w)) if results is None else results[0].shifts
    size = (h, w) if mode == "crop" else None
    margin = int(shifts.abs().max()) if mode == "crop" else 0
    x = {role: lm.preprocess(pil, margin=margin) for role, lm in loaded.items()}

    res: Dict[str, SweepResult] = {}
    for i, role in enumerate(ROLES):
        if results is not None:
            res[role] = results[i]
            continue
        cb = (lambda d, t, role=role: progress(role, d, t)) if progress is not None else None
        r = sweep(loaded[role], x[role], shifts, mode, progress=cb, size=size)
        r.meta["label"] = role
        res[role] = r
    if not torch.equal(res["baseline"].shifts, res["anchored"].shifts):
        raise EquishiftError("the baseline and anchored sweeps cover different shifts")

    summary = {role: {"spec": loaded[role].spec, "name": loaded[role].name, **summarize(res[role])} for role in ROLES}
    k = _focus(res["baseline"])
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "grid": str(grid), "shift_range": res["baseline"].describe(), "num_shifts": len(shifts),
        "shifts": shifts.tolist(), "focus_shift": res["baseline"].shifts[k].tolist(),
        "focus_rule": "shift with the lowest baseline probability of its unshifted top-1 class",
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

    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="equishift-report-")
        folder = Path(tmp) / "equishift-report"
    else:
        folder = Path(out)
    try:
        (folder / "figures").mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        figs = _figures(loaded, res, x, mode, size)
        problem = _export_static(figs, folder / "figures") if static else "static export not requested"
        if problem is not None:
            why = ("" if not static else "\nThey need Chromium for kaleido (Debian: apt-get install chromium).")
            (folder / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt").write_text(
                "PNG/SVG figures were not written: " + problem + why
                + "\nreport.html has every figure and opens offline.\n")
        meta["static_export"] = "ok" if problem is None else problem
        (folder / "report.html").write_text(_html(figs, summary, meta), encoding="utf-8")
        for role in ROLES:
            res[role].save(folder / "data" / f"{role}.npz")
        header, rows = _per_shift_rows([(role, res[role]) for role in ROLES])
        with open(folder / "data" / "per_shift.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(header)
            wr.writerows(rows)
        (folder / "data" / "summary.json").write_text(json.dumps(summary, indent=2))
        (folder / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
        if not zip:
            return folder
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, Path(folder.name) / p.relative_to(folder))
        if out is None:
            return buf.getvalue()
        target = folder.with_name(folder.name + ".zip")
        target.write_bytes(buf.getvalue())
        return target
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- CLI -----------------------------------------------------------------------------------------
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
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--no-static", action="store_true", help="skip PNG/SVG (no Chromium needed)")


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    bars: Dict[str, Any] = {}

    def progress(role: str, done: int, total: int) -> None:
        bar = bars.get(role)
        if bar is None:
            bar = bars[role] = tqdm(total=total, desc=f"sweep {role}", unit="shift", leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    import warnings

    # plotly warns on every static export through kaleido's server that an unused option is ignored;
    # this is the CLI's own process, so a process-wide filter is harmless here.
    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
    try:
        path = build_report(args.baseline, args.anchored, args.image, args.out, mode=args.mode, grid=args.grid,
                            device=args.device, zip=args.zip, progress=progress, static=not args.no_static)
    except EquishiftError as e:
        print(f"equishift sweep: {e}", file=sys.stderr)
        return 2
    folder = Path(args.out)
    note = folder / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt"
    print(f"report written to {path}")
    if note.exists():
        print(note.read_text().splitlines()[0], file=sys.stderr)
    return 0
