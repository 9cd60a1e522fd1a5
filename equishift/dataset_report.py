"""Exports of the dataset view: figures (HTML always; PNG/SVG with a Chromium for kaleido), the per-image
table (CSV, Parquet), the metrics JSON and a self-contained report HTML with one rounded comparison
table, captions and the command that recomputes everything. The dashboard's Dataset page and
``python -m equishift evaluate --per-image/--figures/--report`` both call these.
"""
from __future__ import annotations

import csv
import html
import io
import json
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from . import dataset_plots as dp
from . import dataset_sweep as ds
from .formatting import clean

__all__ = ["cli_command", "per_image_csv", "per_image_parquet", "metrics", "metrics_json", "comparison_table",
           "report_html", "write_figures", "write_bundle", "bundle_zip"]


def cli_command(settings: Dict[str, Any], out: str = "dataset-view") -> str:
    """The ``python -m equishift evaluate`` command that recomputes this dataset view into ``out``/."""
    args = ["python", "-m", "equishift", "evaluate"]
    for spec in settings["models"]:
        args += ["--model", spec]
    src = settings.get("data_source") or "fashion-mnist"
    args += ["--dataset", src]
    if src == "fashion-mnist":
        args += ["--limit", str(settings["n_images"])]
    if not settings.get("labelled", True) and src != "fashion-mnist":
        args += ["--unlabelled"]
    shifts = settings["shift_set"] if settings["shift_set"] != "radius" else f"r{settings['radius']}"
    args += ["--shifts", shifts, "--shift-mode", settings["mode"], "--seed", str(settings.get("seed", 0)),
             "--per-image", f"{out}/per_image.csv", "--figures", f"{out}/figures",
             "--json", f"{out}/metrics.json", "--report", f"{out}/report.html"]
    return " ".join(shlex.quote(a) for a in args)


def _rows(result: ds.DatasetResult, data: Optional[ds.ImageSet]) -> List[Dict[str, Any]]:
    return ds.per_image_table(result.sweeps, data)


