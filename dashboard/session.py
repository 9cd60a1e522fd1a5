"""One run of the dashboard script: sidebar → models → image → sweeps → shift controls → panels.

Every failure a user can cause (a bad spec, a checkpoint that does not fit, an unreadable upload, a grid
that is too large) is caught where it happens and shown as an ``st.error``; the rest of the page keeps
working (a side whose model failed is left out, a bad upload falls back to a sample image).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import streamlit as st
import torch
from PIL import Image

from equishift.errors import EquishiftError
from equishift.formatting import fmt
from equishift.shifts import shift_batch
from equishift.sweep import MAX_SHIFTS, SweepResult, sweep

from dashboard import caveats, compute, live, sources, state

_LOG = logging.getLogger("equishift.dashboard")

__all__ = ["Side", "main", "warm_up"]

# Estimated sweep time above which the page opens on a coarser grid (the user can still pick any).
COARSE_AFTER_S = 10.0
# A chosen grid not swept yet and estimated longer than this is swept in the background while the page is
# drawn on the coarsest grid: the first render does not wait for it ($EQUISHIFT_FIRST_RENDER_S).
FIRST_RENDER_S = 2.0


# Grids whose sweep is estimated longer than this are not offered ($EQUISHIFT_MAX_SWEEP_S): the sweep slots
# are shared by every session of the server.
MAX_SWEEP_S = 300.0


def max_sweep_s() -> float:
    try:
        return float(os.environ.get("EQUISHIFT_MAX_SWEEP_S", MAX_SWEEP_S))
    except ValueError:
        return MAX_SWEEP_S


def _first_render_s() -> float:
    try:
        return float(os.environ.get("EQUISHIFT_FIRST_RENDER_S", FIRST_RENDER_S))
    except ValueError:
        return FIRST_RENDER_S
SIDES = ("baseline", "anchored")


@dataclass
class Side:
    """One column of the comparison: its spec, and the model, input and sweep once they exist."""

    role: str
    spec: Optional[str]
    loaded: object = None
    x: Optional[torch.Tensor] = None        # the model input at shift 0, [1, C, H, W]
    canvas: Optional[torch.Tensor] = None   # the larger canvas crop mode cuts windows from
    result: Optional[SweepResult] = None
    key: Optional[tuple] = None             # the sweep's cache key
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.loaded is not None


def _message(e: BaseException) -> str:
    """User-facing text of an error: ours carry a full message; others get their type named."""
    if isinstance(e, EquishiftError):
        return str(e)
    return f"{type(e).__name__}: {e}"


# --- models and image ------------------------------------------------------------------------------
def _load_sides(specs: Dict[str, Optional[str]]) -> List[Side]:
    sides = []
    for role in SIDES:
        side = Side(role, specs[role])
        if side.spec is None:
            side.error = f"Choose the {role} model in the sidebar."
        else:
            try:
                with st.spinner(f"Loading {side.spec} …"):
                    side.loaded = compute.get_model(side.spec)
            except Exception as e:  # noqa: BLE001 - any loader failure must leave the page alive
                side.error = f"Could not load the {role} model `{side.spec}`: {_message(e)}"
        sides.append(side)
    return sides


THUMB_PX = 384  # the original is shown at most this large; only this small copy is kept between reruns


def _thumbnail(choice: sources.ImageChoice):
    """A small copy of the decoded image, cached per image. Decoding also validates the file: a bad
    upload raises here. The image is decoded once (``sources.decoded_image``); each model's input starts
    from that decode."""
    def make():
        full = sources.decoded_image(choice)
        w, h = full.size
        scale = min(THUMB_PX / w, THUMB_PX / h)
        if scale >= 1:
            return full.copy(), full.size
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return full.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0), full.size
    return compute.cached(("thumbnail", choice.sha256), make)


def _image(choice: Optional[sources.ImageChoice]):
    """(thumbnail, original (w, h), ImageChoice) — an unreadable upload is reported and replaced by the
    default sample."""
    if choice is None:
        return None, None, None
    try:
        return (*_thumbnail(choice), choice)
    except Exception as e:  # noqa: BLE001
        st.error(f"Cannot use the uploaded image **{choice.label}**: {_message(e)}")
        path = sources.default_sample()
        if path is None:
            return None, None, None
        data = path.read_bytes()
        fallback = sources.ImageChoice(data, path.name, hashlib.sha256(data).hexdigest(), False)
        st.info(f"Showing the sample image **{path.name}** instead.")
        return (*_thumbnail(fallback), fallback)


def _guarded_call(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a display problem must not take the page down
        st.sidebar.error(f"Cannot show the {fn.__name__.replace('_', ' ')}: {_message(e)}")


def crop_margin(stride: int) -> int:
    """How far the crop window may move: one patch each way (4 px for the 32-px Fashion-MNIST models)."""
    return int(stride)


def _prepare_inputs(sides: List[Side], choice, mode: str) -> None:
    for side in sides:
        if not side.ok:
            continue
        lm = side.loaded
        try:
            side.x = compute.cached(("input", side.spec, choice.sha256, 0),
                                    lambda: lm.preprocess(sources.decoded_image(choice)))
            if mode == "crop":
                m = crop_margin(lm.stride)
                side.canvas = compute.cached(("input", side.spec, choice.sha256, m),
                                             lambda: lm.preprocess(sources.decoded_image(choice), margin=m))
        except Exception as e:  # noqa: BLE001
            side.error = f"Cannot prepare the image for `{side.spec}`: {_message(e)}"
    ok = [s for s in sides if s.ok]
    if len(ok) == 2 and tuple(ok[0].x.shape[1:]) != tuple(ok[1].x.shape[1:]):
        ok[1].error = (f"The two models take different inputs ({tuple(ok[0].x.shape[1:])} vs "
                       f"{tuple(ok[1].x.shape[1:])}); pick a pair with the same input size to compare them "
                       f"shift by shift.")


# --- grid and sweeps -------------------------------------------------------------------------------
def _grid_options(ref: Side, mode: str) -> List[state.GridSpec]:
    """The grids offered for ``ref``'s input size and stride (big inputs: no full orbit)."""
    _, h, w = ref.x.shape[1:]
    stride = ref.loaded.stride
    options = state.grid_options(min(h, w), stride, mode, crop_margin(stride))
    return [g for g in options if len(g) <= MAX_SHIFTS] or options[:1]


