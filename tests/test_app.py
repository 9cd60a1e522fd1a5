"""The dashboard driven in-process with Streamlit's AppTest (no browser).

Fast by construction: models and sweeps are cached process-wide (st.cache_resource), so only the first
run pays for loading and sweeping, and every test opens the page on a small shift grid through the
``?grid=r3`` query parameter (49 shifts per model). Expected numbers are recomputed here from
equishift directly, never copied from a previous run, and compared as numbers, never as text: float
results differ in their last bits between CPUs (PyTorch picks AVX-512, AVX2 or plain kernels at run
time), which can move a shown number by one unit in its last digit.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from app_harness import live_data, top5_tables  # noqa: E402

TIMEOUT = 300  # seconds per run: the first run loads two models and sweeps; later runs take ~0.1 s


def open_app(grid: str = "r3") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = grid
    return at.run()


def errors(at) -> list:
    return [e.value for e in at.error]


def shown_shift(at) -> tuple:
    """The shift the live view was drawn at (its readout, both input views and top-5 tables)."""
    return tuple(live_data(at)["shift"])


# The top-5 tables show p in % and Δ in percentage points, rounded to 0.1: a shown number is within 0.05
# of the value it shows (SHOWN). Values that agree to float32 precision (~1e-5 pp: the same model on
# another CPU, or an anchored model at another circular shift) may still round to neighbouring tenths,
# so two shown numbers of equal values agree within 0.1 (BETWEEN). The 1e-3 covers the float32 noise.
SHOWN = 0.05 + 1e-3
BETWEEN = 0.1 + 1e-3


def parse_top5(md: str) -> list:
    """Rows of a top-5 table: (class name, marked ★ as the unshifted top-1, p in %, Δ in pp)."""
    rows = []
    for line in md.strip().splitlines()[2:]:
        name, p, delta = (c.strip() for c in line.strip().strip("|").split("|"))
        star = name.endswith(" ★")
        rows.append((name[: -len(" ★")] if star else name, star, float(p.rstrip("%")), float(delta)))
    return rows


def assert_same_top5(a: str, b: str, tol: float = BETWEEN) -> None:
    """Two top-5 tables show the same numbers: rank by rank the same p, and each class shown in both with
    the same p, Δ and ★. Two classes whose p tie within ``tol`` may swap places, or swap across the cut."""
    ra, rb = parse_top5(a), parse_top5(b)
    assert len(ra) == len(rb), (a, b)
    for x, y in zip(ra, rb):
        assert x[2] == pytest.approx(y[2], abs=tol), (a, b)
    da, db = {r[0]: r for r in ra}, {r[0]: r for r in rb}
    for name in da.keys() & db.keys():
        x, y = da[name], db[name]
        assert x[1] == y[1] and x[2] == pytest.approx(y[2], abs=tol) and x[3] == pytest.approx(y[3], abs=tol), \
            (name, a, b)
    for name in da.keys() ^ db.keys():  # shown in one table only: a near-tie at the fifth place
        row, other = (da[name], rb) if name in da else (db[name], ra)
        assert row[2] == pytest.approx(other[-1][2], abs=tol), (name, a, b)


def assert_top5_shows(md: str, p, ref_p, classes, tol: float = SHOWN) -> None:
    """The table shows the five most probable classes of ``p`` (probabilities, recomputed here), each
    with its p, its change from ``ref_p`` (the unshifted image) and ★ on the unshifted top-1."""
    p, ref_p = np.asarray(p, dtype=np.float64), np.asarray(ref_p, dtype=np.float64)
    rows = parse_top5(md)
    want = np.argsort(-p, kind="stable")[: len(rows)]
    assert len(rows) == min(5, len(p)), md
    for (name, star, shown_p, shown_delta), i in zip(rows, want):
        j = list(classes).index(name)
        assert shown_p == pytest.approx(100 * p[j], abs=tol), (name, md)
        assert shown_delta == pytest.approx(100 * (p[j] - ref_p[j]), abs=tol), (name, md)
        assert star == (j == int(ref_p.argmax())), (name, md)
        assert p[j] == pytest.approx(p[i], abs=1e-4), (name, md)  # its rank (up to a float32 near-tie)


def model_probs(spec: str, shifts) -> tuple:
    """([softmax probabilities of the model ``spec`` on the default sample at each circular (dy, dx)],
    the model's class names)."""
    from equishift.images import load_image
    from equishift.shifts import shift
    from equishift.zoo import load_model
    from dashboard.sources import default_sample

    lm = load_model(spec, device="cpu")
    x = lm.preprocess(load_image(default_sample().read_bytes()))
    with torch.no_grad():
        return [lm.model(shift(x, dy, dx)).softmax(-1)[0].double().numpy() for dy, dx in shifts], lm.classes


def charts(at) -> list:
    return at.get("plotly_chart")


def chart_specs(at) -> list:
    return [c.proto.spec for c in charts(at)]


@pytest.fixture(scope="module")
def app():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    at = open_app()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("size,stride,mode", [(32, 4, "circular"), (224, 16, "circular"), (32, 4, "crop"),
                                               (224, 16, "crop"), (32, 4, "bilinear"), (32, 4, "zero")])
def test_grid_options(size, stride, mode):
    """Every grid the sidebar offers holds (0, 0), says its size in its label, grows (coarse first), and
    stays within what the mode allows (crop: the canvas margin; periodic modes: one orbit)."""
    from dashboard.state import GridSpec, clamp_to_grid, grid_from_param, grid_options

    opts = grid_options(size, stride, mode, crop_margin=stride)
    assert opts and len({g.key for g in opts}) == len(opts)
    for g in opts:
        shifts = g.shifts()
        assert len(shifts) == len(g) and f"{len(g)} shifts" in g.label
        assert len(g.label) <= 30, g.label  # with " · ~12 s" it still fits the sidebar's box
        assert ((shifts == 0).all(1)).any(), g.label
        assert shifts.abs().max() <= (stride if mode == "crop" else size // 2)
    assert len(opts[0]) <= len(opts[-1])
    assert grid_from_param("period", opts, mode) is opts[0] and grid_from_param("full", opts, mode) is opts[-1]
    r3 = grid_from_param("r3", opts, mode)
    assert isinstance(r3, GridSpec) and r3.shifts().abs().max() == 3
    assert grid_from_param("nonsense", opts, mode) is None
    g = opts[-1]
    assert clamp_to_grid((10 ** 6, -10 ** 6), g) == (g.values()[-1], g.values()[0])


def test_default_page_renders(app):
    from dashboard.sources import DEFAULT_ANCHORED, DEFAULT_BASELINE

    assert not app.exception
    assert errors(app) == []
    text = " ".join(m.value for m in app.markdown) + " ".join(c.value for c in app.caption)
    assert DEFAULT_BASELINE in text and DEFAULT_ANCHORED in text
    assert "Models run on" in text and ("cpu" in text or "cuda" in text)
    assert shown_shift(app) == (0, 0)
    assert len(top5_tables(app)) == 2
    assert [s["role"] for s in live_data(app)["sides"]] == ["baseline", "anchored"]  # both input views
    assert len(charts(app)) >= 1  # the open tab's figure
    table = next(m.value for m in app.markdown if m.value.startswith("**Summary over the swept shifts**"))
    assert "| **baseline** | Ankle boot" in table and "| **anchored** | Ankle boot" in table


def test_shift_change_changes_prediction_and_plots(app):
    """At a shift that is not a multiple of the patch size the baseline's probabilities move; the
    anchored model's must not (circular shifts: invariant to float precision, shown to 0.1%)."""
    at = open_app()
    before_tables, before_specs = top5_tables(at), chart_specs(at)
    at.number_input(key="shift_dy").set_value(1).run()
    at.number_input(key="shift_dx").set_value(2).run()
    assert not at.exception
    assert shown_shift(at) == (1, 2)
    after_tables, after_specs = top5_tables(at), chart_specs(at)
    moved = {r[0]: r[2] for r in parse_top5(after_tables[0])}
    still = {r[0]: r[2] for r in parse_top5(before_tables[0])}
    assert moved.keys() != still.keys() or max(abs(moved[c] - still[c]) for c in moved) > BETWEEN, \
        "baseline top-5 did not change with the shift"
    assert_same_top5(after_tables[1], before_tables[1])  # anchored: unchanged under a circular shift
    assert after_specs != before_specs, "no figure follows the shift"
    # the page's numbers are the models': recompute both at this shift and unshifted
    from dashboard.sources import DEFAULT_ANCHORED, DEFAULT_BASELINE

    (p0, p), classes = model_probs(DEFAULT_BASELINE, [(0, 0), (1, 2)])
    assert_top5_shows(after_tables[0], p, p0, classes)
    (q0, q), classes = model_probs(DEFAULT_ANCHORED, [(0, 0), (1, 2)])
    assert_top5_shows(after_tables[1], q, q0, classes)
    np.testing.assert_allclose(q, q0, rtol=0, atol=1e-4)  # float32 logits: invariant to 1e-4


def test_link_opens_on_a_shift(app):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = "r3"
    at.query_params["shift"] = "2,-1"
    at.run()
    assert shown_shift(at) == (2, -1)
    assert at.number_input(key="shift_dy").value == 2 and at.number_input(key="shift_dx").value == -1


def test_the_url_keeps_the_view(app):
    """A link reopens the view: models, shift mode, sample image, grid, shift and open tab; and what the
    user changes is written back to the URL, so the address bar can be shared at any moment."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    link = {"baseline_zoo": "zoo:fmnist-twins-svt-baseline", "anchored_zoo": "zoo:fmnist-twins-svt-anchored",
            "shift_mode": "zero-pad", "image_sample": "fmnist-0-tshirt.png", "grid": "period",
            "shift": "1,-2", "panel": "Polyphase indices"}
    for k, v in link.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception and errors(at) == []
    assert [s["role"] for s in live_data(at)["sides"]] == ["baseline", "anchored"]
    assert at.sidebar.selectbox(key="baseline_zoo").value == link["baseline_zoo"]
    assert at.sidebar.selectbox(key="anchored_zoo").value == link["anchored_zoo"]
    assert at.sidebar.selectbox(key="shift_mode").value == "zero-pad"
    assert Path(at.sidebar.selectbox(key="image_sample").value).name == "fmnist-0-tshirt.png"
    assert shown_shift(at) == (1, -2)
    assert any(c.value.startswith("Mode **zero**") and "one patch period" in c.value for c in at.caption)
    assert any("polyphase margins" in m.value for m in at.markdown)  # the polyphase tab is the one drawn
    assert dict(at.query_params) == link  # nothing lost or rewritten on the way
    # the shift is written back by the page (widget values bound to the URL are written by the browser:
    # tests/test_browser.py checks those)
    at.number_input(key="shift_dx").set_value(0).run()
    assert at.query_params["shift"] == "1,0"
    at.number_input(key="shift_dy").set_value(0).run()
    assert "shift" not in at.query_params  # (0, 0): a clean URL


def test_a_link_shift_off_the_grid_says_so(app):
    """?shift=3,5&grid=period: (3, 5) is not among one patch period's shifts (−2…1); the page shows the
    nearest swept shift and says why, instead of silently opening elsewhere."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = "period"
    at.query_params["shift"] = "3,5"
    at.run()
    assert shown_shift(at) == (1, 1)
    assert any("link asks for shift (3, 5)" in w.value and "(1, 1)" in w.value for w in at.warning), \
        [w.value for w in at.warning]
    at.number_input(key="shift_dx").set_value(0).run()
    assert not any("link asks" in w.value for w in at.warning)  # said once

def test_reset_returns_to_zero(app):
    at = open_app()
    at.number_input(key="shift_dy").set_value(-2).run()
    at.button(key="reset_shift").click().run()
    assert shown_shift(at) == (0, 0)
    assert at.number_input(key="shift_dy").value == 0


def test_heatmap_selection_moves_the_shift(app):
    at = open_app()
    at.session_state["panel"] = "Orbit heatmaps"
    at.run()
    assert len(charts(at)) == 2  # the probability and the flip heatmaps
    at.session_state["orbit_prob"] = {"selection": {"points": [{"x": -3, "y": 2, "curve_number": 1}],
                                                    "point_indices": [], "box": [], "lasso": []}}
    at.run()
    assert not at.exception
    assert shown_shift(at) == (2, -3)
    # the same (persisting) selection does not pin the shift: the inputs still move it
    at.number_input(key="shift_dx").set_value(1).run()
    assert shown_shift(at) == (2, 1)


@pytest.mark.parametrize("tab", ["Logit curves", "Orbit heatmaps", "Attention", "Polyphase indices",
                                 "Layer × shift error", "Attribution", "Export"])
def test_every_tab_renders(app, tab):
    from dashboard.panels import TABS

    assert tab in TABS
    at = open_app()
    at.session_state["panel"] = tab
    at.number_input(key="shift_dx").set_value(1).run()
    assert not at.exception, at.exception
    assert errors(at) == []


def test_mode_switch(app):
    from dashboard.sources import SHIFT_MODES

    at = open_app()
    for label in ("zero-pad", "reflect", "crop", "fractional (bilinear)"):
        at.sidebar.selectbox(key="shift_mode").set_value(label).run()
        assert not at.exception, (label, at.exception)
        assert errors(at) == [], (label, errors(at))
        assert any(f"Mode **{SHIFT_MODES[label]}**" in c.value for c in at.caption)
        assert len(top5_tables(at)) == 2


def test_twins_pair(app):
    """The other shipped architecture: Twins-SVT (LSA + GSA attention, anchors before every block)."""
    at = open_app()
    at.sidebar.selectbox(key="baseline_zoo").set_value("zoo:fmnist-twins-svt-baseline").run()
    at.sidebar.selectbox(key="anchored_zoo").set_value("zoo:fmnist-twins-svt-anchored").run()
    for tab in ("Attention", "Polyphase indices", "Layer × shift error"):
        at.session_state["panel"] = tab
        at.number_input(key="shift_dx").set_value(1).run()
        assert not at.exception, (tab, at.exception)
        assert errors(at) == [], (tab, errors(at))
        assert len(charts(at)) >= 1, tab
    # the polyphase tab shows each anchor's margin, the same numbers as the library's anchor_margins
    at.session_state["panel"] = "Polyphase indices"
    at.number_input(key="shift_dx").set_value(1).run()
    table = [m.value for m in at.markdown if "polyphase margins" in m.value]
    assert len(table) == 1, "no margin table for the anchored model"
    rows = [line.split("|")[1:-1] for line in table[0].splitlines() if line.startswith("| `")]
    assert [r[0].strip(" `") for r in rows][0] == "patch_embeds.0.anchor" and len(rows) >= 3
    for r in rows:
        margin, smallest, tol = (float(c) for c in (r[3], r[4], r[5]))
        assert 0 <= smallest <= margin + 1e-12 <= 1 + 1e-12 and tol == pytest.approx(1e-4)
    # circular shifts: the anchored Twins is invariant, so its top-5 table does not move (as numbers:
    # its Δ of 0 is float noise, which CPUs round to either side of zero)
    before = top5_tables(at)[1]
    at.number_input(key="shift_dy").set_value(3).run()
    after = top5_tables(at)[1]
    assert_same_top5(after, before)
    (p0, p01, p31), classes = model_probs("zoo:fmnist-twins-svt-anchored", [(0, 0), (0, 1), (3, 1)])
    assert_top5_shows(before, p01, p0, classes)
    assert_top5_shows(after, p31, p0, classes)
    np.testing.assert_allclose(p31, p01, rtol=0, atol=1e-4)  # float32 logits: invariant to 1e-4


def test_anchorize_the_baseline(app):
    at = open_app()
    at.sidebar.selectbox(key="anchored_source").set_value("Anchorize the baseline").run()
    assert not at.exception
    assert errors(at) == []
    text = " ".join(m.value for m in at.markdown)
    assert "anchored[full]:zoo:fmnist-vit-baseline" in text


def test_unknown_timm_name_is_an_error_not_a_crash(app):
    at = open_app()
    at.sidebar.selectbox(key="anchored_source").set_value("timm name").run()
    at.sidebar.text_input(key="anchored_timm").set_value("vit_does_not_exist_patch16").run()
    assert not at.exception
    msgs = errors(at)
    assert any("unknown timm model" in m for m in msgs), msgs
    # the baseline side still renders
    assert len(top5_tables(at)) == 1


def test_offline_pretrained_fails_fast_with_a_message(app, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = open_app()
    at.sidebar.selectbox(key="anchored_source").set_value("timm name").run()
    at.sidebar.text_input(key="anchored_timm").set_value("vit_tiny_patch16_224").run()
    at.sidebar.checkbox(key="anchored_pretrained").check().run(timeout=60)
    assert not at.exception
    assert any("pretrained" in m and "HF_HUB_OFFLINE" in m for m in errors(at)), errors(at)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_real_png(app):
    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 10:18] = rng.integers(120, 255, (20, 8))
    at = open_app()
    at.sidebar.radio(key="image_source").set_value("Upload").run()
    at.sidebar.file_uploader(key="image_upload").upload("trousers.png", _png(img), "image/png").run()
    assert not at.exception
    assert errors(at) == []
    assert any("trousers.png" in e.label for e in at.expander)
    assert len(top5_tables(at)) == 2
    # the preprocessing box shows the original and each model's input with its recipe
    captions = " ".join(c for img in at.get("image") for c in img.captions)
    assert "original · 28×28 RGB" in captions and "baseline input" in captions and "anchored input" in captions


def test_upload_garbage_shows_error_and_app_lives(app):
    at = open_app()
    at.sidebar.radio(key="image_source").set_value("Upload").run()
    garbage = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    at.sidebar.file_uploader(key="image_upload").upload("photo.png", garbage, "image/png").run()
    assert not at.exception
    msgs = errors(at)
    assert len(msgs) == 1 and "photo.png" in msgs[0], msgs
    assert len(top5_tables(at)) == 2, "the page must keep working on the fallback sample"
    assert any("instead" in i.value for i in at.info)


@pytest.mark.slow  # renders every figure to PNG/SVG with kaleido: ~10 s idle, over a minute on a busy CPU
def test_report_download_is_a_checked_zip(app, chromium_or_none):
    from dashboard.sources import DEFAULT_ANCHORED, DEFAULT_BASELINE, default_sample
    from equishift.sweep import SweepResult

    at = open_app()
    at.session_state["panel"] = "Export"
    at.run()
    assert not [b for b in at.download_button if b.label == "Download comparison report"]
    at.button(key="build_report").click().run(timeout=TIMEOUT)
    assert not at.exception, at.exception
    assert errors(at) == []
    assert [b for b in at.download_button if b.label == "Download comparison report"]
    data = at.session_state["report_zip"]["data"]  # the bytes the download button serves
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    root = "equishift-report/"
    for want in ("report.html", "metadata.json", "data/summary.json", "data/per_shift.csv",
                 "data/baseline.npz", "data/anchored.npz"):
        assert root + want in names, (want, sorted(names))
    meta = json.loads(zf.read(root + "metadata.json"))
    assert meta["baseline"]["spec"] == DEFAULT_BASELINE and meta["anchored"]["spec"] == DEFAULT_ANCHORED
    assert meta["mode"] == "circular" and meta["num_shifts"] == 49  # the page's ±3 px grid
    assert meta["image_sha256"] == hashlib.sha256(default_sample().read_bytes()).hexdigest()
    # the data in the bundle is the page's: recompute a number from the npz and find it in the summary
    tmp = Path(tempfile.mkdtemp())
    (tmp / "b.npz").write_bytes(zf.read(root + "data/baseline.npz"))
    res = SweepResult.load(tmp / "b.npz")
    summary = json.loads(zf.read(root + "data/summary.json"))
    flips = int((res.pred != res.ref_pred).sum())
    assert summary["baseline"]["top1_flips"] == flips
    assert len(zf.read(root + "data/per_shift.csv").decode().strip().splitlines()) == 1 + 49
    html = zf.read(root + "report.html").decode()
    assert "equishift comparison report" in html and "plotly" in html.lower()
    pngs = [n for n in names if n.endswith(".png")]
    if chromium_or_none is not None:
        assert pngs, "chromium is here, so the figures must be exported as PNG"
        png = Image.open(io.BytesIO(zf.read(pngs[0])))
        assert np.asarray(png.convert("L")).std() > 1, "blank PNG"


def _safetensors_of(model) -> bytes:
    from equishift.checkpoint import save_weights

    path = Path(tempfile.mkdtemp()) / "w.safetensors"
    save_weights(model, path)
    return path.read_bytes()


def test_uploaded_checkpoint_and_anchorize_it(app):
    """A user's own weights: a timm ViT with constructor options, uploaded as safetensors, compared with
    its anchorized copy. The page must show the upload's predictions (recomputed here)."""
    import timm

    opts = "img_size=32&patch_size=4&num_classes=10&depth=2"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, depth=2).eval()
    at = open_app()
    at.sidebar.selectbox(key="baseline_source").set_value("Upload safetensors").run()
    at.sidebar.text_input(key="baseline_timm").set_value("vit_tiny_patch16_224")
    at.sidebar.text_input(key="baseline_options").set_value(opts).run()
    at.sidebar.file_uploader(key="baseline_upload").upload("mine.safetensors", _safetensors_of(model),
                                                            "application/octet-stream").run()
    at.sidebar.selectbox(key="anchored_source").set_value("Anchorize the baseline").run()
    assert not at.exception, at.exception
    assert errors(at) == [], errors(at)
    text = " ".join(m.value for m in at.markdown)
    assert "anchored[full]:timm:vit_tiny_patch16_224?" + opts + "@" in text
    # the baseline column shows this model's top-1 on the (timm-preprocessed) sample
    from equishift.images import load_image
    from equishift.zoo import load_model
    from dashboard.sources import default_sample

    spec = next(m.value for m in at.markdown if m.value.startswith("**baseline**")).split("`")[1]
    lm = load_model(spec, device="cpu")
    with torch.no_grad():
        p = lm.model(lm.preprocess(load_image(default_sample().read_bytes()))).softmax(-1)[0]
    classes = lm.classes or [str(i) for i in range(len(p))]
    assert_top5_shows(top5_tables(at)[0], p, p, classes)  # at (0, 0): p is the unshifted p


def test_bad_checkpoints_are_errors(app):
    import timm

    at = open_app()
    at.sidebar.selectbox(key="anchored_source").set_value("Upload safetensors").run()
    at.sidebar.text_input(key="anchored_timm").set_value("vit_tiny_patch16_224").run()
    at.sidebar.file_uploader(key="anchored_upload").upload("junk.safetensors", b"not a checkpoint at all" * 10,
                                                            "application/octet-stream").run()
    assert not at.exception
    msgs = errors(at)
    assert len(msgs) == 1 and "junk.safetensors" in msgs[0] and "not a checkpoint" in msgs[0], msgs
    assert len(top5_tables(at)) == 1, "the baseline keeps working"
    # weights of another architecture: the message names the mismatch
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, depth=1)
    at.sidebar.file_uploader(key="anchored_upload").upload("other.safetensors", _safetensors_of(other),
                                                            "application/octet-stream").run()
    assert not at.exception
    msgs = errors(at)
    assert len(msgs) == 1 and ("missing" in msgs[0].lower() or "shape" in msgs[0].lower()), msgs
    # a local path that does not exist
    at.sidebar.selectbox(key="anchored_source").set_value("Local checkpoint").run()
    at.sidebar.text_input(key="anchored_path").set_value("/nonexistent/weights.safetensors").run()
    assert not at.exception
    assert any("nonexistent" in m or "not found" in m.lower() for m in errors(at)), errors(at)


