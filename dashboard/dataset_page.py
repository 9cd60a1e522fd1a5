"""The "Dataset" page: shift robustness over many images and 2–6 models (equishift.dataset_sweep).

Flow of one run: sidebar (the same model pair as the single-image page) → more models, data, shift set →
the result if it is in memory or on disk, else a "Run" button; a run goes to a background thread shared by
every session asking for the same key (progress bar with images done and ETA, a Cancel button), and
its per-model sweeps are saved to disk ($EQUISHIFT_CACHE_DIR/dataset) so a restarted server does not
recompute them. The views and the exports come from equishift.dataset_plots / dataset_report, the same
builders as ``python -m equishift evaluate --figures``.

Every failure a user can cause (a bad spec, a bad zip, an image the model cannot take) is shown where it
happens as an ``st.error``; the rest of the page stays.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from equishift import dataset_plots as dp
from equishift import dataset_report as dr
from equishift import dataset_sweep as ds
from equishift.errors import EquishiftError

from dashboard import compute, sources
from dashboard import session as session_limits

__all__ = ["main", "jobs", "memory", "image_sets", "linked_choice", "MAX_MODELS"]

MAX_MODELS = 6
DEFAULT_N = 500
MODE_LABELS = {"circular": "circular", "zero-pad": "zero", "crop": "crop"}
SINGLE_PAGE_MODE = {"circular": "circular", "zero": "zero-pad", "crop": "crop"}  # sources.SHIFT_MODES labels
SET_LABELS = {"one patch period": "period", "full orbit (circular)": "orbit", "|δ|∞ ≤ r": "radius"}


# --- process-wide state (shared by sessions) --------------------------------------------------------
class _Memory:
    """A thread-safe LRU of sweeps, protocol results and image sets, bounded in entries and bytes
    (``compute.nbytes``); the newest entry always stays."""

    def __init__(self, max_bytes: int = 512 * 2 ** 20, max_entries: int = 256):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._data: "OrderedDict[Any, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key][0]

    def __setitem__(self, key, value) -> None:
        size = max(1024, compute.nbytes(value))
        with self._lock:
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > 1 and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
                self._bytes -= self._data.popitem(last=False)[1][1]


@st.cache_resource(show_spinner=False)
def memory() -> _Memory:
    return _Memory()


# A session counts as watching a run while its progress fragment (every second) has reported within this.
WATCH_S = 5.0
# A finished run (result, error or cancellation) stays this long, so every session watching it sees how it
# ended; its result is also in the shared memory by then.
KEEP_FINISHED_S = 120.0


@dataclass
class Job:
    key: str
    total: int = 0
    done: int = 0
    stage: str = "starting"
    started: float = field(default_factory=time.monotonic)
    error: Optional[str] = None
    cancelled: bool = False
    result: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None
    finished: Optional[float] = None
    watchers: Dict[str, float] = field(default_factory=dict)
    left: set = field(default_factory=set)  # sessions that cancelled while others still watched

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def watch(self, session: str) -> int:
        """Note that ``session`` shows this run; returns how many sessions watch it now."""
        now = time.monotonic()
        if session not in self.left:
            self.watchers[session] = now
        for s, t in list(self.watchers.items()):
            if now - t > WATCH_S:
                self.watchers.pop(s, None)
        return len(self.watchers)

    def cancel(self, session: str) -> bool:
        """``session`` leaves the run; it stops only when no other session still watches it. True if
        stopped."""
        self.watchers.pop(session, None)
        now = time.monotonic()
        if any(now - t <= WATCH_S for t in self.watchers.values()):
            self.left.add(session)
            return False
        self.stop.set()
        return True

    def eta(self) -> Optional[float]:
        if self.done <= 0 or self.total <= 0:
            return None
        rate = self.done / max(1e-6, time.monotonic() - self.started)
        return (self.total - self.done) / rate


class Jobs:
    """Dataset runs in background threads, one per key, shared by sessions."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: Dict[str, Job] = {}

    def get(self, key: str) -> Optional[Job]:
        with self._lock:
            self._prune()
            return self._jobs.get(key)

    def _prune(self) -> None:
        now = time.monotonic()
        for k, j in list(self._jobs.items()):
            if j.finished is not None and now - j.finished > KEEP_FINISHED_S:
                del self._jobs[k]

    def start(self, key: str, run) -> Job:
        with self._lock:
            self._prune()
            job = self._jobs.get(key)
            if job is not None and job.running:
                return job
            job = self._jobs[key] = Job(key)

            def progress(done: int, total: int, stage: str) -> None:
                job.done, job.total, job.stage = done, total, stage

            def body() -> None:
                try:
                    job.result = run(progress, job.stop.is_set)
                except ds.Cancelled:
                    job.cancelled = True
                except Exception as e:  # noqa: BLE001 - reported on the page
                    job.error = str(e) if isinstance(e, EquishiftError) else f"{type(e).__name__}: {e}"
                finally:
                    job.finished = time.monotonic()

            job.thread = threading.Thread(target=body, name="equishift-dataset-view", daemon=True)
            job.thread.start()
            return job

    def forget(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)


