"""equishift.dataset_sweep / dataset_plots / dataset_report and the CLI's dataset view: the batched sweep
against a per-shift loop and the single-image sweep, the aggregates against hand-counted arrays, the
disk cache's key check, uploaded zips (labelled, unlabelled, hostile), cancel, and the exports."""
from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equishift import cli
from equishift import dataset_plots as dp
from equishift import dataset_report as dr
from equishift import dataset_sweep as ds
from equishift.errors import DataError, EquishiftError, LimitError
from equishift.evaluation import evaluate, wilson_interval
from equishift.shifts import shift_batch
from equishift.zoo import load_model
from zoo_helpers import write_tiny

N = 20


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_tiny(root, "ds-vit")
    write_tiny(root, "ds-vit-anchored", anchoring="full", seed=1)
    write_tiny(root, "ds-vit-pos", anchoring="pos-only", seed=2)
    return root


@pytest.fixture(scope="module")
def models(zoo):
    return [load_model(f"zoo:{n}", device="cpu", root=zoo) for n in ("ds-vit", "ds-vit-anchored", "ds-vit-pos")]


@pytest.fixture(scope="module")
def data():
    return ds.fashion_mnist_set(N)


@pytest.fixture(scope="module")
def period(models, data):
    return [ds.sweep_dataset(m, data, "period") for m in models]


def _loop_reference(lm, data, shifts, mode):
    """Per image, per shift: one forward pass of one shifted image (the slow, obvious way)."""
    margin = max(1, int(shifts.abs().max())) if mode == "crop" else 0
    h, w = lm.input_size[1:]
    preds, probs = [], []
    with torch.no_grad():
        for i in range(len(data)):
            x = data.image(i)
            canvas = torch.nn.functional.pad(x - lm.black(x), [margin] * 4)[None] + lm.black(x)
            row_p, row_q = [], []
            for dy, dx in shifts.tolist():
                s = torch.tensor([[dy, dx]])
                if mode == "crop":
                    v = shift_batch(canvas, s, "crop", size=(h, w))
                elif mode == "zero":
                    v = shift_batch(canvas - lm.black(x), s, "zero") + lm.black(x)
                else:
                    v = shift_batch(canvas, s, "circular")
                p = lm.model(v).softmax(-1)[0]
                row_p.append(int(p.argmax()))
                row_q.append(p)
            preds.append(row_p)
            probs.append(torch.stack(row_q))
    return np.array(preds), torch.stack(probs)


@pytest.mark.parametrize("mode,kind,radius", [("circular", "period", None), ("zero", "radius", 2),
                                              ("crop", "radius", 2)])
def test_batched_sweep_equals_a_loop_over_shifts(models, mode, kind, radius):
    lm = models[1]
    data = ds.fashion_mnist_set(5)
    sw = ds.sweep_dataset(lm, data, kind, mode=mode, radius=radius, batch_size=37)
    shifts = torch.from_numpy(sw.shifts)
    pred, probs = _loop_reference(lm, data, shifts, mode)
    assert (sw.pred == pred).all()
    z = sw.ref_index()
    ref = probs[:, z].argmax(-1)
    assert (sw.ref_pred == ref.numpy()).all()
    expect = probs.gather(2, ref[:, None, None].expand(-1, len(shifts), 1))[..., 0].numpy()
    np.testing.assert_allclose(sw.p_ref, expect, atol=2e-5)
    labels = data.fmnist.labels.numpy()
    np.testing.assert_allclose(sw.p_true, probs[torch.arange(5), :, labels].numpy(), atol=2e-5)


def test_batched_sweep_equals_the_single_image_sweep(models, period, data):
    from equishift.sweep import sweep

    for lm, sw in zip(models, period):
        for i in (0, 7):
            one = sweep(lm, data.image(i), torch.from_numpy(sw.shifts), "circular", record=("logits",))
            assert (one.pred.numpy() == sw.pred[i]).all()
            np.testing.assert_allclose(one.probs[:, one.ref_pred].numpy(), sw.p_ref[i], atol=2e-5)