# A signed zero as people read it: -0.0, +0.000, −0.0 (the typographic minus), -0, -0.0%. Not -0.05.
SIGNED_ZERO = re.compile(r"(?<![\w.])[-+\u2212]0(?:\.0+)?(?![\w.])")


def _page_with_float_noise(path: str) -> None:
    """An AppTest script: the summary row, the top-5 table and the attention tab of one sweep whose
    numbers hold -0.0 and tiny negatives (loaded from ``path``), drawn by the dashboard's own panels."""
    from types import SimpleNamespace

    import torch

    from dashboard import panels
    from equishift.sweep import SweepResult

    res = SweepResult.load(path)
    side = SimpleNamespace(role="anchored", spec="test:float-noise", key=("float-noise", path), result=res)
    import streamlit as st

    from dashboard import live

    panels.summary([side], "circular")
    n = panels.probs_of(side)
    table = {"sides": {"anchored": live.side_table(n["probs"], n["ref_probs"], n["ref_pred"], classes=n["classes"])}}
    st.markdown(live.top5_markdown(live.top5_at(table, "anchored", 1)))
    k = len(res)
    real = panels._attention_scores  # the module is shared by every later test in this process: put it back
    panels._attention_scores = lambda s, layer: (torch.tensor([-0.0, -1e-12] * k)[:k],   # noqa: E731
                                                 torch.tensor([-1e-12, -0.0] * k)[:k])
    try:
        panels._attention(panels.View([side], "circular", None, tuple(res.shifts[1].tolist()), {"anchored": 1}))
    finally:
        panels._attention_scores = real