@st.cache_resource(show_spinner=False)
def jobs() -> Jobs:
    return Jobs()


@st.cache_resource(show_spinner=False)
def image_sets() -> _Memory:
    """Image sets by key, so a gallery link (?dataset_image=KEY:INDEX) finds an uploaded image again."""
    return _Memory(max_bytes=1024 * 2 ** 20, max_entries=16)


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, EquishiftError) else f"{type(e).__name__}: {e}"


# --- the link from the gallery to the single-image page ----------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and (arr == arr[:, :, :1]).all() else arr).save(buf, "PNG")
    return buf.getvalue()


def image_bytes(data: ds.ImageSet, index: int) -> bytes:
    """The file of image ``index`` as the single-image page reads it: the upload's own bytes, or for
    Fashion-MNIST the 28×28 grey PNG (which the zoo models pad exactly as the dataset tensor is padded)."""
    if data.blobs is not None:
        return data.blobs[index]
    return _png(data.thumbnail(index))


def linked_choice() -> Optional[sources.ImageChoice]:
    """The image a gallery link names (``?dataset_image=KEY:INDEX``), for the single-image page's image
    picker; None without the parameter. Fashion-MNIST images are always found; an uploaded set only while
    this server still holds it (else a warning, and the page's own image is used)."""
    value = st.query_params.get("dataset_image")
    if not value:
        return None
    key, _, idx = value.rpartition(":")
    try:
        index = int(idx)
        data = image_sets().get(key)
        if data is None and key.startswith("fmnist-test-"):
            n = int(key.split("-")[2])
            data = ds.fashion_mnist_set(n)
            if data.key != key:
                data = None
        if data is None or not 0 <= index < len(data):
            raise EquishiftError("this server no longer holds that dataset (it was restarted or the upload "
                                 "was evicted); open it from the Dataset page again")
        raw = image_bytes(data, index)
    except (ValueError, EquishiftError) as e:
        st.sidebar.warning(f"Cannot open the dataset image {value[:60]!r}: {_message(e)}")
        return None
    st.sidebar.info(f"Image **{data.names[index]}** from the dataset view ({data.name}).")
    if st.sidebar.button("Use the sidebar's images instead", key="dataset_image_clear"):
        del st.query_params["dataset_image"]
        st.rerun()
    return sources.ImageChoice(raw, f"{data.names[index]} ({data.name})", hashlib.sha256(raw).hexdigest(), False)


def _wrap(v: int, size: int, mode: str) -> int:
    # the single-image page shows circular shifts in [-size/2, size/2)
    return int(ds.wrap_shift(int(v), size)) if mode == "circular" and size else int(v)