def test_batch_size_does_not_change_anything(models, data, period):
    other = ds.sweep_dataset(models[0], data, "period", batch_size=5)
    assert (other.pred == period[0].pred).all()
    np.testing.assert_allclose(other.p_ref, period[0].p_ref, atol=1e-5)


def test_anchored_model_is_orbit_consistent_and_selects_every_phase_equally(period, models, data):
    anch = period[1]
    assert anch.consistent.all()  # exact invariance over the circular period (the paper's claim)
    stats = ds.polyphase_stats(anch)
    assert stats and stats[0]["choices"] == N * 16
    # shifting a circular image by each of the s² phases moves the chosen phase through all of them
    np.testing.assert_allclose(stats[0]["frequency"], np.full((4, 4), 1 / 16), atol=1e-12)
    assert stats[0]["margin_hist"].sum() == N * 16
    assert ds.polyphase_stats(period[0]) == []
    # the unshifted images' choices, recorded directly
    from equishift.polyphase import record_anchors

    lm = models[1]
    x = torch.stack([data.image(i) for i in range(N)])
    with torch.no_grad(), record_anchors(lm.model) as rec:
        lm.model(x)
    for st in stats:
        want = np.zeros((st["stride"], st["stride"]))
        for r, c in rec[st["module"]].tolist():
            want[r % st["stride"], c % st["stride"]] += 1 / N
        np.testing.assert_allclose(st["ref_frequency"], want, atol=1e-12)


def test_leaderboard_orbit_consistency_equals_evaluate_period_orbit(models, data, period):
    for lm, sw in zip(models, period):
        ref = evaluate(lm, data.for_model(lm), ["period-orbit", "clean"])["protocols"]
        row = ds.leaderboard_row(sw, ref)
        assert row["orbit_consistency"]["count"] == ref["period-orbit"]["count"]
        assert row["clean_accuracy"]["count"] == ref["clean"]["count"]


def _synthetic(pred, ref_pred, labels=None, p_ref=None):
    pred = np.asarray(pred, dtype=np.int16)
    n, k = pred.shape
    shifts = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [2, 2]][:k])
    return ds.ModelSweep(
        spec="synthetic", name="synthetic", classes=["a", "b", "c"], shifts=shifts, mode="circular",
        labels=np.asarray(labels if labels is not None else [-1] * n), ref_pred=np.asarray(ref_pred),
        ref_prob=np.ones(n, dtype=np.float32),
        pred=pred, p_ref=np.asarray(p_ref if p_ref is not None else np.ones((n, k)), dtype=np.float32),
        p_true=None if labels is None else np.ones((n, k), dtype=np.float32),
        meta={"input_size": [3, 32, 32]})