def test_no_signed_zero_in_the_dashboard(tmp_path):
    """Float noise around zero (its sign differs between CPUs) reads 0.0 in the summary table, the
    top-5 table and the attention table: the logits at every shift are the unshifted ones but for one
    class nudged up by 1e-6 (so every Δ and the probability drop are tiny, some negative), and the
    attention scores and feature errors are -0.0 and -1e-12."""
    from engine_helpers import image, vit

    from equishift.shifts import grid
    from equishift.sweep import sweep

    res = sweep(vit(), image(3), grid(range(0, 2), range(0, 2)))
    logits = res.ref_logits.clone().expand(len(res), -1).clone()
    logits[:, res.ref_pred] += 1e-6
    res.logits = logits
    res.layer_error = {k: torch.full_like(v, -0.0 if i % 2 else -1e-12) for i, (k, v) in
                       enumerate(res.layer_error.items())}
    path = str(tmp_path / "noise.npz")
    res.save(path)
    probs = res.probs.numpy()
    assert (probs[1] - res.ref_probs.numpy()).min() < 0  # the Δ column really holds tiny negatives

    at = AppTest.from_function(_page_with_float_noise, kwargs={"path": path}, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    texts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    table = next(t for t in texts if t.startswith("| top-5 at this shift |"))
    attention = next(t for t in texts if t.startswith("**Attention equivariance**"))
    for text in texts:
        assert not SIGNED_ZERO.search(text), text
    assert all(row[3] == 0 and math.copysign(1, row[3]) == 1 for row in parse_top5(table)), table
    assert "| 0.000 | 0.000 | 0.000 | 0.000 |" in attention
    summary = next(t for t in texts if t.startswith("**Summary over the swept shifts**"))
    assert "| 0.0 pp at " in summary  # the largest probability drop: -1e-7, shown as 0.0
    for spec in chart_specs(at):
        titles = re.findall(r'"text":\s*"([^"]*)"', spec)
        assert titles and not any(SIGNED_ZERO.search(t) for t in titles), titles


def test_paper_checkpoint_source_shows_its_variant(app, tmp_path):
    """A checkpoint of the paper's code (PolyViT, 32-px layout) as the anchored model, by upload: the page
    loads it without the 'anchorize it' step, predicts what the paper's model predicts and shows its
    card (epoch, best accuracy, where its anchors are)."""
    import timm

    import paper_reference as ref

    torch.manual_seed(3)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                             depth=2)
    reference = ref.trained_like(ref.PaperViT(base), 3).eval()
    path = tmp_path / "ckpt_epoch_41.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), {"MODEL": {"TYPE": "polyvit"}, "DATA": {"IMG_SIZE": 32}},
                              epoch=41, max_accuracy=88.25)
    at = open_app()
    at.sidebar.selectbox(key="anchored_source").set_value("Paper checkpoint").run()
    at.sidebar.selectbox(key="anchored_paper_arch").set_value("polyvit").run()
    at.sidebar.text_input(key="anchored_paper_timm_polyvit").set_value("vit_tiny_patch16_224")
    at.sidebar.text_input(key="anchored_paper_options").set_value("img_size=32&patch_size=4&depth=2")
    at.sidebar.radio(key="anchored_paper_how").set_value("upload").run()
    at.sidebar.file_uploader(key="anchored_paper_up").upload(path.name, path.read_bytes(),
                                                              "application/octet-stream").run()
    assert not at.exception, at.exception
    assert errors(at) == [], errors(at)
    assert not [s for s in at.sidebar.selectbox if s.key == "anchored_wrap"], "a paper model is anchored already"
    spec = next(m.value for m in at.markdown if m.value.startswith("**anchored**")).split("`")[1]
    assert spec.startswith("paper:polyvit:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=2@")
    captions = " ".join(c.value for c in at.caption)
    assert "epoch 41" in captions and "max accuracy 88.25" in captions
    frames = [df.value for df in at.dataframe if "why" in getattr(df.value, "columns", [])]
    assert frames and list(frames[-1]["module"]) == ["patch_embed"] and list(frames[-1]["anchored"]) == ["yes"]
    from equishift.images import load_image
    from equishift.zoo import load_model
    from dashboard.sources import default_sample

    lm = load_model(spec, device="cpu")
    with torch.no_grad():
        x = lm.preprocess(load_image(default_sample().read_bytes()))
        p = reference(x).softmax(-1)[0]
    assert_top5_shows(top5_tables(at)[1], p, p, lm.classes)