def per_image_csv(result: ds.DatasetResult, data: Optional[ds.ImageSet] = None) -> str:
    rows = _rows(result, data)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def per_image_parquet(result: ds.DatasetResult, data: Optional[ds.ImageSet] = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(result, data)
    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if not np.isfinite(f) else clean(f)
    return v


def metrics(result: ds.DatasetResult) -> Dict[str, Any]:
    """Everything the views show, as plain JSON: settings, leaderboard, per-class rows, consistency by
    ‖δ‖∞/dy/dx, polyphase statistics, and ``evaluate``'s full protocol results."""
    out = {"settings": result.settings, "leaderboard": result.leaderboard, "models": []}
    for sw in result.sweeps:
        out["models"].append({
            "model": sw.name, "spec": sw.spec, "meta": sw.meta,
            "per_class": ds.per_class(sw),
            "consistency_by": {by: ds.consistency_by(sw, by) for by in ("linf", "dy", "dx")},
            "polyphase": [dict(p, margin_bins=ds.MARGIN_BINS) for p in ds.polyphase_stats(sw)],
        })
    out["protocols"] = result.protocols
    return _jsonable(out)


def metrics_json(result: ds.DatasetResult) -> str:
    return json.dumps(metrics(result), indent=1, ensure_ascii=False) + "\n"


def _pct(p: Optional[Dict[str, Any]]) -> str:
    if not p:
        return "—"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


TABLE_COLUMNS = (("params", "params"), ("clean_accuracy", "clean acc. %"), ("shifted-accuracy", "shifted acc. % (A)"),
                 ("shifted_accuracy", "acc. over shift set %"), ("consistency-a", "consistency A %"),
                 ("consistency-b", "consistency B %"), ("consistency", "consistency over shift set %"),
                 ("orbit_consistency", "orbit consistency %"), ("period-orbit", "period-orbit %"),
                 ("forward_ms_per_image_shift", "forward ms / image·shift"))


def comparison_table(result: ds.DatasetResult) -> List[List[str]]:
    """The rounded comparison table: header row, then one row per model (percentages with the 95%
    Wilson interval; one decimal)."""
    cols = [(k, t) for k, t in TABLE_COLUMNS if any(r.get(k) is not None for r in result.leaderboard)]
    out = [["model"] + [t for _, t in cols]]
    for r in result.leaderboard:
        row = [r["model"]]
        for k, _ in cols:
            v = r.get(k)
            if k == "params":
                row.append(f"{v / 1e6:.2f} M" if v else "—")
            elif k == "forward_ms_per_image_shift":
                row.append(f"{v:.3f}")
            else:
                row.append(_pct(v))
        out.append(row)
    return out


def report_html(result: ds.DatasetResult, figs: Dict[str, Any], command: str,
                gallery: Optional[List[Dict[str, Any]]] = None) -> str:
    """A self-contained page (plotly.js inlined once): the comparison table, every figure with its
    caption, the most fragile images and the command that recomputes it all."""
    s = result.settings
    table = comparison_table(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>equishift dataset view</title>"
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "figcaption{color:#444;margin-bottom:2em}code{background:#f4f4f4;padding:2px}</style></head><body>",
             "<h1>Shift robustness on a dataset</h1>",
             f"<p>{s['n_images']} images of {html.escape(s['data'])}; {html.escape(str(s.get('describe')))}. "
             f"Percentages with 95% Wilson intervals (n = images); consistency A/B, clean and shifted accuracy "
             f"follow equishift's protocols (docs/metrics.md), seed {s.get('seed', 0)}.</p>",
             f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
             f"<p>Recompute with:</p><pre><code>{html.escape(command)}</code></pre>"]
    first = True
    for name, fig in figs.items():
        parts.append("<figure>" + fig.to_html(full_html=False, include_plotlyjs="inline" if first else False)
                     + f"<figcaption>{html.escape(dp.FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>")
        first = False
    if gallery:
        parts.append("<h2>Most fragile images</h2><table><tr><th>image</th><th>smallest flipping ‖δ‖∞</th>"
                     "<th>worst shift (dy, dx)</th><th>largest drop</th><th>predictions (unshifted → worst)</th></tr>")
        for g in gallery:
            preds = "; ".join(f"{p['model']}: {p['unshifted']} → {p['at_worst']}" for p in g["predictions"])
            parts.append(f"<tr><td>{html.escape(str(g.get('name', g['index'])))}</td>"
                         f"<td>{'—' if g['smallest_flip'] is None else g['smallest_flip']}</td>"
                         f"<td>{tuple(g['worst_shift'])}</td><td>{g['max_drop']:.3f}</td>"
                         f"<td>{html.escape(preds)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_figures(figs: Dict[str, Any], folder, static: bool = True) -> Optional[str]:
    """Each figure as ``name.html``, and with ``static`` also ``name.png`` and ``name.svg`` (kaleido, which
    needs a Chromium). Returns None, or why PNG/SVG could not be written (the HTML files are there)."""
    from .report import _export_static

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        fig.write_html(folder / f"{name}.html", include_plotlyjs="cdn")
    return _export_static(figs, folder) if static else "static export not asked for"


def write_bundle(result: ds.DatasetResult, data: Optional[ds.ImageSet], folder, static: bool = True) -> Dict[str, Any]:
    """Everything into ``folder``: figures/, per_image.csv, per_image.parquet, metrics.json, report.html.
    Returns {"files": [...], "static_error": None or why PNG/SVG are missing}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figs = dp.all_figures(result.sweeps, result.leaderboard)
    err = write_figures(figs, folder / "figures", static)
    (folder / "per_image.csv").write_text(per_image_csv(result, data))
    (folder / "per_image.parquet").write_bytes(per_image_parquet(result, data))
    (folder / "metrics.json").write_text(metrics_json(result))
    gallery = ds.fragility(result.sweeps, "flip")[:12]
    if data is not None:
        for g in gallery:
            g["name"] = data.names[g["index"]]
    (folder / "report.html").write_text(report_html(result, figs, cli_command(result.settings), gallery))
    return {"files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "static_error": err}


def bundle_zip(result: ds.DatasetResult, data: Optional[ds.ImageSet], static: bool = True) -> bytes:
    """``write_bundle`` as the bytes of a zip (the dashboard's download)."""
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory(prefix="equishift-dataset-") as tmp:
        info = write_bundle(result, data, tmp, static)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel in info["files"]:
                zf.write(Path(tmp) / rel, f"dataset-view/{rel}")
            if info["static_error"]:
                zf.writestr("dataset-view/NO_PNG_SVG.txt", f"PNG/SVG not written: {info['static_error']}\n")
        return buf.getvalue()

