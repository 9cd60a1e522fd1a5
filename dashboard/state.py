"""The current shift and the shift grid, kept in ``st.session_state`` and moved by four controls.

One canonical value, ``st.session_state["shift"] = (dy, dx)``; the pad, the number inputs, a click on an
orbit heatmap and the reset button each write it, and everything drawn reads it. Controls write it in
their callbacks (which run before the script), and the heatmap selection is consumed at the top of the
script, so the widgets are always created with the value they must show and no extra rerun is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import streamlit as st
import torch

from equishift.errors import LimitError
from equishift.sweep import MAX_SHIFTS

__all__ = ["GridSpec", "grid_options", "grid_from_param", "current_shift", "set_shift", "clamp_to_grid",
           "on_pad_change", "on_inputs_change", "reset_shift", "consume_selection", "PAD_KEY",
           "grid_param", "link_grid", "link_shift"]

SHIFT = "shift"
PAD_KEY = "live_view"
DY, DX = "shift_dy", "shift_dx"
_SEEN = "_seen_selection"
LINKED = "_linked_shift"  # the shift a link asked for, until the first run has placed it on the grid


@dataclass(frozen=True)
class GridSpec:
    """A square grid of shifts: both coordinates run lo, lo+step, …, hi (inclusive)."""

    lo: float
    hi: float
    step: float
    label: str

    def values(self) -> np.ndarray:
        n = int(round((self.hi - self.lo) / self.step)) + 1
        return self.lo + self.step * np.arange(n)

    @property
    def integer(self) -> bool:
        return float(self.step).is_integer() and float(self.lo).is_integer()

    def shifts(self) -> torch.Tensor:
        """[K, 2] row-major (dy outer, dx inner); long for integer grids, float64 for fractional ones."""
        v = torch.as_tensor(self.values())
        yy, xx = torch.meshgrid(v, v, indexing="ij")
        s = torch.stack((yy.flatten(), xx.flatten()), dim=1)
        return s.long() if self.integer else s.double()

    def __len__(self) -> int:
        return len(self.values()) ** 2

    @property
    def key(self) -> Tuple[float, float, float]:
        return (float(self.lo), float(self.hi), float(self.step))


def grid_options(size: int, stride: int, mode: str, crop_margin: int) -> List[GridSpec]:
    """The grids offered for a ``size``×``size`` input with patch ``stride``, most detailed last. Labels
    are short: the sidebar shows them with a time estimate in a ~30-character box.

    Circular and fractional shifts are periodic, so the full orbit is every shift in [-size/2, size/2);
    zero-pad and reflect move content out of the frame, so the same window; crop is bounded by the margin
    of the larger canvas. Fractional modes step by ½ or ¼ pixel over one patch period."""
    half = size // 2
    s = stride
    if mode == "crop":
        m = crop_margin
        out = [GridSpec(-m, m, 1, f"±{m} px margin · {(2 * m + 1) ** 2} shifts")]
        k = m // 4
        if k > 1 and m % k == 0:  # big patches (e.g. 16 px): a coarse grid first
            n = 2 * m // k + 1
            out.insert(0, GridSpec(-m, m, k, f"±{m} px, step {k} · {n * n} shifts"))
        return out
    if mode in ("bilinear", "fourier"):
        return [GridSpec(-(s // 2), s - s // 2 - 0.5, 0.5, f"one period, ½ px · {(2 * s) ** 2} shifts"),
                GridSpec(-(s // 2), s - s // 2 - 0.25, 0.25, f"one period, ¼ px · {(4 * s) ** 2} shifts")]
    out = [GridSpec(-(s // 2), s - s // 2 - 1, 1, f"one patch period · {s * s} shifts")]
    for step in (s, s // 2, 2):
        if 1 < step < s or step == s and size // step > 1:
            n = len(range(-half, half, step))
            out.append(GridSpec(-half, -half + step * (n - 1), step, f"every {step} px · {n * n} shifts"))
    out.append(GridSpec(-half, half - 1, 1, f"full orbit · {size * size} shifts"))
    # de-duplicate (small sizes make some of these coincide), keep order
    seen, uniq = set(), []
    for g in out:
        if g.key not in seen:
            seen.add(g.key)
            uniq.append(g)
    return uniq


def grid_from_param(value: Optional[str], options: Sequence[GridSpec], mode: str) -> Optional[GridSpec]:
    """The grid a ``?grid=`` query parameter asks for: ``period`` (the first option), ``full`` (the last),
    or ``r<R>`` (every shift with |dy|, |dx| ≤ R; ½-pixel steps in the fractional modes). Lets links and
    tests open on a small grid. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip().lower()
    if value == "period":
        return options[0]
    if value == "full":
        return options[-1]
    if value.startswith("step") and value[4:].isdigit() and len(value) <= 12:
        step = int(value[4:])
        return next((g for g in options[1:-1] if g.step == step), None)
    if value.startswith("r") and value[1:].isdigit() and len(value) <= 12:
        r = int(value[1:])
        step = 0.5 if mode in ("bilinear", "fourier") else 1
        n = int(2 * r / step) + 1
        if n * n > MAX_SHIFTS:  # refuse before anything of that size is allocated
            raise LimitError(f"?grid={value} asks for {n * n} shifts; the sweep limit is {MAX_SHIFTS} "
                             f"(r{_max_radius(step)} at most in this mode)")
        return GridSpec(-r, r, step, f"±{r} px · {n * n} shifts (link)")
    return None


