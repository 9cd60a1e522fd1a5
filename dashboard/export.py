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

__all__ = ["show", "figure_bytes", "static_export_problem", "report_panel"]

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
    """None when PNG/SVG export works here, else why not (e.g. no chromium installed)."""
    import shutil

    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")):
        return "PNG/SVG export needs Chromium (`apt-get install chromium`); HTML works offline."
    return None


def figure_bytes(fig: go.Figure, fmt: str) -> bytes:
    """The figure as PNG, SVG or standalone HTML (plotly.js inline, so it opens offline)."""
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    problem = _kaleido_server()
    if problem is not None:
        raise RuntimeError(f"static export unavailable: {problem}")
    return fig.to_image(format=fmt, scale=2 if fmt == "png" else 1)


def _deferred(fig: go.Figure, fmt: str) -> Callable[[], bytes]:
    return lambda: figure_bytes(fig, fmt)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "figure"


def show(fig: go.Figure, name: str, key: Optional[str] = None, **chart_kwargs):
    """``st.plotly_chart`` plus an "Export" popover with PNG / SVG / HTML downloads of this figure."""
    event = st.plotly_chart(fig, key=key, width="stretch", **chart_kwargs)
    problem = static_export_problem()
    with st.popover("Export figure", icon=":material/download:"):
        for fmt in ("png", "svg", "html"):
            disabled = fmt != "html" and problem is not None
            st.download_button(fmt.upper(), data=_deferred(fig, fmt), file_name=f"equishift-{_slug(name)}.{fmt}",
                               mime=MIME[fmt], on_click="ignore", disabled=disabled,
                               help=problem if disabled else None, key=f"dl_{key or _slug(name)}_{fmt}")
    return event


def report_panel(sides, mode: str, grid) -> None:
    """Placeholder until equishift.report lands."""
    st.info("The comparison report is not available in this build.")
