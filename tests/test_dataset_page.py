"""The Dataset page under AppTest on three tiny random zoo models: every view, labelled and unlabelled
uploads, a bad zip (the rest of the page stays), cancel, the disk cache across a restart, and the
gallery's link into the single-image page (the image and the shift it opens at)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_harness import APP, ROOT  # noqa: E402

from equishift import dataset_sweep as ds  # noqa: E402

N = 16
NAMES = ("dsp-vit-baseline", "dsp-vit-anchored", "dsp-vit-pos")


@pytest.fixture(scope="module")
def zoo():
    from zoo_helpers import write_tiny

    root = Path(tempfile.mkdtemp(prefix="equishift-dataset-zoo-"))
    cache = Path(tempfile.mkdtemp(prefix="equishift-dataset-cache-"))
    write_tiny(root, NAMES[0], seed=0)
    write_tiny(root, NAMES[1], anchoring="full", seed=1)
    write_tiny(root, NAMES[2], anchoring="pos-only", seed=2)
    old = {k: os.environ.get(k) for k in ("EQUISHIFT_ZOO_DIR", "EQUISHIFT_CACHE_DIR")}
    os.environ.update(EQUISHIFT_ZOO_DIR=str(root), EQUISHIFT_CACHE_DIR=str(cache))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        yield [f"zoo:{n}" for n in NAMES], cache
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


# The Dataset page alone (the app itself opens on the single-image page; AppTest cannot switch to a page
# that is a function).
SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from dashboard import dataset_page
dataset_page.main()
"""


def _open(specs, more: str = "", n: int = N):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_string(SCRIPT, default_timeout=300)
    at.run()
    at.sidebar.selectbox(key="baseline_zoo").set_value(specs[0])
    at.sidebar.selectbox(key="anchored_zoo").set_value(specs[1])
    at.text_area(key="ds_more").set_value(more)
    if n is not None:
        at.number_input(key="ds_n").set_value(n)
    return at.run()


def _errors(at):
    return [e.value for e in at.error]