def _estimates(sides: List[Side], options: List[state.GridSpec]) -> Tuple[List[float], int]:
    """Estimated seconds to sweep each grid with every model shown, and the page's default: the finest
    grid estimated within COARSE_AFTER_S (else the coarsest). Each model is timed: a small baseline
    beside a large anchored model must not make the pair look cheap."""
    sec = sum(compute.forward_seconds(s.loaded, s.x) for s in sides)
    # recording attention and features costs ~1.3x a bare batched forward pass (measured)
    est = [1.5 * sec * len(g) for g in options]
    fits = [i for i, t in enumerate(est) if t <= COARSE_AFTER_S]
    return est, (max(fits) if fits else 0)


def _grid_picker(sides: List[Side], mode: str, sha256: str) -> Tuple[state.GridSpec, float, List[state.GridSpec]]:
    ref = sides[0]
    _, h, w = ref.x.shape[1:]
    stride = ref.loaded.stride
    options = _grid_options(ref, mode)
    offered = list(options)
    try:
        asked = state.grid_from_param(st.query_params.get("grid"), options, mode)
    except EquishiftError as e:
        st.error(f"Ignoring the link's grid: {e}")
        asked = None
    if asked is not None and asked not in options:
        options.insert(0, asked)
    est, default = _estimates(sides, options)
    # grids estimated over the server's budget are not offered (unless already swept): one visitor must
    # not occupy the shared sweep slots for hours (a 224-px model's full orbit: ~50k shifts)
    budget = max_sweep_s()
    swept = [("sweep", ref.spec, sha256, mode, g.key) in compute.store() for g in options]
    keep = [i for i, t in enumerate(est) if t <= budget or swept[i]] or [0]
    over = [i for i in range(len(options)) if i not in keep]
    if asked is not None and options.index(asked) in over:
        st.warning(f"The link's grid ({asked.label}) would take about {fmt(est[options.index(asked)], '.0f')} s "
                   f"on {compute.device_label()}, over this server's sweep budget of {fmt(budget, '.0f')} s; "
                   f"showing a smaller grid.")
        asked = None
    if asked is not None:
        default = options.index(asked)
    default = max([i for i in keep if i <= default] or keep[:1])
    if over:
        st.sidebar.caption("Not offered: " + ", ".join(f"{options[i].label} (~{fmt(est[i], '.0f')} s)" for i in over)
                           + f" — over this server's sweep budget of {fmt(budget, '.0f')} s "
                             f"(`EQUISHIFT_MAX_SWEEP_S`).")
    default = keep.index(default)
    options, est = [options[i] for i in keep], [est[i] for i in keep]
    labels = [f"{g.label} · ~{fmt(t, '.0f')} s" if t >= 1 else g.label for g, t in zip(options, est)]
    choice = st.sidebar.selectbox("Shift grid", range(len(options)), index=default, format_func=labels.__getitem__,
                                  key=f"grid_{mode}_{h}_{stride}",
                                  help="The shifts swept once (then cached); the controls move within it.")
    state.link_grid(options[choice], offered)
    cached = ("sweep", ref.spec, sha256, mode, options[choice].key) in compute.store()
    if est[choice] > COARSE_AFTER_S and not cached:
        st.sidebar.warning(f"This grid takes about {fmt(est[choice], '.0f')} s on {compute.device_label()}; "
                           f"a coarser grid answers sooner.")
    return options[choice], est[choice], offered