@pytest.mark.parametrize("name, has_attention", [
    ("resnet18", False),
    ("swin_tiny_patch4_window7_224?img_size=64&window_size=4&embed_dim=24", True),
])
def test_other_families_anchorized_in_the_app(app, name, has_attention):
    """A CNN and a Swin from timm, anchorized on the anchored side: every tab renders; the attention tab
    shows Swin's windows, and for the CNN says why there is nothing to show; the layer × shift error
    covers the CNN's stages; the model card lists the anchors that were inserted."""
    at = open_app()
    at.sidebar.selectbox(key="baseline_source").set_value("timm name").run()
    at.sidebar.text_input(key="baseline_timm").set_value(name).run()
    at.sidebar.selectbox(key="anchored_source").set_value("Anchorize the baseline").run()
    assert not at.exception, at.exception
    assert errors(at) == [], errors(at)
    for tab in ("Attention", "Layer × shift error", "Polyphase indices"):
        at.session_state["panel"] = tab
        at.number_input(key="shift_dx").set_value(1).run()
        assert not at.exception, (tab, at.exception)
        assert errors(at) == [], (tab, errors(at))
        info = " ".join(i.value for i in at.info)
        figures = [c for c in charts(at) if not str(getattr(c, "key", "")).startswith("img_")]  # not the images
        if tab == "Attention" and not has_attention:
            assert "has no attention layers: it is a CNN" in info and figures == [], info
        else:
            assert len(figures) >= 1, (tab, info)
    cards = " ".join(m.value for m in at.markdown)
    assert ("layer2.0" if not has_attention else "layers.0.blocks.0") in cards  # the anchors inserted