def single_image_link(data: ds.ImageSet, index: int, shift: Tuple[int, int], mode: str,
                      size: Tuple[int, int]) -> str:
    """``size``: the model's input (H, W); a circular dy wraps by H, dx by W."""
    dy, dx = _wrap(int(shift[0]), size[0], mode), _wrap(int(shift[1]), size[1], mode)
    # the sidebar's model choices travel in the URL (the single-image page's widgets are bound to it)
    mine = ("baseline_", "anchored_")
    params = {str(k): v for k, v in st.session_state.to_dict().items()
              if str(k).startswith(mine) and isinstance(v, str) and not str(k).endswith(("_upload", "_paper_up"))}
    params.update({k: v for k, v in st.query_params.to_dict().items() if k.startswith(mine)})
    r = max(1, abs(dy), abs(dx))
    params.update(dataset_image=f"{data.key}:{index}", shift=f"{dy},{dx}", grid=f"r{r}",
                  shift_mode=SINGLE_PAGE_MODE[mode])
    return "./?" + urllib.parse.urlencode(params)


# --- inputs ------------------------------------------------------------------------------------------
def _models(pair: List[Optional[str]]) -> Tuple[List[Any], List[str]]:
    st.subheader("Models")
    more = st.text_area("More models (one spec per line: zoo:…, timm:…, anchored[pos-only]:…, paper:…)",
                        key="ds_more", height=80,
                        help=f"Compared with the sidebar's pair; {MAX_MODELS} models at most. E.g. "
                             f"zoo:fmnist-vit-pos-only")
    specs = [s for s in pair if s] + [ln.strip() for ln in more.splitlines() if ln.strip()]
    specs = list(dict.fromkeys(specs))
    errors = []
    if len(specs) > MAX_MODELS:
        errors.append(f"{len(specs)} models given; the dataset view compares at most {MAX_MODELS} — "
                      f"the first {MAX_MODELS} are used.")
        specs = specs[:MAX_MODELS]
    loaded = []
    for spec in specs:
        try:
            with st.spinner(f"Loading {spec} …"):
                loaded.append(compute.get_model(spec))
        except Exception as e:  # noqa: BLE001 - a bad spec must leave the page alive
            errors.append(f"Could not load `{spec[:120]}`: {_message(e)}")
    return loaded, errors


def _data() -> Tuple[Optional[ds.ImageSet], Optional[str]]:
    st.subheader("Images")
    source = st.radio("images", ("Fashion-MNIST test split", "Upload a zip", "Upload a folder"), horizontal=True,
                      key="ds_source", label_visibility="collapsed")
    if source == "Fashion-MNIST test split":
        n = st.number_input("first N images", 1, 10000, DEFAULT_N, step=50, key="ds_n")
        try:
            return _fmnist(int(n)), None
        except EquishiftError as e:
            return None, f"Cannot read Fashion-MNIST: {e}"
    if source == "Upload a folder":
        files = st.file_uploader("a folder of class/xxx.png (sub-folders named after the model's classes), or "
                                 "of images without sub-folders (no labels)", accept_multiple_files="directory",
                                 key="ds_folder")
        unlabelled = st.checkbox("ignore the sub-folders (no labels: consistency only)", key="ds_unlabelled")
        if not files:
            return None, None
        items = [(f.name, f.getvalue()) for f in files]
        top = items[0][0].split("/")[0] if items else "folder"
        try:
            return _files(items, top, not unlabelled), None
        except EquishiftError as e:
            return None, f"Cannot use the uploaded folder **{top[:80]}**: {e}"
    up = st.file_uploader("zip of class/xxx.png (folders named after the model's classes), or of images "
                          "without folders (no labels)", type=["zip"], key="ds_zip")
    unlabelled = st.checkbox("ignore the folders (no labels: consistency only)", key="ds_unlabelled")
    if up is None:
        return None, None
    raw = up.getvalue()
    try:
        return _zip(hashlib.sha256(raw).hexdigest(), raw, up.name, not unlabelled), None
    except EquishiftError as e:
        return None, f"Cannot use the uploaded zip **{up.name[:80]}**: {e}"