def _sweep_job(side: Side, mode: str, grid: state.GridSpec):
    """``run(progress)``: the sweep of ``side``'s model over ``grid`` (one of a few at a time)."""
    lm, x, canvas, shifts = side.loaded, side.x, side.canvas, grid.shifts()
    slots = compute.sweep_slots()  # looked up here: the job may run on a thread without a script context

    def run(progress=None, on_wait=None):
        with compute.sweep_slot(on_wait=on_wait, slots=slots):  # a few sweeps at a time across all sessions
            t0 = time.perf_counter()
            if mode == "crop":
                out = sweep(lm, canvas, shifts, mode, progress=progress, size=tuple(x.shape[-2:]))
            else:
                out = sweep(lm, x, shifts, mode, progress=progress)
        # operators see what the server computes (python -m dashboard.serve shows equishift's INFO lines)
        _LOG.info("sweep %s %s %s %s: %d shifts in %.2f s", side.spec, side.key[2][:12] if side.key else "-",
                  mode, grid.label, len(shifts), time.perf_counter() - t0)
        return out
    return run


def _in_background(sides: List[Side], choice, mode: str, grid: state.GridSpec, est: float,
                   options: List[state.GridSpec]) -> Tuple[state.GridSpec, list]:
    """When the chosen grid is not swept yet and would keep the first render waiting (estimated over
    FIRST_RENDER_S), it is swept in the background and the coarsest grid is drawn meanwhile. Returns the
    grid to draw now and the (side, key) pairs to sweep in the background ([] when the chosen grid is
    drawn). A background result that is done is put (back) into the store here, so the page uses it even
    if the store evicted it meanwhile."""
    ok = [s for s in sides if s.ok]
    keys = [("sweep", s.spec, choice.sha256, mode, grid.key) for s in ok]
    jobs = compute.background()
    for key in keys:
        jobs.deliver(key)
    missing = [(s, k) for s, k in zip(ok, keys) if k not in compute.store()]
    coarse = options[0]
    if not missing or est <= _first_render_s() or coarse.key == grid.key or len(coarse) >= len(grid):
        return grid, []
    return coarse, missing


