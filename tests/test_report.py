"""The report bundle: the CLI run end to end and its files opened and checked; no-browser fallback;
the zip bytes the dashboard downloads; no signed zero anywhere a person reads a number.

PNG/SVG export needs Chromium (kaleido): the tests that check it carry the ``chromium`` marker
(conftest.py) and skip without one; run with ``BROWSER_PATH=/nonexistent`` to see the suite as on a
machine without a browser."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zipfile
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equishift import report
from equishift.cli import main
from equishift.errors import EquishiftError
from equishift.shifts import period_grid
from equishift.sweep import SweepResult

from zoo_helpers import write_tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-report")
    base = write_tiny(root / "zoo", "tiny-base", seed=3)
    anch = write_tiny(root / "zoo", "tiny-anch", anchoring="full", seed=3)
    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 8:20] = rng.integers(120, 255, (16, 12))
    path = root / "item.png"
    Image.fromarray(img).save(path)
    return {"root": root, "base": f"zoo:{base}", "anch": f"zoo:{anch}", "image": path}


@pytest.fixture(scope="module")
def bundle(setup):
    out = setup["root"] / "bundle"
    rc = main(["sweep", "--baseline", setup["base"], "--anchored", setup["anch"], "--image", str(setup["image"]),
               "--mode", "circular", "--grid", "period", "--out", str(out), "--zip", "--device", "cpu"])
    assert rc == 0
    return out


def _figure_names(folder: Path):
    return sorted(p.stem for p in (folder / "figures").glob("*.png"))


def _html_figure_names(html: str):
    """Names (ids) of the figures in report.html's Figures section, in order."""
    section = html.split("<h2>Figures</h2>", 1)[1].split("<h2>Metadata</h2>", 1)[0]
    return re.findall(r"<figure id='([^']+)'>", section)


