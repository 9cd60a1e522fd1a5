"""The dashboard driven in-process with Streamlit's AppTest (no browser).

Fast by construction: models and sweeps are cached process-wide (st.cache_resource), so only the first
run pays for loading and sweeping, and every test opens the page on a small shift grid through the
``?grid=r3`` query parameter (49 shifts per model). Expected numbers are recomputed here from
equishift directly, never copied from a previous run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
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

TIMEOUT = 300  # seconds per run: the first run loads two models and sweeps; later runs take ~0.1 s


def open_app(grid: str = "r3") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = grid
    return at.run()


def errors(at) -> list:
    return [e.value for e in at.error]


def shift_text(at) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Shift**"))


def top5_tables(at) -> list:
    return [m.value for m in at.markdown if m.value.startswith("| top-5 at this shift |")]


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
    assert shift_text(app).startswith("**Shift** (dy, dx) = `0, 0`")
    assert len(top5_tables(app)) == 2
    assert len(charts(app)) >= 2
    labels = [m.label for m in app.metric]
    assert labels.count("consistency over the orbit") == 2


def test_shift_change_changes_prediction_and_plots(app):
    """At a shift that is not a multiple of the patch size the baseline's probabilities move; the
    anchored model's must not (circular shifts: invariant to float precision, shown to 0.1%)."""
    at = open_app()
    before_tables, before_specs = top5_tables(at), chart_specs(at)
    at.number_input(key="shift_dy").set_value(1).run()
    at.number_input(key="shift_dx").set_value(2).run()
    assert not at.exception
    assert shift_text(at).startswith("**Shift** (dy, dx) = `1, 2`")
    after_tables, after_specs = top5_tables(at), chart_specs(at)
    assert after_tables[0] != before_tables[0], "baseline top-5 did not change with the shift"
    assert after_tables[1] == before_tables[1], "anchored top-5 changed under a circular shift"
    assert after_specs != before_specs, "no figure follows the shift"
    # the page's numbers are the model's: recompute the baseline's top-1 at this shift
    from equishift.images import load_image
    from equishift.shifts import shift
    from equishift.zoo import load_model
    from dashboard.sources import DEFAULT_BASELINE, default_sample

    lm = load_model(DEFAULT_BASELINE, device="cpu")
    x = lm.preprocess(load_image(default_sample().read_bytes()))
    with torch.no_grad():
        p = lm.model(shift(x, 1, 2)).softmax(-1)[0]
    top = int(p.argmax())
    assert f"| {lm.classes[top]}" in after_tables[0]
    assert f"{100 * float(p[top]):.1f}%" in after_tables[0]


def test_link_opens_on_a_shift(app):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = "r3"
    at.query_params["shift"] = "2,-1"
    at.run()
    assert shift_text(at).startswith("**Shift** (dy, dx) = `2, -1`")
    assert at.number_input(key="shift_dy").value == 2 and at.number_input(key="shift_dx").value == -1


def test_reset_returns_to_zero(app):
    at = open_app()
    at.number_input(key="shift_dy").set_value(-2).run()
    at.button(key="reset_shift").click().run()
    assert shift_text(at).startswith("**Shift** (dy, dx) = `0, 0`")
    assert at.number_input(key="shift_dy").value == 0


def test_heatmap_selection_moves_the_shift(app):
    at = open_app()
    at.session_state["panel"] = "Orbit heatmaps"
    at.run()
    assert len(charts(at)) == 2 + 2  # two shifted inputs, the probability and the flip heatmaps
    at.session_state["orbit_prob"] = {"selection": {"points": [{"x": -3, "y": 2, "curve_number": 1}],
                                                    "point_indices": [], "box": [], "lasso": []}}
    at.run()
    assert not at.exception
    assert shift_text(at).startswith("**Shift** (dy, dx) = `2, -3`")
    # the same (persisting) selection does not pin the shift: the inputs still move it
    at.number_input(key="shift_dx").set_value(1).run()
    assert shift_text(at).startswith("**Shift** (dy, dx) = `2, 1`")


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
        assert f"mode **{SHIFT_MODES[label]}**" in shift_text(at)
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
        assert len(charts(at)) >= 3, tab
    # circular shifts: the anchored Twins is invariant, so its top-5 table does not move
    before = top5_tables(at)[1]
    at.number_input(key="shift_dy").set_value(3).run()
    assert top5_tables(at)[1] == before


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
def test_report_download_is_a_checked_zip(app):
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
    if Path("/usr/bin/chromium").exists():
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
    assert f"{100 * float(p.max()):.1f}%" in top5_tables(at)[0]


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