def test_figures_keep_their_own_colours(app):
    """Every figure on the page is drawn with its own colour scales (theme=None), as the exported files and
    the report draw it: Streamlit's theme would replace them, and zero would stop being the scale's first
    colour (an exact 0 showed pink, an exported PNG the same value black)."""
    at = open_app()
    seen = 0
    for tab in ("Orbit heatmaps", "Attention", "Layer × shift error", "Polyphase indices"):
        at.session_state["panel"] = tab
        at.number_input(key="shift_dx").set_value(1).run()
        assert not at.exception, at.exception
        for chart in charts(at):
            assert chart.proto.theme == "", (tab, chart.proto.theme)
            seen += 1
    assert seen >= 5  # 2 heatmaps, attention, layer error, one polyphase panel per anchored model


def test_a_slow_grid_is_swept_in_the_background(monkeypatch):
    """A chosen grid that is not swept yet and would keep the first render waiting is swept in the
    background: the page is drawn at once on one patch period, says what it is waiting for, and is drawn
    on the chosen grid once that is done (here every unswept grid counts as slow)."""
    import threading

    from dashboard import compute

    monkeypatch.setenv("EQUISHIFT_FIRST_RENDER_S", "0")
    gate = threading.Event()  # holds the background sweep until the first render has been looked at
    start = compute.Background.start
    monkeypatch.setattr(compute.Background, "start",
                        lambda self, key, fn: start(self, key, lambda progress: gate.wait(120) and fn(progress)))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = "r6"  # 13 × 13 shifts, swept by no other test
    at.query_params["shift"] = "5,-4"  # not on the stand-in grid: kept for the chosen one
    at.run()
    assert not at.exception and errors(at) == []
    assert live_data(at)["grid"]["n"] == 4 and len(top5_tables(at)) == 2  # one 4-px period, drawn now
    assert shown_shift(at) == (1, -2) and at.query_params["shift"] == "5,-4"
    assert not any("link asks" in w.value for w in at.warning)
    waiting = [p.proto.text for p in at.get("progress")]
    assert any("swept in the background" in t and "±6 px" in t for t in waiting), waiting
    gate.set()
    deadline = time.monotonic() + 240
    while live_data(at)["grid"]["n"] != 13:
        assert time.monotonic() < deadline, "the background sweep never arrived"
        time.sleep(0.5)
        at.run()
        assert not at.exception and errors(at) == []
    assert not any("swept in the background" in p.proto.text for p in at.get("progress"))
    assert len(top5_tables(at)) == 2
    assert shown_shift(at) == (5, -4)  # the link's shift, now that its grid is drawn