def grid_param(grid: GridSpec, options: Sequence[GridSpec]) -> str:
    """The ``?grid=`` value that reopens ``grid`` among ``options`` (the grids offered, without one a link
    added): ``period`` (the first), ``full`` (the last), ``step<k>`` (a whole-image grid with step k), or
    ``r<R>`` for a ±R grid that came from a link."""
    keys = [g.key for g in options]
    if grid.key not in keys:
        return f"r{_txt(grid.hi)}"
    i = keys.index(grid.key)
    if i == 0:
        return "period"
    if i == len(keys) - 1:
        return "full"
    return f"step{_txt(grid.step)}"


def link_grid(grid: GridSpec, options: Sequence[GridSpec]) -> None:
    """Keep the chosen grid in the page's URL (a link reopens it)."""
    _set_param("grid", grid_param(grid, options))


def link_shift(shift: Sequence[float]) -> None:
    """Keep the current shift in the page's URL as ``?shift=dy,dx`` (dropped at (0, 0))."""
    value = None if all(float(v) == 0 for v in shift) else ",".join(_txt(v) for v in shift)
    _set_param("shift", value)


def _txt(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _set_param(name: str, value: Optional[str]) -> None:
    # only on change: each write is a message to the browser
    if st.query_params.get(name) != value:
        if value is None:
            del st.query_params[name]
        else:
            st.query_params[name] = value


def _max_radius(step: float) -> int:
    n = int(MAX_SHIFTS ** 0.5)  # grid points per side
    return int((n - 1) * step // 2)


def clamp_to_grid(shift: Sequence[float], grid: GridSpec) -> Tuple[float, float]:
    """The grid point nearest to ``shift`` (ints for integer grids)."""
    v = grid.values()
    out = tuple(v[int(np.abs(v - c).argmin())] for c in shift)
    return tuple(int(c) for c in out) if grid.integer else tuple(float(c) for c in out)


def current_shift() -> Tuple[float, float]:
    """The canonical shift; on a session's first run, ``?shift=dy,dx`` from the link (else (0, 0))."""
    if SHIFT not in st.session_state:
        st.session_state[SHIFT] = _shift_param(st.query_params.get("shift"))
        if st.query_params.get("shift"):
            st.session_state[LINKED] = st.session_state[SHIFT]
    return tuple(st.session_state[SHIFT])


def _shift_param(value: Optional[str]) -> Tuple[float, float]:
    try:
        dy, dx = (float(v) for v in (value or "").split(","))
    except ValueError:
        return (0, 0)
    return (int(dy), int(dx)) if dy.is_integer() and dx.is_integer() else (dy, dx)


def linked_shift_moved(shift: Sequence[float]) -> Optional[Tuple[float, float]]:
    """The shift the page's link asked for when it is not ``shift`` (the grid point it was snapped to),
    once per session; else None."""
    asked = st.session_state.pop(LINKED, None)
    if asked is None or tuple(float(v) for v in asked) == tuple(float(v) for v in shift):
        return None
    return tuple(asked)


def set_shift(dy: float, dx: float) -> None:
    """Write the canonical shift and the number inputs' values (allowed before they are created)."""
    st.session_state[SHIFT] = (dy, dx)
    st.session_state[DY] = dy
    st.session_state[DX] = dx


def pad_ack() -> int:
    """``seq`` of the last shift report from the pad that has been consumed (0 before any)."""
    report = (st.session_state.get(PAD_KEY) or {}).get("shift") or {}
    return int(report.get("seq", 0))


def on_pad_change() -> None:
    report = (st.session_state.get(PAD_KEY) or {}).get("shift")
    if report:
        set_shift(report["dy"], report["dx"])


def on_inputs_change() -> None:
    st.session_state[SHIFT] = (st.session_state[DY], st.session_state[DX])


def reset_shift() -> None:
    set_shift(0, 0)


def _points(event) -> list:
    try:
        return list(event["selection"]["points"])
    except (KeyError, TypeError):
        return []


def consume_selection(keys: Iterable[str]) -> Optional[Tuple[float, float]]:
    """A new click on one of the orbit heatmaps (widget ``keys``) -> the (dy, dx) of the clicked cell.

    A plotly selection persists across reruns, so only a selection different from the one last consumed
    for that chart counts; the heatmaps put dx on x and dy on y."""
    seen = st.session_state.setdefault(_SEEN, {})
    jump = None
    for key in keys:
        pts = _points(st.session_state.get(key))
        sig = repr([(p.get("x"), p.get("y")) for p in pts])
        if sig != seen.get(key):
            seen[key] = sig
            if pts and pts[-1].get("x") is not None and pts[-1].get("y") is not None:
                jump = (pts[-1]["y"], pts[-1]["x"])
    return jump