def test_aggregates_count_what_they_say():
    # 4 images × shifts (0,0) (0,1) (1,0) (1,1) (0,2) (2,2)
    pred = [[0, 0, 0, 0, 0, 0],
            [1, 2, 1, 1, 1, 2],
            [2, 2, 2, 2, 0, 0],
            [0, 1, 1, 1, 1, 1]]
    sw = _synthetic(pred, [0, 1, 2, 0], labels=[0, 1, 1, 0])
    c = ds.consistency_by(sw, "linf")
    assert c["value"].tolist() == [0, 1, 2]
    # ‖δ‖∞ = 1: shifts (0,1) (1,0) (1,1): per-image fractions 1, 2/3, 1, 0 -> mean 2/3
    assert c["consistency"][1] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    # ‖δ‖∞ = 2: shifts (0,2) (2,2): 1, 1/2, 0, 0
    assert c["consistency"][2] == pytest.approx(1.5 / 4)
    assert c["lo"][2] == pytest.approx(wilson_interval(round(1.5), 4)[0])
    by_dx = ds.consistency_by(sw, "dx")
    assert by_dx["value"].tolist() == [0, 1, 2]
    m = ds.orbit_maps(sw)
    assert m["flip"][0, 1] == pytest.approx(2 / 4)   # (0,1): images 1 and 3 flip
    assert m["flip"][2, 2] == pytest.approx(3 / 4)   # (2,2): images 1, 2, 3
    assert np.isnan(m["flip"][2, 0])                 # (2,0) not swept
    rows = {r["class"]: r for r in ds.per_class(sw)}
    assert rows["a"]["n"] == 2 and rows["b"]["n"] == 2
    assert rows["a"]["clean_accuracy"]["count"] == 2      # images 0, 3 predicted a
    assert rows["b"]["clean_accuracy"]["count"] == 1      # image 1 right, image 2 (pred c) wrong
    assert rows["a"]["orbit_consistency"]["count"] == 1   # image 0 only
    # a mean over shifts stays exact (images 0 and 3: 6/6 and 1/6 of the shifts); the interval rounds it
    assert rows["a"]["consistency"]["value"] == pytest.approx((1 + 1 / 6) / 2)
    assert rows["a"]["consistency"]["ci95"] == pytest.approx(list(wilson_interval(1, 2)))
    # per image 6/6, 4/6, 4/6, 1/6 of the shifts held: 15/6 images' worth of 4
    assert ds.leaderboard_row(sw)["consistency"]["value"] == pytest.approx((15 / 6) / 4, abs=1e-12)
    assert ds.leaderboard_row(sw)["orbit_consistency"]["count"] == 1
    frag = ds.fragility([sw], "flip")
    assert [r["index"] for r in frag][:2] in ([1, 3], [3, 1])  # both flip at ‖δ‖∞ = 1
    assert frag[-1]["index"] == 0 and frag[-1]["smallest_flip"] is None
    assert frag[2]["index"] == 2 and frag[2]["smallest_flip"] == 2


def test_fragility_by_drop_and_worst_shift():
    p = [[1.0, 0.9, 0.2, 0.8], [1.0, 0.95, 0.9, 0.97]]
    sw = _synthetic([[0, 0, 1, 0], [1, 1, 1, 1]], [0, 1], p_ref=p)
    frag = ds.fragility([sw], "drop")
    assert frag[0]["index"] == 0 and frag[0]["worst_shift"] == [1, 0]
    assert frag[0]["max_drop"] == pytest.approx(0.8)
    assert frag[1]["worst_shift"] == [1, 0]  # no flip: the shift of the lowest probability


def test_disk_cache_round_trip_and_key_check(tmp_path, models, data, period, monkeypatch):
    cache = ds.DiskCache(tmp_path)
    out = ds.sweep_models(models[:2], data, "period", cache=cache)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    for a, b in zip(out, period[:2]):
        assert (a.pred == b.pred).all()

    def boom(*a, **k):
        raise AssertionError("recomputed although cached on disk")
    monkeypatch.setattr(ds, "sweep_dataset", boom)
    again = ds.sweep_models(models[:2], data, "period", cache=ds.DiskCache(tmp_path))
    for a, b in zip(again, out):
        assert (a.pred == b.pred).all() and np.array_equal(a.p_ref, b.p_ref)
        assert a.phase_counts.keys() == b.phase_counts.keys()
    key = ds.sweep_key(models[0], data, "period", "circular", None)
    npz, js = cache.paths(key)
    # a file whose recorded key differs (e.g. copied from elsewhere) is not trusted
    header = json.loads(js.read_text())
    header["key"]["n"] = 999
    js.write_text(json.dumps(header))
    assert cache.get(key) is None
    header["key"]["n"] = len(data)
    js.write_text(json.dumps(header))
    assert cache.get(key) is not None
    npz.write_bytes(npz.read_bytes()[:-10])  # truncated
    assert cache.get(key) is None


def test_cancel_stops_between_chunks(models):
    data = ds.fashion_mnist_set(40)
    seen = []
    with pytest.raises(ds.Cancelled):
        ds.sweep_dataset(models[0], data, "period", batch_size=64, progress=lambda d, t: seen.append(d),
                         should_stop=lambda: bool(seen))
    assert seen == [4]  # one chunk of 64 // 16 images, then stopped