def test_warm_up_computes_what_the_default_page_needs(monkeypatch):
    """`bash run.sh dashboard` starts the server through dashboard.serve, which computes the default page's
    models and sweeps first: the first visitor's page then loads no model and runs no sweep."""
    from dashboard import compute, session

    steps = session.warm_up(log=lambda *a, **k: None)
    assert steps[0] == "models" and steps[1].startswith("sweeps (")
    warm_grid = steps[1][len("sweeps ("):-1]
    work = []
    monkeypatch.setattr(session, "sweep", lambda *a, **k: work.append("sweep"))
    monkeypatch.setattr(compute, "load_model", lambda spec, *a, **k: work.append(f"load {spec}"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not errors(at) and not at.exception
    assert work == []
    assert f"grid: {warm_grid}." in " ".join(c.value for c in at.caption)  # the grid the warm-up swept


def test_a_grid_over_the_sweep_budget_is_not_offered(monkeypatch):
    """A grid whose sweep is estimated over the server's budget is not offered, and a link asking for it
    (e.g. ?grid=full kept after switching to a 224-px model) is answered with a smaller grid and a warning:
    one visitor cannot occupy the shared sweep slots for hours."""
    from dashboard import compute

    monkeypatch.setattr(compute, "forward_seconds", lambda loaded, x, batch=32: 0.01)  # 30.7 s for 1024
    monkeypatch.setenv("EQUISHIFT_MAX_SWEEP_S", "10")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = "full"
    at.query_params["shift_mode"] = "reflect"  # a mode no other test sweeps on the full orbit
    at.run()
    assert not at.exception and errors(at) == []
    warned = [w.value for w in at.warning if "sweep budget" in w.value]
    assert len(warned) == 1 and "full orbit" in warned[0] and "31 s" in warned[0], warned
    assert live_data(at)["grid"]["n"] < 32  # drawn on a smaller grid
    grid_box = at.sidebar.selectbox(key="grid_reflect_32_4")
    assert not any("full orbit" in o for o in grid_box.options)
    assert any("Not offered: full orbit" in c.value for c in at.sidebar.caption)


def test_the_sweep_budget_counts_every_model_shown(monkeypatch):
    """A tiny baseline beside a slow anchored model: the estimate is the sum of both models' timings, so
    the pair cannot pass the budget on the baseline's speed."""
    from dashboard import compute

    slow = {"zoo:fmnist-vit-anchored": 0.01}
    monkeypatch.setattr(compute, "forward_seconds", lambda loaded, x, batch=32: slow.get(loaded.spec, 1e-4))
    monkeypatch.setenv("EQUISHIFT_MAX_SWEEP_S", "10")  # full orbit: 1.5 × 0.0101 s × 1024 = 15.5 s
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["shift_mode"] = "reflect"
    at.run()
    assert not at.exception and errors(at) == []
    assert any("Not offered: full orbit" in c.value and "16 s" in c.value for c in at.sidebar.caption), \
        [c.value for c in at.sidebar.caption]