def _fmnist(n: int) -> ds.ImageSet:
    hit = memory().get(("fmnist", n))
    if hit is None:
        hit = ds.fashion_mnist_set(n)
        memory()[("fmnist", n)] = _Sized(hit, n * 1024)
    else:
        hit = hit.value
    image_sets()[hit.key] = hit
    return hit


def _zip(sha: str, raw: bytes, name: str, labels: bool) -> ds.ImageSet:
    key = ("zip", sha, labels)
    hit = memory().get(key)
    if hit is None:
        data = ds.zip_set(raw, name, labels=labels)
        memory()[key] = hit = _Sized(data, len(raw) * 2)
    image_sets()[hit.value.key] = hit.value
    return hit.value


def _files(items, name: str, labels: bool) -> ds.ImageSet:
    h = hashlib.sha256()
    for n, d in items:
        h.update(n.encode() + b"\0" + hashlib.sha256(d).digest())
    key = ("files", h.hexdigest(), labels)
    hit = memory().get(key)
    if hit is None:
        data = ds.files_set(items, name, labels=labels)
        memory()[key] = hit = _Sized(data, data.nbytes * 2)
    image_sets()[hit.value.key] = hit.value
    return hit.value


@dataclass
class _Sized:
    value: Any
    nbytes: int


def _shift_set(stride: int) -> Tuple[str, Optional[int], str]:
    st.subheader("Shifts")
    c1, c2, c3 = st.columns(3)
    label = c1.selectbox("shift set", list(SET_LABELS), key="ds_set")
    mode = MODE_LABELS[c2.selectbox("mode", list(MODE_LABELS), key="ds_mode",
                                    help="circular: torch.roll; zero-pad: black comes in; crop: the window "
                                         "moves over the image with black context (Fashion-MNIST)")]
    kind = SET_LABELS[label]
    radius = None
    if kind == "radius":
        top = stride if mode == "crop" else 16
        radius = int(c3.number_input("r (pixels)", 1, top, min(2, top), key="ds_radius",
                                     help="crop mode: at most one patch, the context the window can move over"))
    return kind, radius, mode