def _png(value: int, size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    arr = np.zeros(size, dtype=np.uint8)
    arr[6:22, 8:20] = value
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _zip(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_labelled_unlabelled_and_wrapped(models):
    lab = ds.zip_set(_zip({"Trouser/a.png": _png(200), "bag/b.png": _png(120), "trouser/c.png": _png(90)}),
                     "mine.zip")
    assert lab.labelled and lab.names == ["Trouser/a.png", "bag/b.png", "trouser/c.png"]
    with pytest.raises(DataError, match="mine.zip: folder 'Trouser' is not one of the model's classes"):
        lab.labels_for(["T-shirt/top", "Bag"])
    # folder names match ignoring case: Trouser and trouser are one class
    assert lab.labels_for(models[0].classes).tolist() == [1, 8, 1]
    wrapped = ds.zip_set(_zip({"top/Bag/x.png": _png(10), "top/Coat/y.png": _png(20)}), "w.zip")
    assert wrapped.labels_for(models[0].classes).tolist() == [8, 4]
    flat = ds.zip_set(_zip({"x.png": _png(10), "y.png": _png(20)}), "flat.zip")
    assert not flat.labelled and (flat.labels_for(models[0].classes) == -1).all()
    sw = ds.sweep_dataset(models[0], flat, "period")
    assert sw.p_true is None and not sw.labelled
    assert "clean_accuracy" not in ds.leaderboard_row(sw)
    figs = dp.all_figures([sw])
    assert "orbit_p_true" not in figs and "per_class_clean_accuracy" not in figs


def test_uploaded_folder(models):
    items = [("shoes/Sneaker/a.png", _png(50)), ("shoes/Bag/b.png", _png(70)), ("shoes/.DS_Store", b"x"),
             ("shoes/Bag/notes.txt", b"hello")]
    data = ds.files_set(items, "shoes")
    assert data.names == ["shoes/Bag/b.png", "shoes/Sneaker/a.png"]
    assert data.labels_for(models[0].classes).tolist() == [8, 7]
    flat = ds.files_set([("pics/a.png", _png(1)), ("pics/b.png", _png(2))], "pics")
    assert not flat.labelled
    with pytest.raises(DataError, match="parent"):
        ds.files_set([("pics/../../etc/a.png", _png(1))], "pics")
    with pytest.raises(LimitError, match="the limit is 1"):
        ds.files_set([("p/a.png", _png(1)), ("p/b.png", _png(2))], "p", max_files=1)
    with pytest.raises(DataError, match="p/bad.png"):
        ds.files_set([("p/bad.png", b"not a png"), ("p/b.png", _png(2))], "p")


@pytest.mark.parametrize("members,err,match", [
    (None, DataError, "not a readable zip archive"),
    ({"../evil.png": _png(1)}, DataError, "parent"),
    ({"/abs/evil.png": _png(1)}, DataError, "absolute"),
    ({"notes.txt": b"hello"}, DataError, "holds no images"),
    ({"a/b/c/d.png": _png(1), "x/y.png": _png(1)}, DataError, "expected class/xxx.png"),
    ({"a/x.png": b"not an image", "b/y.png": _png(1)}, DataError, "a/x.png"),
])
def test_bad_zips_are_refused_with_a_clear_message(members, err, match):
    data = b"PK\x03\x04 garbage" if members is None else _zip(members)
    with pytest.raises(err, match=match):
        ds.zip_set(data, "up.zip")


def test_zip_limits():
    many = _zip({f"a/{i}.png": _png(i) for i in range(6)})
    with pytest.raises(LimitError, match="6 images; the limit is 5"):
        ds.zip_set(many, "many.zip", max_files=5)
    bomb = _zip({"a/x.png": b"\0" * 2_000_000, "b/y.png": _png(1)})  # inflates ~1000x
    with pytest.raises(LimitError, match="zip bomb"):
        ds.zip_set(bomb, "bomb.zip")
    with pytest.raises(LimitError, match="inflates to"):
        ds.zip_set(many, "big.zip", max_total_bytes=100)


def test_shift_sets():
    assert len(ds.shift_set("period", 4, (32, 32))) == 16
    assert len(ds.shift_set("orbit", 4, (32, 32))) == 1024
    r = ds.shift_set("radius", 4, (32, 32), "zero", radius=2)
    assert len(r) == 25 and r.abs().max() == 2
    with pytest.raises(EquishiftError, match="circular shifts only"):
        ds.shift_set("orbit", 4, (32, 32), "crop")
    with pytest.raises(EquishiftError, match="unknown shift set"):
        ds.shift_set("spiral", 4, (32, 32))


def test_figures_share_scales_and_name_the_setting(period):
    figs = dp.all_figures(period)
    assert {"consistency_linf", "consistency_dy", "consistency_dx", "orbit_p_ref", "orbit_p_true", "orbit_flip",
            "per_class_consistency", "per_class_clean_accuracy", "phase_frequency", "margin_histogram"} <= set(figs)
    fig = figs["orbit_flip"]
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert len(fig.data) == 3 and all(t.coloraxis == "coloraxis" for t in fig.data)
    assert "20 images of Fashion-MNIST test[:20]" in fig.layout.title.text
    curve = figs["consistency_linf"]
    assert len(curve.data) == 3 and tuple(curve.layout.yaxis.range) == (-0.02, 1.02)
    with pytest.raises(EquishiftError):
        dp.orbit_map(period, "entropy")


def test_exports(tmp_path, models, data):
    res = ds.analyse(models, data, "period", cache=ds.DiskCache(tmp_path / "cache"))
    assert [r["model"] for r in res.protocols] == [m.spec for m in models]
    board = {r["spec"]: r for r in res.leaderboard}
    assert board[models[1].spec]["consistency-a"]["value"] == 1.0
    info = dr.write_bundle(res, data, tmp_path / "out", static=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert len(rows) == N * 3 and rows[0]["image"] == "fmnist:0"
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "per_image.parquet")
    assert table.num_rows == N * 3
    assert [float(v) for v in table.column("consistency").to_pylist()] == [float(r["consistency"]) for r in rows]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["leaderboard"]) == 3 and metrics["settings"]["n_images"] == N
    report = (tmp_path / "out" / "report.html").read_text()
    assert "python -m equishift evaluate --model zoo:ds-vit" in report and "--limit 20" in report
    assert report.count("<figure>") == len(dp.all_figures(res.sweeps, res.leaderboard))
    assert "figures/consistency_linf.html" in info["files"]
    table = dr.comparison_table(res)
    assert table[0][0] == "model" and len(table) == 4


def test_cli_dataset_view(tmp_path, zoo, monkeypatch, capsys):
    monkeypatch.setenv("EQUISHIFT_ZOO_DIR", str(zoo))
    monkeypatch.setenv("EQUISHIFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent")  # HTML figures only: fast, no Chromium needed
    out = tmp_path / "v"
    rc = cli.main(["evaluate", "--model", "zoo:ds-vit", "--model", "zoo:ds-vit-anchored", "--limit", "12",
                   "--shifts", "r1", "--shift-mode", "zero", "--per-image", str(out / "pi.csv"), "--figures",
                   str(out / "figs"), "--report", str(out / "r.html"), "--json", str(out / "m.json"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "pi.csv")))
    assert len(rows) == 24
    assert (out / "figs" / "orbit_flip.html").is_file() and (out / "figs" / "metrics.json").is_file()
    m = json.loads((out / "figs" / "metrics.json").read_text())
    assert m["settings"]["mode"] == "zero" and m["settings"]["radius"] == 1
    assert "--shifts r1 --shift-mode zero" in (out / "r.html").read_text()
    both = json.loads((out / "m.json").read_text())["results"]
    assert [r["model"] for r in both] == ["zoo:ds-vit", "zoo:ds-vit-anchored"]
    assert "period-orbit" in both[0]["protocols"]  # the zero-pad sweep does not give it
    text = capsys.readouterr().out
    assert "dataset view: 12 images" in text
    assert cli.main(["evaluate", "--model", "zoo:ds-vit", "--shifts", "spiral", "--figures", str(out / "x"),
                     "--limit", "4", "--no-progress"]) == 2
    assert "use period, orbit or rN" in capsys.readouterr().err


@pytest.mark.chromium
def test_bundle_has_every_figure_as_png_svg_and_html(models, period):
    res = ds.DatasetResult("x", period, [], [ds.leaderboard_row(s) for s in period],
                           {"data": "Fashion-MNIST test[:20]", "data_source": "fashion-mnist", "n_images": N,
                            "labelled": True, "shift_set": "period", "radius": None, "mode": "circular",
                            "models": [m.spec for m in models], "describe": "x"})
    with zipfile.ZipFile(io.BytesIO(dr.bundle_zip(res, ds.fashion_mnist_set(N)))) as zf:
        names = set(zf.namelist())
        figs = dp.all_figures(period, res.leaderboard)
        for name in figs:
            for ext in ("png", "svg", "html"):
                assert f"dataset-view/figures/{name}.{ext}" in names
        png = Image.open(io.BytesIO(zf.read("dataset-view/figures/orbit_flip.png")))
        assert np.asarray(png.convert("L")).std() > 1
        assert {"dataset-view/per_image.csv", "dataset-view/per_image.parquet", "dataset-view/metrics.json",
                "dataset-view/report.html"} <= names


def test_full_orbit_wraps_shift_sizes_and_the_anchored_model_holds(models):
    data = ds.fashion_mnist_set(2)
    sw = ds.sweep_dataset(models[1], data, "orbit")
    assert sw.pred.shape == (2, 1024) and sw.consistent.all()
    c = ds.consistency_by(sw, "linf")
    # circular: δ and δ - 32 are one shift, so sizes run 0..16 (shift 16 is its own mirror)
    assert c["value"].tolist() == list(range(17))
    assert c["shifts"].sum() == 1024 and c["shifts"][1] == 8 and c["shifts"][16] == 32 ** 2 - 31 ** 2
    frag = ds.fragility([ds.sweep_dataset(models[0], data, "orbit")], "flip")
    assert all(r["smallest_flip"] is None or 1 <= r["smallest_flip"] <= 16 for r in frag)


# --- review fixes: cache keys, mixed shift sets, wrapping, memory, decode limits, the disk cache ---------
def test_labels_are_part_of_the_set_key_and_a_cached_sweep_is_not_reused_across_them(models, tmp_path):
    members = {"Trouser/a.png": _png(200), "Bag/b.png": _png(120)}
    raw = _zip(members)
    lab, unl = ds.zip_set(raw, "m.zip"), ds.zip_set(raw, "m.zip", labels=False)
    assert lab.labelled and not unl.labelled and lab.key != unl.key
    items = list(members.items())
    assert ds.files_set(items, "f").key != ds.files_set(items, "f", labels=False).key
    for name, data in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert ds.folder_set(tmp_path).key != ds.folder_set(tmp_path, labels=False).key
    memory, cache = {}, ds.DiskCache(tmp_path / "cache")
    first = ds.sweep_models(models[:1], lab, "period", memory=memory, cache=cache)[0]
    second = ds.sweep_models(models[:1], unl, "period", memory=memory, cache=cache)[0]
    assert first.labelled and first.labels.tolist() == [8, 1]  # Bag/b.png, Trouser/a.png
    assert not second.labelled and second.labels.tolist() == [-1, -1]


def test_fragility_looks_each_models_shift_up_in_its_own_shift_set():
    # model A (4 shifts) ranks; model B visited other shifts in another order: (0,0) (2,2) (0,1)
    a = _synthetic([[0, 1, 0, 2], [0, 0, 0, 0]], [0, 0], p_ref=[[1, .2, .9, .1], [1, 1, 1, 1]])
    b = _synthetic([[1, 2, 0], [1, 1, 1]], [1, 1], p_ref=[[1, .5, .3], [1, 1, 1]])
    b.shifts = np.array([[0, 0], [2, 2], [0, 1]])
    frag = {r["index"]: r for r in ds.fragility([a, b], "flip")}
    # image 0 flips first at ‖δ‖∞ = 1; of (0,1) and (1,1) the lower p_ref is (1,1), which B did not visit
    assert frag[0]["worst_shift"] == [1, 1]
    assert frag[0]["predictions"][1]["at_worst"] == "n/a" and frag[0]["predictions"][1]["p_ref_at_worst"] is None
    a.p_ref[0] = [1, .05, .9, .1]  # now (0,1): B's third column (class a, p 0.3), not its second
    frag = {r["index"]: r for r in ds.fragility([a, b], "flip")}
    assert frag[0]["worst_shift"] == [0, 1]
    assert frag[0]["predictions"][1]["at_worst"] == "a"
    assert frag[0]["predictions"][1]["p_ref_at_worst"] == pytest.approx(0.3)
    rows = ds.per_image_table([a, b])  # every model ranked in turn: no IndexError
    assert len(rows) == 4 and {r["model"] for r in rows} == {"synthetic"}


def test_model_key_covers_the_card_input_size_and_weights(models):
    import dataclasses

    base = models[0]
    same = dataclasses.replace(base, card=dict(base.card, metrics={"accuracy": 0.5}))
    assert ds.model_key(same) == ds.model_key(base)  # results, not preprocessing
    for change in ({"mean": [0.4]}, {"std": [0.2]}, {"classes": list(reversed(base.classes))},
                   {"input_size": [1, 36, 36]}, {"preprocess": "timm", "crop_pct": 0.9}):
        other = dataclasses.replace(base, card=dict(base.card, **change))
        assert ds.model_key(other) != ds.model_key(base), change


def test_circular_shifts_wrap_per_axis_and_from_below():
    assert ds.wrap_shift(np.array([0, 4, 5, 7, -5, -20, 16]), 8).tolist() == [0, -4, -3, -1, 3, -4, 0]
    assert ds.wrap_shift(-20, 32) == 12 and ds.wrap_shift(16, 32) == -16
    # H = 8, W = 32: dy 5 is ‖3‖, dx 5 stays 5, dx -20 is 12 (not 20)
    sw = _synthetic([[0, 1, 1, 1]], [0])
    sw.shifts = np.array([[0, 0], [5, 0], [0, 5], [0, -20]])
    sw.meta["input_size"] = [3, 8, 32]
    c = ds.consistency_by(sw, "linf")
    assert c["value"].tolist() == [0, 3, 5, 12]
    assert ds.fragility([sw], "flip")[0]["smallest_flip"] == 3
    from dashboard.dataset_page import _wrap

    assert _wrap(-20, 32, "circular") == 12 and _wrap(5, 8, "circular") == -3 and _wrap(-20, 32, "crop") == -20


def test_sweep_blocks_never_exceed_the_batch_size(models, data, period, monkeypatch):
    fed, forwarded = [], []
    real = ds.shift_batch

    def spy(x, s, *a, **k):
        fed.append(len(x))
        return real(x, s, *a, **k)

    monkeypatch.setattr(ds, "shift_batch", spy)
    for j in (0, 1):  # plain and anchored
        h = models[j].model.register_forward_hook(lambda m, i, o: forwarded.append(len(i[0])))
        try:
            sw = ds.sweep_dataset(models[j], data, "period", batch_size=5)
        finally:
            h.remove()
        assert len(sw.shifts) == 16 and max(fed) <= 5 and max(forwarded) <= 5
        assert sum(forwarded) == len(data) * 16
        ref = period[j]
        assert np.array_equal(sw.pred, ref.pred) and np.array_equal(sw.ref_pred, ref.ref_pred)
        np.testing.assert_allclose(sw.p_ref, ref.p_ref, atol=1e-5)
        np.testing.assert_allclose(sw.p_true, ref.p_true, atol=1e-5)
        for a in ref.phase_counts:
            assert np.array_equal(sw.phase_counts[a], ref.phase_counts[a])
            assert np.array_equal(sw.ref_phase_counts[a], ref.ref_phase_counts[a])
        fed.clear(), forwarded.clear()
    # large inputs: the block shrinks so its copies stay under the bound; huge orbits are refused
    assert ds._row_batch(256, (3, 32, 32)) == 256
    assert ds._row_batch(256, (3, 384, 384)) * 2 * 4 * 3 * 384 ** 2 <= ds._BLOCK_BYTES_MAX
    with pytest.raises(LimitError, match="147,456 shifts per image; the limit is 65,536"):
        ds.shift_set("orbit", 16, (384, 384))
    assert len(ds.shift_set("orbit", 16, (224, 224))) == 224 ** 2


def test_dataset_pixel_limits_and_images_decoded_once(models, monkeypatch):
    big = io.BytesIO()
    Image.new("L", (2100, 2000)).save(big, "PNG")  # 4.2 MP, a few KB compressed
    with pytest.raises(LimitError, match=r"big.png is 2100×2000 \(4.2 MP\); the limit per dataset image is 4 MP"):
        ds.zip_set(_zip({"big.png": big.getvalue()}), "b.zip")
    raw = _zip({f"x{i}.png": _png(40 + i) for i in range(3)})
    with pytest.raises(LimitError, match="over 0 MP in all"):
        ds._check_decodes(ds.ImageSet("t.zip", "t", ["a", "b"], blobs=[_png(1), _png(2)]), max_total_pixels=1000)
    import equishift.images as images

    calls = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda b, *a, **k: calls.append(1) or real(b, *a, **k))
    ds._DECODED.clear()
    data = ds.zip_set(raw, "once.zip", labels=False)
    assert len(calls) == 3  # decoded at upload ...
    ds.sweep_dataset(models[0], data, "period")
    ds.sweep_dataset(models[1], data, "period")
    assert len(calls) == 3  # ... and not again per model