def _start_background(pending: list, mode: str, grid: state.GridSpec) -> None:
    """Start the background sweeps, after the coarse grid's own sweeps ran: they share the sweep slots,
    and the page must not wait behind them."""
    jobs = compute.background()
    for side, key in pending:
        jobs.start(key, _sweep_job(side, mode, grid))


@st.fragment(run_every=1.0)
def _background_progress(keys: list, grid: state.GridSpec, shown: state.GridSpec) -> None:
    # keys: (side, sweep key) pairs
    """While the chosen grid is swept in the background: its progress; the whole page is drawn again on
    it as soon as it is done."""
    jobs = compute.background()
    status = [jobs.status(k) for _, k in keys]
    failed = [s["error"] for s in status if s["error"]]
    if failed:
        st.error(f"The sweep of {grid.label} failed: {failed[0]}. Showing {shown.label}.")
        return
    if all(s["ready"] for s in status):
        st.rerun(scope="app")
    done = sum(s["done"] for s in status)
    total = sum(s["total"] for s in status) or 1
    st.progress(done / total, text=f"Showing {shown.label} while {grid.label} is swept in the background "
                                   f"({done}/{total} shifts); the page switches to it when it is done.")


def _run_sweeps(sides: List[Side], choice, mode: str, grid: state.GridSpec) -> None:
    shifts = grid.shifts()
    # One placeholder whether or not a sweep runs: the elements after it (the shift pad) keep their place
    # in the page, so the browser updates them instead of re-mounting them (which would drop the pad's
    # keyboard focus and any drag in progress).
    slot = st.empty()
    for side in sides:
        if not side.ok:
            continue
        key = side.key = ("sweep", side.spec, choice.sha256, mode, grid.key)
        if key not in compute.store():
            bar = slot.progress(0.0, text=f"Sweeping {len(shifts)} shifts through the {side.role} model …")

            def progress(done, total, bar=bar, role=side.role):
                bar.progress(done / max(total, 1), text=f"{role}: {done}/{total} shifts")
        else:
            bar, progress = None, None
        job = _sweep_job(side, mode, grid)

        def run(job=job, bar=bar, progress=progress, role=side.role):
            def waiting():
                if bar is not None:
                    bar.progress(0.0, text=f"{role}: waiting for other sessions' sweeps to finish …")
            return job(progress, waiting)

        try:
            side.result = compute.store().get_or_compute(key, run)
        except Exception as e:  # noqa: BLE001
            side.error = f"The sweep of `{side.spec}` failed: {_message(e)}"
        finally:
            slot.empty()


# --- shift controls ---------------------------------------------------------------------------------
def shifted_display(side: Side, mode: str, shift) -> np.ndarray:
    """The model input at ``shift`` as an (H, W, 3) array in [0, 1]: what the model sees."""
    lm = side.loaded
    src = side.canvas if mode == "crop" else side.x
    size = tuple(side.x.shape[-2:]) if mode == "crop" else None
    xs = shift_batch(src, torch.tensor([shift], dtype=torch.float64 if mode in ("bilinear", "fourier")
                                        else torch.long), mode, size)
    img = lm.denormalize(xs[0]).float().cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def live_table(sides: List[Side]) -> dict:
    """The live view's per-sweep table (every swept shift's top-5 and anchored phase, per model); cached
    per pair of sweeps, so a shift change sends and computes nothing new."""
    def make():
        from dashboard.panels import first_anchors, probs_of

        out = {"key": tuple(s.key for s in sides), "sides": {}}
        for side in sides:  # each with its own class names: two models may have different heads
            n = probs_of(side)
            out["sides"][side.role] = live.side_table(n["probs"], n["ref_probs"], n["ref_pred"],
                                                      first_anchors(side.result), classes=n["classes"])
        return out
    return compute.cached(("live-table",) + tuple(s.key for s in sides), make)