# --- views -------------------------------------------------------------------------------------------
def _pct(p: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if not p else round(100 * p["value"], 2)


def _ci(p: Optional[Dict[str, Any]]) -> str:
    return "" if not p else f"[{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]"


def leaderboard_frame(result: ds.DatasetResult) -> pd.DataFrame:
    rows = []
    for r in result.leaderboard:
        rows.append({"model": r["model"], "params (M)": round(r["params"] / 1e6, 3),
                     "clean acc. %": _pct(r.get("clean_accuracy")),
                     "shifted acc. % (A)": _pct(r.get("shifted-accuracy")),
                     "consistency A %": _pct(r.get("consistency-a")), "A 95% CI": _ci(r.get("consistency-a")),
                     "consistency B %": _pct(r.get("consistency-b")), "B 95% CI": _ci(r.get("consistency-b")),
                     "period-orbit %": _pct(r.get("period-orbit") or (r.get("orbit_consistency")
                                                                       if result.settings["shift_set"] == "period"
                                                                       and result.settings["mode"] == "circular"
                                                                       else None)),
                     "orbit consistency (shift set) %": _pct(r.get("orbit_consistency")),
                     "consistency (shift set) %": _pct(r.get("consistency")),
                     "forward µs / image·shift": round(1000 * r["forward_ms_per_image_shift"], 1)})
    return pd.DataFrame(rows)


def per_class_frame(result: ds.DatasetResult) -> pd.DataFrame:
    rows = []
    for sw, label in zip(result.sweeps, dp.model_labels(result.sweeps)):
        for r in ds.per_class(sw):
            rows.append({"model": label, "class": r["class"], "images": r["n"],
                         "clean acc. %": _pct(r.get("clean_accuracy")),
                         "shifted acc. %": _pct(r.get("shifted_accuracy")),
                         "consistency %": _pct(r["consistency"]), "consistency 95% CI": _ci(r["consistency"]),
                         "orbit consistency %": _pct(r["orbit_consistency"])})
    return pd.DataFrame(rows)


def _chart(fig, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


def _view_consistency(result: ds.DatasetResult) -> None:
    by = st.radio("group by", ("‖δ‖∞", "dy", "dx"), horizontal=True, key="ds_by")
    _chart(dp.consistency_curve(result.sweeps, {"‖δ‖∞": "linf", "dy": "dy", "dx": "dx"}[by]), "ds_fig_curve")


def _view_maps(result: ds.DatasetResult) -> None:
    options = {"probability of the unshifted top-1": "p_ref", "flip rate": "flip"}
    if all(s.labelled for s in result.sweeps):
        options["probability of the true class"] = "p_true"
    which = st.radio("map", list(options), horizontal=True, key="ds_map")
    _chart(dp.orbit_map(result.sweeps, options[which]), "ds_fig_map")


def _view_classes(result: ds.DatasetResult) -> None:
    st.dataframe(per_class_frame(result), hide_index=True, width="stretch", key="ds_class_table")
    metrics = ["consistency", "orbit_consistency"]
    if all(s.labelled for s in result.sweeps):
        metrics = ["clean_accuracy", "shifted_accuracy"] + metrics
    else:
        st.caption("No labels: classes are the unshifted predictions, and there is no accuracy.")
    metric = st.radio("bar chart", metrics, horizontal=True, key="ds_class_metric",
                      format_func=lambda m: m.replace("_", " "))
    _chart(dp.per_class_bars(result.sweeps, metric), "ds_fig_class")


def _view_gallery(result: ds.DatasetResult, data: ds.ImageSet) -> None:
    labels = dp.model_labels(result.sweeps)
    c1, c2, c3 = st.columns(3)
    by = c1.radio("sort by", ("smallest flipping shift", "largest probability drop"), key="ds_gallery_by")
    which = c2.selectbox("ranked by the model", range(len(labels)), format_func=lambda j: labels[j],
                         key="ds_gallery_model")
    count = c3.slider("images", 4, 48, 12, step=4, key="ds_gallery_n")
    rows = ds.fragility(result.sweeps, "flip" if by.startswith("smallest") else "drop", model=int(which))[:count]
    sw = result.sweeps[int(which)]
    size = (int(sw.meta["input_size"][1]), int(sw.meta["input_size"][2]))
    st.caption("Each card: every model's prediction unshifted → at the worst shift; p₀: the probability of the "
               "unshifted class there. *open at shift* shows the image in the single-image page at that shift.")
    cols = st.columns(4)
    for j, r in enumerate(rows):
        with cols[j % 4].container(border=True, key=f"ds_card_{j}"):
            st.image(data.thumbnail(r["index"]), width=96)
            flip = "never flips" if r["smallest_flip"] is None else f"flips at ‖δ‖∞ = {r['smallest_flip']}"
            truth = f" · true: {sw.classes[r['label']]}" if r["label"] >= 0 else ""
            st.caption(f"**{data.names[r['index']]}**{truth} · {flip} · drop {r['max_drop']:.2f}")
            st.markdown("\n".join(f"- {lab}: {p['unshifted']} → **{p['at_worst']}** "
                                  + ("(not in its shift set)" if p["p_ref_at_worst"] is None
                                     else f"(p₀ {p['p_ref_at_worst']:.2f})")
                                  for lab, p in zip(labels, r["predictions"])))
            dy, dx = r["worst_shift"]
            href = single_image_link(data, r["index"], (dy, dx), sw.mode, size)
            st.markdown(f'<a href="{href}" target="_self" class="es-open-single" data-index="{r["index"]}" '
                        f'data-shift="{_wrap(dy, size[0], sw.mode)},{_wrap(dx, size[1], sw.mode)}">'
                        f'open at shift ({dy}, {dx}) ↗</a>', unsafe_allow_html=True)


def _view_leaderboard(result: ds.DatasetResult) -> None:
    st.dataframe(leaderboard_frame(result), hide_index=True, width="stretch", key="ds_board")
    st.caption("Consistency A/B, clean and shifted accuracy (A): `python -m equishift evaluate`'s protocols "
               "(docs/metrics.md) on the same images, seed 0; 95% Wilson intervals. Click a column to sort.")
    y = "clean_accuracy" if result.settings["labelled"] else "orbit_consistency"
    _chart(dp.leaderboard_scatter(result.leaderboard, "consistency-a", y, result.settings.get("describe") or ""),
           "ds_fig_scatter")


def _view_polyphase(result: ds.DatasetResult) -> None:
    over = st.radio("phase selected", ("unshifted", "all"), horizontal=True, key="ds_phase_over",
                    format_func=lambda v: {"unshifted": "for the unshifted images",
                                           "all": "over images × shifts"}[v],
                    help="Over a whole circular period every phase comes up equally often by construction "
                         "(each shift moves the choice along): the unshifted images show the data.")
    fig = dp.phase_frequency(result.sweeps, over)
    if fig is None:
        st.info("None of these models is anchored: no polyphase statistics.")
        return
    _chart(fig, "ds_fig_phase")
    _chart(dp.margin_histogram(result.sweeps), "ds_fig_margin")
    rows = [{"model": lab, "module": p["module"], "choices": p["choices"], "smallest margin": p["margin_min"],
             "tie tolerance": p["tie_tol"], "choices within 10× the tolerance": p["near_ties"]}
            for sw, lab in zip(result.sweeps, dp.model_labels(result.sweeps)) for p in ds.polyphase_stats(sw)]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="ds_poly_table")


def _exports(result: ds.DatasetResult, data: ds.ImageSet) -> Dict[str, Any]:
    """The export payloads, built once per result (tabs draw on every rerun; the report inlines plotly.js),
    kept in the shared memory with their real size."""
    key = ("exports", id(result), result.settings.get("data_key"), tuple(result.settings.get("models", ())))
    hit = memory().get(key)
    if hit is not None and hit.value[0] is result:
        return hit.value[1]
    figs = dp.all_figures(result.sweeps, result.leaderboard)
    gallery = ds.fragility(result.sweeps, "flip")[:12]
    for g in gallery:
        g["name"] = data.names[g["index"]]
    out = dict(csv=dr.per_image_csv(result, data), parquet=dr.per_image_parquet(result, data),
               json=dr.metrics_json(result), report=dr.report_html(result, figs, dr.cli_command(result.settings),
                                                                   gallery))
    # the entry keeps the result alive too: count it, or the memory's byte bound would not hold
    memory()[key] = _Sized((result, out), sum(len(v) for v in out.values()) + result.nbytes)
    return out


def _view_export(result: ds.DatasetResult, data: ds.ImageSet) -> None:
    st.code(dr.cli_command(result.settings), language="bash")
    st.caption("The command recomputes every number and figure of this page (same builders).")
    out = _exports(result, data)
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("per-image table (CSV)", out["csv"], "per_image.csv", "text/csv", key="ds_dl_csv")
    c2.download_button("per-image table (Parquet)", out["parquet"], "per_image.parquet",
                       "application/octet-stream", key="ds_dl_parquet")
    c3.download_button("metrics (JSON)", out["json"], "metrics.json", "application/json", key="ds_dl_json")
    c4.download_button("report (HTML)", out["report"], "dataset-report.html", "text/html", key="ds_dl_report")
    if st.button("Build the bundle: every figure as PNG, SVG and HTML + tables + report (zip)", key="ds_bundle"):
        from equishift.report import find_browser

        with st.spinner("Rendering the figures …"):
            st.session_state["ds_bundle_bytes"] = dr.bundle_zip(result, data, static=find_browser() is not None)
    if st.session_state.get("ds_bundle_bytes"):
        st.download_button("download dataset-view.zip", st.session_state["ds_bundle_bytes"], "dataset-view.zip",
                           "application/zip", key="ds_dl_bundle")


VIEWS = ("Consistency vs shift", "Mean orbit maps", "Per class", "Fragility gallery", "Leaderboard",
         "Polyphase", "Export")


def _guard(name: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - one view failing must not take the others down
        st.error(f"Cannot show {name.lower()}: {_message(e)}")


def views(result: ds.DatasetResult, data: ds.ImageSet) -> None:
    s = result.settings
    st.success(f"{s['n_images']} images of {s['data']} × {len(result.sweeps)} models; {s.get('describe')}"
               + ("" if s["labelled"] else " · no labels: consistency only"))
    tabs = st.tabs(list(VIEWS))
    fns = (_view_consistency, _view_maps, _view_classes, lambda r: _view_gallery(r, data), _view_leaderboard,
           _view_polyphase, lambda r: _view_export(r, data))
    for tab, name, fn in zip(tabs, VIEWS, fns):
        with tab:
            _guard(name, fn, result)


# --- run control -------------------------------------------------------------------------------------
def _key(models, data: ds.ImageSet, kind: str, radius: Optional[int], mode: str) -> str:
    parts = [ds.model_key(m) for m in models] + [data.key, kind, str(radius), mode, str(ds.ENGINE_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _run_fn(models, data, kind, radius, mode, slots=None, mem=None):
    """``run(progress, should_stop)`` for ``Jobs.start``: the analysis, holding one of the server's sweep
    slots (shared with the single-image page's sweeps) for its whole duration."""
    slots = slots if slots is not None else compute.sweep_slots()  # here: the job thread has no script context
    mem = mem if mem is not None else memory()

    def run(progress, should_stop):
        with compute.sweep_slot(on_wait=lambda: progress(0, 0, "waiting for a free sweep slot"), slots=slots):
            if should_stop():
                raise ds.Cancelled("cancelled while waiting for a sweep slot")
            return ds.analyse(models, data, kind, mode=mode, radius=radius, cache=ds.DiskCache(), memory=mem,
                              progress=progress, should_stop=should_stop)
    return run


# the leaderboard's protocols cost about this many forward passes per image (consistency A and B, clean and
# shifted accuracy, period-orbit: each a few shifted copies); the sweep's own rows dominate large shift sets
_PROTOCOL_ROWS = 8


def estimate_seconds(models, data: ds.ImageSet, kind: str, radius: Optional[int], mode: str) -> float:
    """The run's expected seconds: per model not yet swept (in memory or on disk), its measured forward time
    per image (``compute.forward_seconds``) × images × (shifts + the protocols' passes)."""
    import torch

    cache = ds.DiskCache()
    total = 0.0
    for m in models:
        key = ds.sweep_key(m, data, kind, mode, radius)
        if memory().get(ds._key_name(key)) is not None or cache.paths(key)[0].exists():
            continue
        k = len(ds.shift_set(kind, m.stride, tuple(m.input_size[1:]), mode, radius))
        x = torch.zeros(1, *m.input_size, device=m.device)
        total += compute.forward_seconds(m, x) * len(data) * (k + _PROTOCOL_ROWS)
    return total


def _session() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


def _from_cache(models, data, kind, radius, mode) -> Optional[ds.DatasetResult]:
    """The result when every part is in memory or on disk (nothing is computed), else None."""
    try:
        return ds.analyse(models, data, kind, mode=mode, radius=radius, cache=ds.DiskCache(), memory=memory(),
                          should_stop=lambda: True)
    except ds.Cancelled:
        return None


def _cancel(key: str, session: str) -> None:
    job = jobs().get(key)
    if job is not None and job.cancel(session):
        job.thread.join(timeout=30)  # it stops at the next chunk (a fraction of a second)


@st.fragment(run_every=1.0)
def _progress(key: str) -> None:
    job = jobs().get(key)
    if job is None or not job.running:
        # finished (its result is in the shared memory) or gone: the whole page draws what there is now
        st.rerun(scope="app")
    session = _session()
    watching = job.watch(session)
    frac = job.done / job.total if job.total else 0.0
    eta = job.eta()
    n = max(1, int(st.session_state.get("ds_n_images", 1)))
    models = max(1, job.total // n) if job.total else 1
    model = min(models, job.done // n + 1)
    images = job.done - (model - 1) * n
    text = (f"{'sweeping' if job.stage == 'sweep' else job.stage} · model {model} of {models} · "
            f"{images} / {n} images · {job.done} / {job.total or '?'} image·model runs"
            + (f" · ETA {eta:.0f} s" if eta is not None else ""))
    if job.stage.startswith("waiting"):
        text = "waiting for a free sweep slot (other runs of this server are using them)"
    st.progress(min(1.0, frac), text=text)
    if session in job.left:
        st.caption(f"You cancelled this run; it goes on for the {watching} other session(s) watching it.")
        return
    if watching > 1:
        st.caption(f"This run is shared with {watching - 1} other session(s) asking for the same analysis: "
                   f"Cancel stops it only when every one of them has cancelled.")
    st.button("Cancel", key="ds_cancel", on_click=_cancel, args=(key, session))


def main() -> None:
    baseline, anchored = sources.model_picker()
    st.title("equishift — dataset view")
    st.caption("Shift robustness over many images and several models: consistency against the shift, mean "
               f"orbit maps, per class, the most fragile images, a leaderboard. Models run on "
               f"**{compute.device_label()}**.")
    models, model_errors = _models([baseline, anchored])
    for e in model_errors:
        st.error(e)
    data, data_error = _data()
    if data_error:
        st.error(data_error)
    if not models:
        st.info("Choose at least one model (sidebar, or More models).")
        return
    kind, radius, mode = _shift_set(models[0].stride)
    if data is None:
        if not data_error:
            st.info("Upload a zip of images to analyse.")
        return
    try:
        for m in models:
            data.labels_for(m.classes)  # class folders must match every model's classes
        key = _key(models, data, kind, radius, mode)
    except Exception as e:  # noqa: BLE001
        st.error(f"Cannot use these images with these models: {_message(e)}")
        return
    st.session_state["ds_n_images"] = len(data)
    job = jobs().get(key)
    # one result object per key, kept with the sweeps: the export payloads built for it are kept with it
    result = memory().get(("result", key))
    if result is None and job is not None and job.result is not None:
        # every session watching the run takes it from the job (kept KEEP_FINISHED_S after it ends)
        result = job.result
    if result is None and (job is None or not job.running):
        try:
            result = _from_cache(models, data, kind, radius, mode)
        except Exception as e:  # noqa: BLE001
            st.error(f"Cannot run: {_message(e)}")
            return
    if result is not None:
        memory()[("result", key)] = result
    if result is None:
        if job is not None and job.running:
            _progress(key)
            return
        if job is not None and job.error:
            st.error(f"The run failed: {job.error}")
        if job is not None and job.cancelled:
            st.warning(f"Cancelled after {job.done} of {job.total} image·model runs; nothing was kept of the "
                       f"unfinished model (finished models are cached).")
        try:
            ks = [len(ds.shift_set(kind, m.stride, tuple(m.input_size[1:]), mode, radius)) for m in models]
            est = estimate_seconds(models, data, kind, radius, mode)
        except EquishiftError as e:
            st.error(f"Cannot run: {e}")
            return
        st.write(f"{len(data)} images × {' + '.join(str(k) for k in ks)} shifts ({len(models)} models) = "
                 f"{len(data) * sum(ks):,} forward passes (plus the leaderboard's protocols); about "
                 f"{est:.0f} s on {compute.device_label()}.")
        budget = session_limits.max_sweep_s()
        if est > budget:
            st.error(f"This run would take about {est:.0f} s, over this server's budget of {budget:.0f} s per "
                     f"run ($EQUISHIFT_MAX_SWEEP_S): use fewer images, a smaller shift set or fewer models.")
            return
        if st.button("Run", type="primary", key="ds_run"):
            jobs().start(key, _run_fn(models, data, kind, radius, mode))
            st.rerun()
        return
    views(result, data)