def _wait_result(at, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "ds_board" in _frames(at):
            return at
        assert not at.exception, at.exception
        assert not _errors(at), _errors(at)
        time.sleep(0.3)
        at.run()
    raise AssertionError("the dataset view did not finish")


def _frames(at):
    """The page's tables by what they are (AppTest does not expose a dataframe's key)."""
    out = {}
    for el in at.dataframe:
        cols = set(el.value.columns)
        name = ("ds_board" if "params (M)" in cols else "ds_class_table" if "images" in cols else
                "ds_poly_table" if "module" in cols else None)
        if name:
            out[name] = el.value
    return out


def _run(at):
    at.button(key="ds_run").click().run()
    return _wait_result(at)


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[4:24, 6:22] = rng.integers(60, 255, (20, 16))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_every_view_on_three_models(zoo, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent")  # the bundle without PNG/SVG: fast, no Chromium
    specs, _ = zoo
    at = _run(_open(specs, more=specs[2]))
    assert not at.exception and not _errors(at)
    assert [t.label for t in at.tabs] == ["Consistency vs shift", "Mean orbit maps", "Per class",
                                          "Fragility gallery", "Leaderboard", "Polyphase", "Export"]
    # the page's numbers are the library's on the same inputs
    from equishift.zoo import load_model

    models = [load_model(s, device="cpu") for s in specs]
    ref = ds.analyse(models, ds.fashion_mnist_set(N), "period")
    frames = _frames(at)
    board = frames["ds_board"]
    assert board["model"].tolist() == list(NAMES)
    for row, lib in zip(board.to_dict("records"), ref.leaderboard):
        assert row["consistency A %"] == pytest.approx(100 * lib["consistency-a"]["value"], abs=0.01)
        assert row["clean acc. %"] == pytest.approx(100 * lib["clean_accuracy"]["value"], abs=0.01)
        assert row["orbit consistency (shift set) %"] == pytest.approx(100 * lib["orbit_consistency"]["value"],
                                                                       abs=0.01)
    assert board["orbit consistency (shift set) %"].tolist()[1] == 100.0  # the anchored model
    classes = frames["ds_class_table"]
    assert set(classes["model"]) == set(NAMES)
    assert classes.groupby("model")["images"].sum().tolist() == [N] * 3
    poly = frames["ds_poly_table"]
    assert "dsp-vit-anchored" in set(poly["model"]) and (poly["choices"] > 0).all()
    keys = {el.key for el in at.get("plotly_chart")} if at.get("plotly_chart") else set()
    charts = [el for el in at.get("plotly_chart")]
    assert len(charts) >= 6, keys
    # every option of every view draws
    for key, values in (("ds_by", ("dy", "dx")), ("ds_map", ("flip rate", "probability of the true class")),
                        ("ds_class_metric", ("clean_accuracy", "orbit_consistency")),
                        ("ds_gallery_by", ("largest probability drop",)), ("ds_phase_over", ("all",))):
        for v in values:
            at.radio(key=key).set_value(v).run()
            assert not at.exception and not _errors(at), (key, v)
    # the gallery: one link per card, to the single-image page at that image's worst shift
    links = [m.value for m in at.markdown if "es-open-single" in m.value]
    assert len(links) == 12
    frag = {r["index"]: r for r in ds.fragility(ref.sweeps, "drop")[:12]}
    shown = {}
    for html in links:  # (the cards fill 4 columns, so the tree lists them column by column)
        href = html.split('href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        q = parse_qs(urlparse(href).query)
        key, _, index = q["dataset_image"][0].rpartition(":")
        assert key == ref.settings["data_key"]
        shown[int(index)] = q["shift"][0]
        assert q["baseline_zoo"][0] == specs[0] and q["anchored_zoo"][0] == specs[1]
    assert shown == {i: "{},{}".format(*r["worst_shift"]) for i, r in frag.items()}
    exports = {el.label for el in at.get("download_button")}
    assert {"per-image table (CSV)", "per-image table (Parquet)", "metrics (JSON)", "report (HTML)"} <= exports
    code = [c.value for c in at.code]
    assert any(c.startswith("python -m equishift evaluate --model zoo:dsp-vit-baseline") for c in code)
    at.button(key="ds_bundle").click().run()
    assert not at.exception and not _errors(at)
    assert "download dataset-view.zip" in {el.label for el in at.get("download_button")}
    with zipfile.ZipFile(io.BytesIO(at.session_state["ds_bundle_bytes"])) as zf:
        names = set(zf.namelist())
    assert "dataset-view/figures/orbit_flip.html" in names and "dataset-view/NO_PNG_SVG.txt" in names


def test_a_bad_extra_model_is_named_and_the_rest_runs(zoo):
    specs, _ = zoo
    at = _open(specs, more="zoo:no-such-model\n" + specs[2])
    errs = _errors(at)
    assert len(errs) == 1 and "zoo:no-such-model" in errs[0]
    if "ds_board" not in _frames(at):  # (another test may have run these three already: then it is cached)
        at.button(key="ds_run").click().run()
    deadline = time.monotonic() + 240
    while "ds_board" not in _frames(at) and time.monotonic() < deadline:
        time.sleep(0.3)
        at.run()
    assert _frames(at)["ds_board"]["model"].tolist() == list(NAMES)


def test_link_opens_the_image_in_the_single_image_page(zoo):
    """The single-image page given a gallery link shows that dataset image at that shift, with the same
    prediction as the dataset sweep there."""
    from streamlit.testing.v1 import AppTest

    from equishift.zoo import load_model

    specs, _ = zoo
    data = ds.fashion_mnist_set(N)
    lm = load_model(specs[0], device="cpu")
    sw = ds.sweep_dataset(lm, data, "period")
    row = ds.fragility([sw], "flip")[0]
    dy, dx = row["worst_shift"]
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update(dataset_image=f"{data.key}:{row['index']}", shift=f"{dy},{dx}", grid="r3",
                           baseline_zoo=specs[0], anchored_zoo=specs[1])
    at.run()
    assert not at.exception and not _errors(at)
    assert any("from the dataset view" in i.value for i in at.sidebar.info)
    from app_harness import live_data

    live = live_data(at)
    assert [float(v) for v in live["shift"]] == [dy, dx]
    # the page's model input is the dataset's image: its sweep gives the dataset's prediction at that shift
    from dashboard import dataset_page
    from equishift.images import load_image

    x = lm.preprocess(load_image(dataset_page.image_bytes(data, row["index"])))
    np.testing.assert_allclose(x[0].numpy(), data.image(row["index"]).numpy(), atol=1e-6)


def test_uploads_labelled_unlabelled_and_bad(zoo):
    specs, _ = zoo
    at = _open(specs, n=None)
    at.radio(key="ds_source").set_value("Upload a zip").run()
    assert not _errors(at)
    # a bad zip: a clear error, and the rest of the page (models, shift set) is still there
    at.get("file_uploader")[0].upload("broken.zip", b"PK\x03\x04 not really", "application/zip").run()
    errs = _errors(at)
    assert len(errs) == 1 and "broken.zip" in errs[0] and "not a readable zip archive" in errs[0]
    assert at.selectbox(key="ds_set") is not None and at.text_area(key="ds_more") is not None
    assert not at.exception
    # labelled: class folders named after the model's classes
    labelled = _zip({f"{c}/{i}.png": _png(10 * k + i) for k, c in enumerate(("Trouser", "bag", "Ankle boot"))
                     for i in range(3)})
    at.get("file_uploader")[0].upload("mine.zip", labelled, "application/zip").run()
    assert not _errors(at)
    _run(at)
    board = _frames(at)["ds_board"]
    assert board["clean acc. %"].notna().all()
    classes = _frames(at)["ds_class_table"]
    assert set(classes["class"]) == {"Trouser", "Bag", "Ankle boot"}
    # unlabelled: images without folders -> consistency only
    flat = _zip({f"img{i}.png": _png(i) for i in range(6)})
    at.get("file_uploader")[0].upload("flat.zip", flat, "application/zip").run()
    _run(at)
    assert any("no labels" in s.value for s in at.success)
    board = _frames(at)["ds_board"]
    assert board["clean acc. %"].isna().all() and board["consistency A %"].notna().all()
    at.radio(key="ds_map").set_value("flip rate").run()
    assert "probability of the true class" not in at.radio(key="ds_map").options
    assert not at.exception and not _errors(at)
    # a folder upload (the browser names each file by its path in the folder)
    at.radio(key="ds_source").set_value("Upload a folder").run()
    files = [(f"garments/{c}/{i}.png", _png(7 * k + i), "image/png") for k, c in enumerate(("Coat", "Sandal"))
             for i in range(3)]
    at.get("file_uploader")[0].set_value(files).run()
    assert not _errors(at)
    _run(at)
    assert set(_frames(at)["ds_class_table"]["class"]) == {"Coat", "Sandal"}
    at.radio(key="ds_source").set_value("Upload a zip").run()
    # a zip whose folders are not the model's classes: named, nothing else lost
    wrong = _zip({"cats/a.png": _png(1), "dogs/b.png": _png(2)})
    at.get("file_uploader")[0].upload("pets.zip", wrong, "application/zip").run()
    errs = _errors(at)
    assert len(errs) == 1 and "'cats' is not one of the model's classes" in errs[0]
    assert at.selectbox(key="ds_set") is not None and not at.exception


def test_cancel_then_the_disk_cache_survives_a_restart(zoo):
    from dashboard import dataset_page

    specs, cache = zoo
    at = _open(specs, n=3000)
    at.button(key="ds_run").click().run()
    assert at.button(key="ds_cancel") is not None  # running: a progress bar and Cancel
    assert any("ETA" in p.proto.text or "image·model" in p.proto.text for p in at.get("progress"))
    at.button(key="ds_cancel").click().run()
    warn = [w.value for w in at.warning]
    assert any(w.startswith("Cancelled after") for w in warn), warn
    assert at.button(key="ds_run") is not None and not _errors(at)
    # a finished run is saved to disk: a new server process (empty memory) loads it without computing
    at = _run(_open(specs[:2], n=8))
    before = _frames(at)["ds_board"]
    files = sorted(p.name for p in (cache / "dataset").glob("*.npz"))
    assert len(files) >= 2
    dataset_page.memory.clear()
    dataset_page.jobs.clear()

    def boom(*a, **k):
        raise AssertionError("recomputed although saved on disk")
    with _patched(ds, "sweep_dataset", boom):
        again = _open(specs[:2], n=8)
        assert not again.exception and not _errors(again)
        assert _frames(again)["ds_board"].equals(before)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# --- review fixes: shared jobs, watchers, sweep slots and the time budget --------------------------------
def test_a_finished_run_stays_for_every_session_watching_it(zoo, monkeypatch):
    from dashboard import dataset_page

    specs, _ = zoo
    a = _open(specs[:2], n=7)
    _run(a)  # session A draws the result ...
    finished = [j for j in dataset_page.jobs()._jobs.values() if j.result is not None]
    # ... and the job is still there, so another session's progress fragment sees it end (not a blank page)
    assert finished and not finished[0].running and finished[0].finished is not None
    b = _open(specs[:2], n=7)
    assert "ds_board" in _frames(b) and not _errors(b)
    # finished jobs go after KEEP_FINISHED_S
    monkeypatch.setattr(dataset_page, "KEEP_FINISHED_S", 0.0)
    assert dataset_page.jobs().get(finished[0].key) is None


def test_cancel_stops_a_shared_run_only_when_every_watcher_left(monkeypatch):
    from dashboard import dataset_page

    job = dataset_page.Job("k")
    assert job.watch("a") == 1 and job.watch("b") == 2
    assert job.cancel("a") is False and not job.stop.is_set()
    assert job.watch("a") == 1  # a session that left does not come back as a watcher by drawing the bar
    assert job.cancel("b") is True and job.stop.is_set()
    # a closed tab stops counting after WATCH_S
    job = dataset_page.Job("k")
    job.watch("gone")
    monkeypatch.setattr(dataset_page, "WATCH_S", 0.0)
    time.sleep(0.01)
    assert job.cancel("me") is True


def test_a_run_takes_a_sweep_slot_and_one_over_the_budget_is_refused(zoo, monkeypatch):
    import threading

    from dashboard import dataset_page
    from equishift.zoo import load_model

    specs, _ = zoo
    models = [load_model(s, device="cpu") for s in specs[:1]]
    data = ds.fashion_mnist_set(5)
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another sweep holds the only slot
    run = dataset_page._run_fn(models, data, "radius", 1, "zero", slots=slots, mem={})
    jobs = dataset_page.Jobs()
    job = jobs.start("slot-test", run)
    deadline = time.monotonic() + 10
    while job.stage != "waiting for a free sweep slot" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert job.stage == "waiting for a free sweep slot" and job.running and job.result is None
    slots.release()
    job.thread.join(timeout=120)
    assert job.error is None and job.result is not None and len(job.result.sweeps) == 1
    assert slots.acquire(blocking=False)  # given back
    slots.release()
    # the estimate: measured forward time × images × (shifts + the protocols' passes), per unswept model
    from dashboard import compute

    monkeypatch.setattr(compute, "forward_seconds", lambda m, x, batch=32: 0.01)
    est = dataset_page.estimate_seconds(models, ds.fashion_mnist_set(11), "radius", 2, "zero")
    assert est == pytest.approx(0.01 * 11 * (25 + dataset_page._PROTOCOL_ROWS))
    # over the server's budget: no Run button, a message naming the estimate and the budget
    monkeypatch.setenv("EQUISHIFT_MAX_SWEEP_S", "0.000001")
    at = _open(specs[:2], n=9)
    assert not at.exception
    err = [e for e in _errors(at) if "over this server's budget of 0 s" in e]
    assert err and "EQUISHIFT_MAX_SWEEP_S" in err[0]
    assert not [b for b in at.button if b.key == "ds_run"]
