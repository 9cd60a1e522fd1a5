"""Showing a figure with its downloads (PNG, SVG, HTML), and the comparison-report download.

Files are made only when a download is clicked (deferred ``st.download_button`` data), so a rerun pays
nothing for them. PNG and SVG need kaleido's headless Chromium (the Debian ``chromium``); without one the
buttons say so and HTML (plotly.js inline, opens offline) still works.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import plotly.graph_objects as go
import streamlit as st

from equishift import formatting

__all__ = ["show", "figure_bytes", "static_export_problem", "report_panel", "current_view", "VIEW_KEYS"]

MIME = {"png": "image/png", "svg": "image/svg+xml", "html": "text/html"}


@st.cache_resource(show_spinner=False)
def _kaleido_server() -> Optional[str]:
    """Start kaleido's persistent browser once per process (~0.2 s per image instead of ~2.5 s).
    Returns None when ready, else the reason static export is unavailable."""
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        return None
    except Exception as e:  # noqa: BLE001 - no Chrome, sandbox trouble, ...: offer HTML instead
        return f"{type(e).__name__}: {e}"


def static_export_problem() -> Optional[str]:
    """None when PNG/SVG export works here, else why not (e.g. no chromium installed). The browser is
    looked for as kaleido looks for it (``equishift.report.find_browser``): without one kaleido would
    not fail but wait forever."""
    from equishift.report import find_browser

    if find_browser() is None:
        return "PNG/SVG export needs Chromium (`apt-get install chromium`); HTML works offline."
    return None


def figure_bytes(fig: go.Figure, fmt: str) -> bytes:
    """The figure as PNG, SVG or standalone HTML (plotly.js inline, so it opens offline)."""
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    problem = static_export_problem() or _kaleido_server()
    if problem is not None:
        raise RuntimeError(f"static export unavailable: {problem}")
    from equishift.plots import export_width

    return fig.to_image(format=fmt, scale=2 if fmt == "png" else 1, width=export_width(fig))


def _deferred(fig, fmt: str) -> Callable[[], bytes]:
    return lambda: figure_bytes(fig() if callable(fig) else fig, fmt)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "figure"


def show(fig: go.Figure, name: str, key: Optional[str] = None,
         exported: Optional[Callable[[], go.Figure]] = None, **chart_kwargs):
    """``st.plotly_chart`` plus an "Export" popover with PNG / SVG / HTML downloads of this figure, or of
    ``exported()`` when given (a figure drawn on the page without its current-shift marker, which the live
    view draws, is exported with it)."""
    # theme=None: the figure's own colours. Streamlit's theme swaps in its own colour scales, under which
    # zero stops being the scale's first colour (an exact 0 drew pink) and the page stops matching the
    # exported PNG/SVG and the report, which draw the figure as built.
    event = st.plotly_chart(fig, key=key, width="stretch", theme=None, **chart_kwargs)
    problem = static_export_problem()
    with st.popover("Export figure", icon=":material/download:"):
        for fmt in ("png", "svg", "html"):
            disabled = fmt != "html" and problem is not None
            st.download_button(fmt.upper(), data=_deferred(exported or fig, fmt), file_name=f"equishift-{_slug(name)}.{fmt}",
                               mime=MIME[fmt], on_click="ignore", disabled=disabled,
                               help=problem if disabled else None, key=f"dl_{key or _slug(name)}_{fmt}")
    return event


REPORT = "report_zip"
# The tab choices the report reproduces: session_state keys of the tabs' widgets (dashboard/panels.py,
# dashboard/attribution_panel.py). A widget's key leaves session_state once its tab is not drawn for a run
# (only the open tab is drawn), so the last values seen are kept under VIEW_SEEN.
VIEW_KEYS = ("curve_path", "curve_value", "att_layers", "att_heads", "att_align", "err_log", "attr_method",
             "attr_layer")
VIEW_SEEN = "report_view_seen"


def current_view(state) -> dict:
    """The tab choices now on screen, from ``state`` (``st.session_state``): each key's current value, else
    the last value seen for it (its tab is closed), else the dashboard's default (``VIEW_DEFAULTS``;
    ``att_layers`` None = the dashboard's default layers). Remembers what it saw in ``state``."""
    from equishift.report import VIEW_DEFAULTS

    seen = dict(state.get(VIEW_SEEN) or {})
    for k in VIEW_KEYS:
        if k in state:
            v = state[k]
            seen[k] = list(v) if isinstance(v, (list, tuple)) else v
    state[VIEW_SEEN] = seen
    view = {k: seen.get(k, VIEW_DEFAULTS[k]) for k in VIEW_KEYS}
    if view["attr_method"] != "gradcam":
        view["attr_layer"] = None  # GradCAM's layer picker is only drawn (and only counts) for GradCAM
    return view