def _shift_controls(sides: List[Side], mode: str, grid: state.GridSpec, heatmap_keys,
                    provisional: bool = False) -> tuple:
    """The live view (both models, dragged or moved by keys), the precise inputs and the reset; returns
    the current shift (on the grid). ``provisional``: the grid is a coarse stand-in while the chosen one
    is swept; the shift asked for (by a link or before) is then shown at its nearest point but kept."""
    ref = sides[0]
    jump = state.consume_selection(heatmap_keys)
    if jump is not None:
        state.set_shift(*state.clamp_to_grid(jump, grid))
    # snap to the grid, and give the inputs values of the grid's type (int, or float for sub-pixel grids)
    shift = state.clamp_to_grid(state.current_shift(), grid)
    asked = None if provisional else state.linked_shift_moved(shift)
    if asked is not None:
        st.warning(f"The link asks for shift ({_fmt(asked[0])}, {_fmt(asked[1])}), which is not on the grid "
                   f"{grid.label}; showing the nearest swept shift ({_fmt(shift[0])}, {_fmt(shift[1])}). "
                   f"Pick a grid that holds it in the sidebar.")
    if provisional:  # the inputs show the stand-in grid's point; the canonical shift stays as asked
        st.session_state[state.DY], st.session_state[state.DX] = shift
    else:
        state.set_shift(*shift)
    if grid.integer:
        lo, hi, step = int(grid.lo), int(grid.hi), int(grid.step)
    else:
        lo, hi, step = float(grid.lo), float(grid.hi), float(grid.step)
    # both models' live views, and beside them the precise controls (their values follow on release)
    view_col, ctl_col = st.columns([6, 1], vertical_alignment="top")
    with view_col:
        views = [{"role": s.role, "image": compute.cached(("display", s.key, mode, shift),
                                                          lambda s=s: shifted_display(s, mode, shift)),
                  "stride": s.loaded.stride} for s in sides]
        live.live_view(views, live_table(sides), shift, grid=(grid.lo, grid.step, len(grid.values())),
                       shift_range=((lo, hi), (lo, hi)), stride=ref.loaded.stride,
                       wrap=mode in ("circular", "bilinear", "fourier"), quantum=step, key=state.PAD_KEY,
                       on_change=state.on_pad_change, ack=state.pad_ack())
    with ctl_col:
        st.number_input("dy (rows, + = down)", min_value=lo, max_value=hi, step=step, key=state.DY,
                        on_change=state.on_inputs_change)
        st.number_input("dx (columns, + = right)", min_value=lo, max_value=hi, step=step, key=state.DX,
                        on_change=state.on_inputs_change)
        st.button("Reset", on_click=state.reset_shift, key="reset_shift", help="Back to shift (0, 0)")
    st.caption(f"Mode **{mode}** · grid: {grid.label}. Drag an image, use the arrow keys on it, type a shift, "
               f"or click a cell of an orbit heatmap.")
    return shift


@st.fragment
def shift_view(sides: List[Side], mode: str, grid: state.GridSpec, image_bytes: bytes,
               provisional: bool = False) -> None:
    """Everything that depends on the shift. A fragment: moving the shift (release of a drag, a key, a
    number input, a heatmap click) or switching a tab reruns only this, not the models, image or sweeps."""
    from dashboard import panels

    t0, c0 = time.perf_counter(), time.thread_time()
    shift = _shift_controls(sides, mode, grid, panels.heatmap_keys(), provisional)
    panels.render(sides, mode, grid, shift, image_bytes)
    if not provisional:
        state.link_shift(shift)
    # what this rerun cost the server: wall time, and CPU time of this script thread (the same on an idle
    # core; wall time also counts waiting for a CPU shared with other work). bench/interaction.py reads them.
    st.session_state["_render_s"] = time.perf_counter() - t0
    st.session_state["_render_cpu_s"] = time.thread_time() - c0


def _fmt(v) -> str:
    return fmt(v) if isinstance(v, float) else str(v)