@pytest.mark.chromium
def test_every_figure_is_a_non_blank_png_and_an_svg(bundle):
    names = _figure_names(bundle)
    assert names == sorted(_html_figure_names((bundle / "report.html").read_text()))  # every figure exported
    assert json.loads((bundle / "metadata.json").read_text())["static_export"] == "ok"
    assert {"logit_curve", "orbit_probability", "orbit_flips", "attention_aligned", "polyphase_anchored",
            "layer_error", "attribution_saliency", "input_anchored"} <= set(names)
    for n in names:
        im = Image.open(bundle / "figures" / f"{n}.png").convert("RGB")
        a = np.asarray(im)[::3, ::3].astype(np.int32)
        assert im.size[0] >= 1000 and im.size[1] >= 500, n          # scale=2 export
        colours = np.unique(a[..., 0] * 65536 + a[..., 1] * 256 + a[..., 2])
        assert a.std() > 10 and len(colours) > 50, n  # real content, not a blank page
        svg = (bundle / "figures" / f"{n}.svg").read_text()
        assert svg.lstrip().startswith("<svg") or "<svg" in svg[:500], n
    assert not (bundle / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt").exists()


def test_html_is_offline_and_holds_the_figures_and_the_data(bundle):
    html = (bundle / "report.html").read_text()
    # plotly.js inline (no external script), so the page opens offline
    assert "<script src" not in html and "Plotly" in html and len(html) > 3_000_000
    names = _html_figure_names(html)
    assert {"logit_curve", "orbit_probability", "orbit_flips", "attention_aligned", "polyphase_anchored",
            "layer_error", "attribution_saliency", "input_anchored"} <= set(names)
    assert html.count('class="plotly-graph-div"') == len(names)  # each figure drawn once
    found = re.search(r"<script type='application/json' id='equishift-summary'>(.*?)</script>", html, re.S)
    summary = json.loads(found.group(1))
    assert summary == json.loads((bundle / "data" / "summary.json").read_text())
    for role in ("baseline", "anchored"):
        assert summary[role]["num_shifts"] == 16 and summary[role]["shift_mode"] == "circular"
        assert "circular" in summary[role]["shift_range"]


def test_data_files_agree_with_each_other(bundle):
    res = {r: SweepResult.load(bundle / "data" / f"{r}.npz") for r in ("baseline", "anchored")}
    assert torch.equal(res["baseline"].shifts, period_grid(4))
    with open(bundle / "data" / "per_shift.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    for k, row in enumerate(rows):
        assert [int(row["dy"]), int(row["dx"])] == res["baseline"].shifts[k].tolist()
        for role in ("baseline", "anchored"):
            assert int(row[f"{role}_pred"]) == int(res[role].pred[k])
            c = res[role].ref_pred
            assert float(row[f"{role}_prob_unshifted_top1"]) == pytest.approx(float(res[role].probs[k, c]), rel=1e-6)
    summary = json.loads((bundle / "data" / "summary.json").read_text())
    for role in ("baseline", "anchored"):
        flips = int((res[role].pred != res[role].ref_pred).sum())
        assert summary[role]["top1_flips"] == flips
        assert summary[role]["consistency_A_over_grid"]["value"] == pytest.approx(1 - flips / 16)
    # The anchored model is exactly invariant under circular shifts: its image anchor follows the shift.
    assert summary["anchored"]["top1_flips"] == 0
    assert summary["anchored"]["image_anchor_follows_shift_fraction"]["patch_embed.anchor"] == 1.0


def test_metadata_names_everything_needed_to_reproduce(bundle, setup):
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["image_sha256"] == hashlib.sha256(setup["image"].read_bytes()).hexdigest()
    assert meta["mode"] == "circular" and meta["grid"] == "period" and meta["num_shifts"] == 16
    assert meta["shifts"] == {"grid": "period", "count": 16, "range": "dy∈[0, 3], dx∈[0, 3]",
                              "list": "data/per_shift.csv (dy, dx)"}
    assert meta["device"] == "cpu" and meta["static_export"]  # "ok" with Chromium (checked above), else why not
    for pkg in ("torch", "timm", "plotly", "kaleido", "captum", "python"):
        assert meta["versions"][pkg]
    card = json.loads(Path(setup["base"][4:]).read_text())
    assert meta["baseline"]["spec"] == setup["base"] and meta["baseline"]["weights_file_sha256"] == card["weights_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["anchored"]["state_dict_sha256"])
    assert meta["baseline"]["state_dict_sha256"] != meta["anchored"]["state_dict_sha256"]
    assert meta["shift"] in period_grid(4).tolist() and "no shift was given" in meta["shift_origin"]
    assert meta["view"] == {**report.VIEW_DEFAULTS, "att_layers": meta["view"]["att_layers"], "attr_layer": None}


def test_zip_holds_the_same_files(bundle):
    with zipfile.ZipFile(bundle.with_name(bundle.name + ".zip")) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert names == on_disk


def test_without_a_browser_the_bundle_says_so_and_the_rest_is_written(setup, tmp_path, monkeypatch):
    import kaleido

    def no_browser(*a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed (plotly_get_chrome)")

    monkeypatch.setattr(kaleido, "start_sync_server", no_browser)
    out = report.build_report(setup["base"], setup["anch"], setup["image"], tmp_path / "b", grid=1, device="cpu")
    note = (out / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt").read_text()
    assert "Chrome" in note and "report.html" in note
    assert not list((out / "figures").glob("*.png")) and not list((out / "figures").glob("*.svg"))
    assert (out / "report.html").stat().st_size > 3_000_000
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["static_export"].startswith("RuntimeError") and meta["num_shifts"] == 9  # {-1..1}²


def test_a_missing_browser_is_reported_not_waited_for(setup, tmp_path, monkeypatch):
    """No browser where kaleido looks (BROWSER_PATH set to nothing): kaleido itself would start its server
    and then wait forever for the first image; the report notices first and writes everything else."""
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    assert report.find_browser() is None
    out = report.build_report(setup["base"], setup["anch"], setup["image"], tmp_path / "b", grid=0, device="cpu")
    note = (out / "figures" / "STATIC_EXPORT_UNAVAILABLE.txt").read_text()
    assert "no Chrome or Chromium browser found" in note and "apt-get install chromium" in note
    assert not list((out / "figures").glob("*.png")) and (out / "report.html").exists()
    assert json.loads((out / "metadata.json").read_text())["static_export"].startswith("RuntimeError: no Chrome")


def test_zip_bytes_for_the_dashboard_with_precomputed_sweeps(setup):
    from equishift.sweep import sweep
    from equishift.zoo import load_model

    base, anch = load_model(setup["base"], "cpu"), load_model(setup["anch"], "cpu")
    img = Image.open(setup["image"])
    s = period_grid(4)
    results = [sweep(m, m.preprocess(img.convert("RGB")), s) for m in (base, anch)]
    data = report.build_report(base, anch, img, zip=True, static=False, results=results)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert "equishift-report/report.html" in names and "equishift-report/data/per_shift.csv" in names
        back = SweepResult.load(io.BytesIO(zf.read("equishift-report/data/anchored.npz")))
    assert torch.equal(back.logits, results[1].logits)


def test_bad_requests_are_explained(setup, tmp_path, capsys):
    with pytest.raises(EquishiftError, match="grid must be"):
        report.choose_shifts("diagonal", 4, (32, 32))
    with pytest.raises(EquishiftError, match="output folder"):
        report.build_report(setup["base"], setup["anch"], setup["image"])
    rc = main(["sweep", "--baseline", setup["base"], "--anchored", setup["anch"], "--image",
               str(tmp_path / "missing.png"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert report.choose_shifts("full", 4, (5, 6)).shape == (30, 2)
    assert report.choose_shifts("2", 4, (32, 32)).shape == (25, 2)


def test_summary_numbers_for_an_anchored_twins_sweep():
    from equishift.shifts import grid
    from equishift.sweep import sweep

    from engine_helpers import anchored, image, twins

    res = sweep(anchored(twins()), image(5), grid(range(-3, 5), range(0, 3)))
    s = report.summarize(res)
    # Only the image-level anchor moves with the pixel shift; deeper anchors move with token shifts.
    assert s["image_anchor_follows_shift_fraction"] == {"patch_embeds.0.anchor": 1.0}
    assert s["top1_flips"] == 0 and s["orbit_consistent"] and s["minimal_flipping_shift_linf"] is None
    assert s["kl_max"] < 1e-9 and s["consistency_A_over_grid"]["n"] == 24
    assert max(s["feature_equivariance_error_max"].values()) < 1e-4


# A signed zero as people read it: -0.0, +0.000, −0.0 (the typographic minus), -0, -0.0%. Not -0.05.
SIGNED_ZERO = re.compile(r"(?<![\w.])[-+\u2212]0(?:\.0+)?(?![\w.])")


def _readable(html: str) -> str:
    """report.html without plotly.js (minified code) and the figures' base64 arrays (not text)."""
    html = re.sub(r"<script type='text/javascript'>.*?</script>", "", html, count=1, flags=re.S)
    return re.sub(r'"bdata":"[^"]*"', '"bdata":""', html)


def test_no_signed_zero_in_the_report(setup, tmp_path):
    """Values that are -0.0 or -1e-12 (float noise: the sign differs between CPUs) read as zero everywhere
    in report.html — summary and metadata tables, figure titles and data — and in the data files."""
    from equishift.sweep import sweep
    from equishift.zoo import load_model

    base, anch = load_model(setup["base"], "cpu"), load_model(setup["anch"], "cpu")
    img = Image.open(setup["image"]).convert("RGB")
    results = [sweep(m, m.preprocess(img), period_grid(4)) for m in (base, anch)]
    for r in results:
        first, second = list(r.layer_error)[:2]
        r.layer_error[first] = torch.full_like(r.layer_error[first], -0.0)
        r.layer_error[second] = torch.full_like(r.layer_error[second], -1e-12)
        r.logits, r.ref_logits = r.logits.clone(), r.ref_logits.clone()  # sweeps return inference tensors
        r.logits[:, -1], r.ref_logits[-1] = -0.0, -0.0
        r.logits[:, -2], r.ref_logits[-2] = -1e-12, -1e-12
        for layer, maps in r.attention.items():
            r.attention[layer] = maps.clone()
            r.attention[layer][:, :, 0, 0] = -0.0
    assert SIGNED_ZERO.search(f"{-0.0} {-1e-12:.1f} {1e-12:+.3f}") is not None  # the pattern finds them
    out = report.build_report(base, anch, img, tmp_path / "r", static=False, results=results)
    html = (out / "report.html").read_text()
    found = SIGNED_ZERO.findall(_readable(html))
    assert not found, found
    assert "feature_equivariance_error_mean" in html and "minimal_flipping_shift_linf" in html
    summary = json.loads((out / "data" / "summary.json").read_text())
    zero = summary["baseline"]["feature_equivariance_error_max"][first]
    assert zero == 0.0 and math.copysign(1, zero) == 1  # -0.0 is stored as 0.0 (the same value)
    assert summary["baseline"]["feature_equivariance_error_max"][second] == pytest.approx(-1e-12)  # data: exact
    cells = [c for row in csv.reader((out / "data" / "per_shift.csv").read_text().splitlines()) for c in row]
    assert "-0.0" not in cells


# --- the view the report reproduces (issue 14: the report is what the screen shows) ----------------
@pytest.fixture(scope="module")
def swept(setup):
    from equishift.sweep import sweep
    from equishift.zoo import load_model

    base, anch = load_model(setup["base"], "cpu"), load_model(setup["anch"], "cpu")
    img = Image.open(setup["image"]).convert("RGB")
    results = [sweep(m, m.preprocess(img), period_grid(4)) for m in (base, anch)]
    return base, anch, img, results


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.setdefault(name, []).append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)


def test_figures_show_the_given_shift_with_the_given_choices(swept, tmp_path, monkeypatch):
    from equishift import attribution, plots

    base, anch, img, results = swept
    calls = {}
    for name in ("shifted_image", "logit_curve", "orbit_heatmap", "attention_grid", "polyphase_panel",
                 "layer_error_map", "attribution_overlay"):
        _spy(monkeypatch, plots, name, calls)
    cams = []
    real_cam = attribution.METHODS["gradcam"]
    monkeypatch.setitem(attribution.METHODS, "gradcam", lambda *a, **k: cams.append(k) or real_cam(*a, **k))
    layer = results[0].layers[0]  # (the last block of these class-token ViTs is not read by the head)
    att_layer = list(results[0].attention)[0]
    view = {"curve_path": "column", "curve_value": "logit", "att_layers": [att_layer], "att_heads": "all",
            "att_align": False, "err_log": False, "attr_method": "gradcam", "attr_layer": layer}
    out = report.build_report(base, anch, img, tmp_path / "r", static=False, results=results, shift=(2, 1),
                              view=view, shift_origin="in the dashboard")
    k = results[0].index_of(2, 1)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["shift"] == [2, 1] and meta["shift_origin"] == "chosen in the dashboard"
    assert meta["view"] == view
    assert [c[1]["current"] for n in ("logit_curve", "orbit_heatmap", "attention_grid", "polyphase_panel",
                                      "layer_error_map") for c in calls[n]] == [k] * 6
    assert [tuple(c[0][1]) for c in calls["shifted_image"]] == [(2, 1), (2, 1)]
    (_, curve), = calls["logit_curve"]
    assert curve["value"] == "logit"
    assert results[0].shifts[curve["path"]].tolist() == [[dy, 1] for dy in range(4)]  # the column dx = 1
    (_, att), = calls["attention_grid"]
    assert att["layers"] == [att_layer] and att["heads"] == "all" and att["align"] is False
    assert calls["layer_error_map"][0][1]["log"] is False
    (_, over), = calls["attribution_overlay"]
    assert over["shift"] == (2, 1) and over["method"].startswith("GradCAM")
    assert {c["layer"] for c in cams} == {layer} and {c["shift"] for c in cams} == {(0, 0), (2, 1)}
    html = (out / "report.html").read_text()
    assert "All figures show <b>shift (dy, dx) = (2, 1)</b>, chosen in the dashboard." in html
    assert "focus shift" not in html
    names = _html_figure_names(html)
    assert "attention_as_seen" in names and "attention_aligned" not in names
    assert "attribution_gradcam" in names and "attribution_saliency" not in names
    # a shift outside the grid is refused, not replaced
    with pytest.raises(EquishiftError, match="not in the swept grid"):
        report.build_report(base, anch, img, tmp_path / "x", static=False, results=results, shift=(5, 0))
    with pytest.raises(EquishiftError, match="curve_path"):
        report.build_report(base, anch, img, tmp_path / "x", static=False, results=results,
                            view={"curve_path": "spiral"})


def test_without_a_shift_the_rule_is_stated_next_to_the_figures(bundle, setup, tmp_path):
    html = (bundle / "report.html").read_text()
    meta = json.loads((bundle / "metadata.json").read_text())
    res = SweepResult.load(bundle / "data" / "baseline.npz")
    worst = res.shifts[int(res.probs[:, res.ref_pred].argmin())].tolist()
    assert meta["shift"] == worst
    figures = html.split("<h2>Figures</h2>", 1)[1].split("<figure", 1)[0]
    assert f"shift (dy, dx) = ({worst[0]}, {worst[1]})</b>: no shift was given" in figures
    assert escape(report.FOCUS_RULE) in figures
    # the CLI's --shift picks the shift instead
    out = tmp_path / "cli"
    rc = main(["sweep", "--baseline", setup["base"], "--anchored", setup["anch"], "--image", str(setup["image"]),
               "--grid", "period", "--shift", "1,3", "--out", str(out), "--no-static", "--device", "cpu"])
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["shift"] == [1, 3] and "command line" in meta["shift_origin"]
    assert "shift (dy, dx) = (1, 3)</b>, chosen on the command line" in (out / "report.html").read_text()


def _outside_scripts(html: str) -> str:
    """The text a reader sees: report.html without any <script> (plotly.js, figure data, embedded JSON)."""
    return re.sub(r"<script\b.*?</script>", "", html, flags=re.S)


def test_report_html_reads_like_a_paper(bundle):
    html = (bundle / "report.html").read_text()
    text = _outside_scripts(html)
    assert "\\u" not in text and not re.search(r"\d\.\d{7,}", text)  # no escapes, no 16-digit floats
    for name in ("summary", "metadata"):  # the embedded JSON is not ASCII-escaped either
        embedded = re.search(rf"<script type='application/json' id='equishift-{name}'>(.*?)</script>", html, re.S)
        assert "\\u" not in embedded.group(1) and "∈" in embedded.group(1), name
    assert "circular shifts, circular shifts" not in html and "(hover:" not in _readable(html)  # figures too
    summary = text.split("<h2>Summary</h2>", 1)[1].split("<h2>Figures</h2>", 1)[0]
    assert summary.count("<table") == 1                                  # one comparison table
    assert "<thead><tr><th>metric</th><th>baseline</th><th>anchored</th></tr></thead>" in summary
    consistency = re.search(r"<th>consistency A over the grid \[95% CI\]</th><td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td>",
                            summary)
    assert consistency and all(re.fullmatch(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", v) for v in consistency.groups())
    assert re.search(r"<td class='num'>100\.0% \[\d+\.\d, 100\.0\]</td>", summary)  # anchored: no flip
    # a caption under every figure naming the models, mode, grid and shift
    meta = json.loads((bundle / "metadata.json").read_text())
    figures = re.findall(r"<figure id='[^']+'>(.*?)</figure>", text, re.S)
    assert len(figures) == len(_html_figure_names(html)) == html.count('class="plotly-graph-div"') >= 9
    shift = f"shift (dy, dx) = ({meta['shift'][0]}, {meta['shift'][1]})"
    for fig in figures:
        caption, = re.findall(r"<figcaption>(.*?)</figcaption>", fig, re.S)
        for want in (meta["baseline"]["spec"], meta["anchored"]["spec"], "Circular shifts", "period grid",
                     "16 shifts", shift):
            assert want in caption, (want, caption)
    # metadata: a table a reader scans; the shift list is summarised, not dumped
    metadata = text.split("<h2>Metadata</h2>", 1)[1]
    assert metadata.count("<table") == 1 and "[[0, 0], [0, 1]" not in html and "16 shifts" in metadata
    assert "[0, 0]" not in (bundle / "metadata.json").read_text()
    assert "\\u" not in (bundle / "data" / "summary.json").read_text()


def test_progress_reports_each_stage_with_rising_counts(setup, tmp_path):
    calls = []
    report.build_report(setup["base"], setup["anch"], setup["image"], tmp_path / "p", grid=0, device="cpu",
                        static=False, progress=lambda *a: calls.append(a))
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages == report.report_stages(sweeps=True, static=False)
    for stage in stages:
        done = [d for s, d, t in calls if s == stage]
        totals = {t for s, d, t in calls if s == stage}
        assert len(totals) == 1 and done[-1] == totals.pop() and done == sorted(done) and len(done) >= 2, stage


def test_dashboard_report_key_follows_the_shift_and_the_tab_choices():
    from types import SimpleNamespace

    from dashboard import export

    sides = [SimpleNamespace(key=("b", 1)), SimpleNamespace(key=("a", 1))]
    state = {}
    view = export.current_view(state)  # nothing chosen yet: the dashboard's defaults
    assert view == {**report.VIEW_DEFAULTS, "attr_layer": None}
    state.update({"curve_path": "column", "att_layers": ["blocks.1"], "attr_method": "gradcam", "attr_layer": "blocks.0"})
    chosen = export.current_view(state)
    assert chosen["curve_path"] == "column" and chosen["attr_layer"] == "blocks.0"
    for k in ("curve_path", "att_layers", "attr_method", "attr_layer"):  # their tabs closed: widget keys gone
        del state[k]
    assert export.current_view(state) == chosen                          # the last values seen still count
    key = export._report_key(sides, "circular", (2, 1), chosen)
    assert key == export._report_key(sides, "circular", (2.0, 1.0), dict(chosen))
    assert key != export._report_key(sides, "circular", (1, 2), chosen)
    assert key != export._report_key(sides, "circular", (2, 1), {**chosen, "err_log": False})
    assert key != export._report_key(sides, "zero", (2, 1), chosen)


def test_a_figure_that_cannot_be_drawn_is_named_and_the_rest_of_the_report_kept(swept, tmp_path):
    """GradCAM on the last block of a class-token ViT (a layer the score never reads) cannot be drawn: the
    report leaves that figure out, says why in report.html and metadata.json, and keeps every other."""
    base, anch, img, results = swept
    last = results[0].layers[-1]
    view = {"attr_method": "gradcam", "attr_layer": last}
    out = report.build_report(base, anch, img, tmp_path / "r", static=False, results=results, view=view)
    meta = json.loads((out / "metadata.json").read_text())
    assert [f["figure"] for f in meta["figures_not_drawn"]] == ["attribution_gradcam"]
    assert "zero everywhere" in meta["figures_not_drawn"][0]["reason"]
    html = (out / "report.html").read_text()
    assert "Not drawn: Attribution: GradCAM (layer " + last in html
    assert html.count("<figure id=") >= 5 and "id='attribution_gradcam'" not in html