def _report_key(sides, mode: str, shift=None, view=None) -> tuple:
    """What a built report depends on: the models and sweeps, the mode, the shown shift and the tab choices."""
    choices = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted((view or {}).items()))
    return tuple(s.key for s in sides) + (mode, tuple(float(x) for x in (shift or ())), choices)


def report_panel(sides, mode: str, grid, image_bytes: bytes, shift=None) -> None:
    """"Download comparison report": the engine's bundle (equishift.report.build_report) for this pair,
    image, mode and grid, from the sweeps already cached here, with every figure at the current ``shift``
    (dy, dx) and the tabs' current choices (``current_view``). Built on request (it renders every figure to
    PNG/SVG and writes an offline HTML page: seconds, with a progress bar), then offered as a zip download.
    Without a ``shift`` the report shows the most damaging shift of the grid and says so."""
    st.markdown("The **comparison report** is one zip: every figure as PNG and SVG, `report.html` (all "
                "figures, plotly.js inline, opens offline), the sweeps as `.npz`, a per-shift CSV, a summary "
                "JSON and `metadata.json` (specs, weights and image sha256, grid, mode, versions, device). "
                "Its figures show what the tabs show now: the current shift and each tab's choices.")
    view = current_view(st.session_state)
    if len(sides) < 2:
        st.info("The report compares two models: fix the model that failed to load first.")
        return
    if mode in ("bilinear", "fourier"):
        st.info("The report sweeps integer shift grids: pick circular, zero-pad, reflect or crop.")
        return
    shift = tuple(shift) if shift is not None else None
    layers = sides[0].result.attention
    if view["att_layers"] is not None:  # layers remembered from other models fall back to the default
        view["att_layers"] = [layer for layer in view["att_layers"] if layer in layers] or None
    key = _report_key(sides, mode, shift, view)
    built = st.session_state.get(REPORT)
    if st.button("Build comparison report", key="build_report", icon=":material/inventory_2:"):
        from equishift.report import build_report, report_stages

        static = static_export_problem() is None
        stages = report_stages(sweeps=False, static=static)
        bar = st.progress(0.0, text="Building the report …")

        def progress(stage: str, done: int, total: int) -> None:
            i = stages.index(stage) if stage in stages else 0
            frac = (i + (done / total if total else 1.0)) / len(stages)
            bar.progress(min(1.0, frac), text=f"Building the report: {stage} ({done}/{total})")

        try:
            data = build_report(sides[0].loaded, sides[1].loaded, image_bytes, zip=True, mode=mode, grid=grid.label,
                                results=(sides[0].result, sides[1].result), static=static, shift=shift,
                                view=view, shift_origin="in the dashboard" if shift is not None else None,
                                progress=progress)
            built = st.session_state[REPORT] = {"key": key, "data": data}
        except Exception as e:  # noqa: BLE001 - the page must survive a failed export
            st.error(f"The report could not be built: {type(e).__name__}: {e}")
        finally:
            bar.empty()
    if built and built["key"] == key:
        st.download_button("Download comparison report", data=built["data"], file_name="equishift-report.zip",
                           mime="application/zip", on_click="ignore", type="primary", key="download_report",
                           icon=":material/download:")
        at = ("the grid's most damaging shift" if shift is None else
              f"shift (dy, dx) = ({formatting.fmt(shift[0], 'g')}, {formatting.fmt(shift[1], 'g')})")
        st.caption(f"{formatting.fmt(len(built['data']) / 1e6, '.1f')} MB · for the models, image, mode and grid "
                   f"shown above, at {at}, with the tabs' current choices.")
    elif built:
        st.caption("The models, image, mode, grid, shift or a tab's choice changed since the last report: "
                   "build it again.")