# --- the page -------------------------------------------------------------------------------------
def warm_up(log=print) -> List[str]:
    """What the first visitor's page computes, computed before the server takes visitors: the default
    pair of models, the default sample's inputs and timing probe, and its sweeps on the page's default
    grid (the process-wide caches then hold them). Returns the steps done; a failure is logged, and the
    page computes that step itself later."""
    importlib.import_module("dashboard.panels")  # plotly and the figure builders: part of the first wait

    done: List[str] = []
    path = sources.default_sample()
    if path is None:
        return done
    data = path.read_bytes()
    choice = sources.ImageChoice(data, path.name, hashlib.sha256(data).hexdigest(), False)
    mode = next(iter(sources.SHIFT_MODES.values()))
    try:
        sides = [Side(role, spec, compute.get_model(spec)) for role, spec in
                 (("baseline", sources.DEFAULT_BASELINE), ("anchored", sources.DEFAULT_ANCHORED))]
        done.append("models")
        _thumbnail(choice)
        _prepare_inputs(sides, choice, mode)
        ok = [s for s in sides if s.ok]
        if not ok:
            return done
        options = _grid_options(ok[0], mode)
        est, default = _estimates(ok, options)
        grid = options[default]
        for side in ok:
            side.key = ("sweep", side.spec, choice.sha256, mode, grid.key)
            side.result = compute.store().get_or_compute(side.key, _sweep_job(side, mode, grid))
        done.append(f"sweeps ({grid.label})")
        live_table(ok)
    except Exception as e:  # noqa: BLE001 - the page reports problems itself; the server must start
        log(f"equishift: warm-up stopped after {done or 'nothing'}: {_message(e)}")
    return done


def main() -> None:
    from dashboard import panels  # imported here so a plotting problem cannot break the sidebar

    baseline, anchored = sources.model_picker()
    mode = sources.mode_picker()
    choice = sources.image_picker()

    st.title("equishift")
    st.caption(f"Where and why a vision transformer breaks under a shift — and what adaptive polyphase "
               f"anchoring changes. Models run on **{compute.device_label()}**.")

    sides = _load_sides({"baseline": baseline, "anchored": anchored})
    thumb, original_size, choice = _image(choice)
    if thumb is None:
        st.error("No image: add one to assets/images or upload one in the sidebar.")
        return
    _prepare_inputs(sides, choice, mode)
    for side in sides:
        if side.error:
            st.error(side.error)
        elif side.ok:  # what the loader noticed but did not refuse (e.g. NaN/Inf weights)
            for warning in side.loaded.card.get("warnings") or []:
                st.warning(f"The {side.role} model `{side.spec}`: {warning}")
    ok = [s for s in sides if s.ok]
    if not ok:
        return
    _guarded_call(panels.preprocessing, ok, thumb, original_size, choice)
    _guarded_call(panels.model_cards, ok)
    try:
        grid, est, options = _grid_picker(ok, mode, choice.sha256)
        chosen = grid
        grid, pending = _in_background(ok, choice, mode, grid, est, options)
    except Exception as e:  # noqa: BLE001
        st.error(f"Cannot set up the shift grid: {_message(e)}")
        return
    _run_sweeps(ok, choice, mode, grid)
    if pending:
        _start_background(pending, mode, chosen)
        _background_progress(pending, chosen, grid)
    for side in ok:
        if side.error:
            st.error(side.error)
    ok = [s for s in ok if s.result is not None]
    sid = compute.session_id()
    if sid is not None:  # what this page shows stays cached while other sessions sweep (see Store.pin)
        compute.store().pin(sid, [s.key for s in ok])
    if not ok:
        return
    try:
        caveats.render(ok, choice)
    except Exception as e:  # noqa: BLE001 - a caveat check must not take the page down
        st.warning(f"Cannot check the caveats: {_message(e)}")
    _guarded_call(panels.summary, ok, mode)
    shift_view(ok, mode, grid, choice.data, bool(pending))