def test_folder_limits(tmp_path):
    for i in range(3):
        (tmp_path / f"x{i}.png").write_bytes(_png(50 + i))
    size = (tmp_path / "x0.png").stat().st_size
    with pytest.raises(LimitError, match="x0.png is .* MB; the limit per image"):
        ds.folder_set(tmp_path, max_member_bytes=size - 1)
    with pytest.raises(LimitError, match="MB of images; the limit is"):
        ds.folder_set(tmp_path, max_total_bytes=2 * size)
    assert len(ds.folder_set(tmp_path)) == 3


def test_put_json_refuses_non_json_without_leaving_a_file_and_the_cache_is_pruned(tmp_path, period, models, data):
    cache = ds.DiskCache(tmp_path)
    assert cache.put_json({"k": 1}, {"bad": object()}) is False
    assert list(tmp_path.iterdir()) == []
    assert cache.put_json({"k": 2}, {"ok": 1}) is True and cache.get_json({"k": 2}) == {"ok": 1}
    import os
    import time as _time

    keys = [ds.sweep_key(m, data, "period", "circular", None) for m in models]
    for j, key in enumerate(keys):
        assert cache.put(key, period[j]) is not None
        for p in cache.paths(key):
            os.utime(p, (_time.time() - 100 + j, _time.time() - 100 + j))
    sizes = {key_i: sum(p.stat().st_size for p in cache.paths(k)) for key_i, k in enumerate(keys)}
    # keep room for the two newest sweeps only: the oldest goes first
    removed = cache.prune(sizes[1] + sizes[2] + 100)
    assert removed >= sizes[0] and cache.get(keys[0]) is None
    assert cache.get(keys[2]) is not None


def test_weight_hashes_do_not_keep_models_alive():
    import gc
    import weakref

    m = torch.nn.Linear(2, 2)
    ds._WEIGHT_HASHES[m] = ds._weights_sha256(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None and len([k for k in ds._WEIGHT_HASHES.keys() if isinstance(k, torch.nn.Linear)]) == 0


def test_orbit_map_ticks_are_the_integer_shifts(period):
    fig = dp.orbit_map(period[:2], "flip")
    for ax in (fig.layout.yaxis, fig.layout.xaxis, fig.layout.yaxis2):
        assert ax.dtick == 1 and ax.tickformat == "d" and ax.tick0 == 0
