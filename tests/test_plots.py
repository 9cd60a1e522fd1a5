"""equishift.plots: each builder shows the right numbers, puts baseline and anchored on one scale, marks
the current shift and names metric, shift mode and range in its title."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from equishift import plots
from equishift.errors import EquishiftError
from equishift.shifts import grid, shift
from equishift.sweep import sweep

from engine_helpers import anchored, image, twins, vit


@pytest.fixture(scope="module")
def pair():
    v = vit()
    x = image(21)
    s = grid(range(-2, 6), range(-2, 6))
    return sweep(v, x, s), sweep(anchored(v), x, s), x


@pytest.fixture(scope="module")
def twins_pair():
    t = twins()
    x = image(22)
    s = grid(range(4), range(4))
    return sweep(t, x, s), sweep(anchored(t), x, s)


def _title(fig) -> str:
    return fig.layout.title.text


def _assert_names_range(fig, res):
    t = _title(fig)
    assert f"{res.meta['mode']} shifts" in t and "dy∈[-2, 5], dx∈[-2, 5] (64 shifts)" in t


def test_orbit_heatmaps_show_the_probabilities_and_flips_on_one_scale(pair):
    base, anch, _ = pair
    k = base.index_of(3, 1)
    fig = plots.orbit_heatmap(base, anch, "prob", current=k)
    _assert_names_range(fig, base)
    assert "Probability of the unshifted top-1" in _title(fig)
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == 2 and all(h.coloraxis == "coloraxis" for h in heat)
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1)
    for h, r in zip(heat, (base, anch)):
        _, _, z = r.to_grid(r.probs[:, r.ref_pred])
        np.testing.assert_allclose(np.asarray(h.z, dtype=float), z.numpy(), rtol=1e-6)
    marks = [d for d in fig.data if d.name == "current shift"]
    assert all((list(m.x), list(m.y)) == ([1], [3]) for m in marks) and len(marks) == 2
    flips = plots.orbit_heatmap(base, anch, "flip")
    z = np.asarray([d for d in flips.data if d.type == "heatmap"][0].z, dtype=float)
    assert int(np.nansum(z)) == int((base.pred != base.ref_pred).sum())
    assert f"{int((base.pred != base.ref_pred).sum())}/64 flips" in flips.layout.annotations[0].text


def test_logit_curve_follows_the_path_on_a_shared_y_scale(pair):
    base, anch, _ = pair
    fig = plots.logit_curve(base, anch, value="logit", current=base.index_of(2, 2))
    _assert_names_range(fig, base)
    path = plots.default_path(base)
    assert base.shifts[path].tolist() == [[t, t] for t in range(-2, 6)]  # the diagonal
    lines = [d for d in fig.data if d.mode == "lines+markers"]
    c = lines[0].legendgroup
    np.testing.assert_allclose(lines[0].y, base.logits[path, int(c)].numpy(), rtol=1e-6)
    lo = min(float(r.logits[path][:, [base.ref_pred, anch.ref_pred]].min()) for r in (base, anch))
    hi = max(float(r.logits[path][:, [base.ref_pred, anch.ref_pred]].max()) for r in (base, anch))
    r1, r2 = fig.layout.yaxis.range, fig.layout.yaxis2.range
    assert tuple(r1) == tuple(r2) and r1[0] < lo and r1[1] > hi
    assert list(lines[0].x) == list(range(-2, 6))  # the diagonal's coordinate dy = dx, not the step
    marker = [d for d in fig.data if d.name == "current shift"]
    assert marker and all(list(m.x) == [2] * len(m.x) for m in marker)  # (2, 2) sits at dy = dx = 2
    custom = plots.logit_curve(base, None, path=[(0, 0), (0, 1), (0, 2)], classes=[3])
    assert list(custom.data[0].y) == pytest.approx(base.probs[[base.index_of(0, i) for i in range(3)], 3].tolist())


def test_attention_grid_shares_one_scale_and_aligns(pair):
    base, anch, _ = pair
    k = base.index_of(1, 3)
    fig = plots.attention_grid(base, anch, current=k, align=True)
    _assert_names_range(fig, base)
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == 2 * len(base.attention)  # models × (layers + rollout), head means
    top = max(float(r.aligned_attention(l)[k].float().mean(0).max()) for r in (base, anch) for l in base.attention)
    assert fig.layout.coloraxis.cmax == pytest.approx(top)
    # Anchored and aligned: the map at the shift IS the unshifted map.
    last = heat[len(base.attention):][0]
    want = anch.ref_attention["blocks.0"].float().mean(0).numpy()
    np.testing.assert_allclose(np.asarray(last.z, dtype=float), want, rtol=2e-3, atol=1e-6)
    per_head = plots.attention_grid(base, None, current=k, heads="all", layers=["blocks.1"])
    assert len(per_head.data) == base.attention["blocks.1"].shape[1]
    with pytest.raises(EquishiftError, match="not in the"):
        plots.attention_grid(base, anch, layers=["blocks.9"])


def test_twins_figures_build(twins_pair):
    base, anch = twins_pair
    fig = plots.attention_grid(base, anch, current=5)
    assert len([d for d in fig.data if d.type == "heatmap"]) == 2 * len(base.layers)
    assert "GSA" in _title(fig) and "LSA" in _title(fig)
    pp = plots.polyphase_panel(anch, current=5)
    assert len(pp.layout.annotations) >= 2 * len(anch.anchors)


def test_polyphase_panel_marks_the_selected_phase(pair):
    base, anch, _ = pair
    k = anch.index_of(3, 5)
    fig = plots.polyphase_panel(anch, current=k)
    a, b = anch.anchors["patch_embed.anchor"][k].tolist()
    top = np.asarray(fig.data[0].z)  # the phase grid, each phase in its colour; the selected one outlined
    assert top.tolist() == [[4 * p + q for q in range(4)] for p in range(4)]
    box = [sh for sh in fig.layout.shapes if sh.type == "rect"]
    assert len(box) == 1 and (box[0].x0 + 0.5, box[0].y0 + 0.5) == (b, a)
    assert any(an.text == f"<b>({a}, {b})</b>" for an in fig.layout.annotations)
    flat = [d for d in fig.data if d.type == "heatmap"][1]
    _, _, z = anch.to_grid((anch.anchors["patch_embed.anchor"] * torch.tensor([4, 1])).sum(1).float())
    np.testing.assert_array_equal(np.asarray(flat.z, dtype=float), z.numpy())
    _assert_names_range(fig, anch)
    empty = plots.polyphase_panel(base)
    assert "not anchored" in empty.layout.annotations[0].text


def test_polyphase_panel_titles_carry_each_anchors_margin(twins_pair):
    """The margin in each module's title is the recorded one at that shift (parsed as a number), and a
    choice below the tolerance is labelled a near-tie."""
    _, anch = twins_pair
    k = 5
    titles = [a.text for a in plots.polyphase_panel(anch, current=k).layout.annotations if "(s=" in a.text]
    rows = {r["module"]: r for r in anch.anchor_margins(k)}
    assert len(titles) == len(rows)
    for t in titles:
        name = t.split(" (s=")[0]
        shown = float(t.split("top-2 margin ")[1].split(" ")[0].split("<")[0])
        assert shown == pytest.approx(rows[name]["margin"], rel=0.06, abs=1e-12)
        assert ("near-tie" in t) == (rows[name]["margin"] <= rows[name]["tie_tol"])


def test_layer_error_map_uses_one_colour_scale(pair):
    base, anch, _ = pair
    fig = plots.layer_error_map(base, anch, layout="strip")
    _assert_names_range(fig, base)
    top = max(float(v.max()) for r in (base, anch) for v in r.layer_error.values())
    assert fig.layout.coloraxis.cmax == pytest.approx(top)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float)[1], base.layer_error["blocks.1"].numpy(), rtol=1e-6)
    log = plots.layer_error_map(base, anch, log=True, layout="strip")
    z = np.asarray(log.data[1].z, dtype=float)
    assert log.layout.coloraxis.cmin == -8 and (z[np.isfinite(z)] < -4).all()  # anchored: float noise (or 0)


def test_layer_error_map_shows_exact_zeros_as_zero(pair):
    """Linear: an exact 0 is the first colour of the scale (cmin 0). Log: it is not the 1e-8 floor — it is
    left blank (NaN), and the title says what blank means; tiny non-zero errors keep their colour."""
    import dataclasses

    base, _, _ = pair
    error = {k: v.clone() for k, v in base.layer_error.items()}
    first = next(iter(error))
    error[first][:3] = 0.0
    error[first][3] = 1e-9
    res = dataclasses.replace(base, layer_error=error)
    lin = plots.layer_error_map(res, layout="strip")
    assert lin.layout.coloraxis.cmin == 0 and np.asarray(lin.data[0].z, dtype=float)[0, :3].tolist() == [0, 0, 0]
    log = plots.layer_error_map(res, log=True, layout="strip")
    z = np.asarray(log.data[0].z, dtype=float)
    m = torch.stack(list(error.values())).numpy()
    assert (np.isnan(z) == (m == 0)).all() and z[0, 3] == -8  # blank exactly where 0; 1e-9 at the floor
    assert "blank cells: exactly 0" in log.layout.title.text
    assert "exactly 0" in log.data[0].text[0][0] and "exactly 0" not in log.data[0].text[0][3]
    none = dataclasses.replace(base, layer_error={k: torch.zeros_like(v) for k, v in error.items()})
    blank = plots.layer_error_map(none, log=True, layout="strip")  # every cell blank: axes and a sentence remain
    assert list(blank.layout.yaxis.categoryarray) == list(error) and blank.layout.xaxis.range == (-0.5, len(base) - 0.5)
    assert any("every layer exactly 0" in a.text for a in blank.layout.annotations)
    maps = plots.layer_error_map(res, log=True)  # the same on the dy × dx maps
    _, _, want = res.to_grid(error[first])
    z = np.asarray(maps.data[0].z, dtype=float)
    assert (np.isnan(z) == (want.numpy() == 0)).all() and np.nanmin(z) == -8
    assert "exactly 0" in maps.data[0].text[0][0] and "exactly 0" not in maps.data[0].text[0][3]
    blank = plots.layer_error_map(none, log=True)
    assert blank.layout.xaxis.range == (-2.5, 5.5) and blank.layout.yaxis.range == (5.5, -2.5)
    assert sum("exactly 0" in (a.text or "") for a in blank.layout.annotations) == len(error)


def test_attribution_overlay_and_shifted_image(pair):
    _, _, x = pair
    m1, m2 = torch.rand(32, 32), 3 * torch.rand(32, 32)
    fig = plots.attribution_overlay(x.sigmoid(), {"baseline": m1, "anchored": -m2}, method="saliency", shift=(2, 1),
                                    scores={"anchored": (0.5, 0.25)})
    assert fig.layout.coloraxis.cmax == pytest.approx(float(m2.max()))
    assert "saliency at circular shift (dy=2, dx=1)" in _title(fig)
    assert "r=0.500" in fig.layout.annotations[1].text
    with pytest.raises(EquishiftError, match="image is"):
        plots.attribution_overlay(x, {"a": torch.rand(8, 8)})
    img = torch.rand(1, 32, 32)
    fig = plots.shifted_image(img, (3, -2), "circular", patch=4, anchor=(1, 2))
    want = (shift(img, 3, -2)[0].clamp(0, 1) * 255).round().byte().numpy()
    np.testing.assert_array_equal(np.asarray(fig.data[0].z)[..., 0], want)
    shapes = fig.layout.shapes
    assert len([s for s in shapes if s.line.color == plots.ANCH_COLOR]) == 8 + 8
    assert len([s for s in shapes if s.type == "rect"]) == 1
    assert "dy=3, dx=-2" in _title(fig) and "phase (1, 2)" in _title(fig)


def test_mismatched_modes_and_missing_records_are_refused():
    v = vit()
    a = sweep(v, image(1), [(0, 1)], "circular", record=("logits",))
    b = sweep(v, image(1), [(0, 1)], "zero", record=("logits",))
    with pytest.raises(EquishiftError, match="different shift modes"):
        plots.orbit_heatmap(a, b)
    with pytest.raises(EquishiftError, match="recorded no attention"):
        plots.attention_grid(a)
    with pytest.raises(EquishiftError, match="recorded no features"):
        plots.layer_error_map(a)


def test_no_signed_zero_in_titles_or_data(pair):
    """-0.0 and tiny negatives (float noise, its sign differs between CPUs) read as zero in titles and
    travel as 0.0 in the figure data; real values keep their sign."""
    import dataclasses
    import math

    base, _, x = pair
    fig = plots.attribution_overlay(x.sigmoid(), {"anchored": torch.rand(32, 32)}, shift=(-0.0, -1.0),
                                    scores={"anchored": (-1e-12, -0.0)})
    assert "r=0.000, IoU@10%=0.000" in fig.layout.annotations[0].text
    assert "(dy=0, dx=-1)" in _title(fig)
    assert "dy=0, dx=2" in _title(plots.shifted_image(torch.rand(1, 8, 8), (-0.0, 2.0)))
    logits = base.logits.clone()
    logits[:, base.ref_pred] = -0.0
    poisoned = dataclasses.replace(base, logits=logits)
    fig = plots.logit_curve(poisoned, None, value="logit", classes=[base.ref_pred])
    ys = [v for d in fig.data for v in (d.y if d.y is not None else [])]
    assert ys and all(v == 0 and math.copysign(1, v) == 1 for v in ys)
    error = {k: torch.full_like(v, -0.0) for k, v in base.layer_error.items()}
    z = np.asarray(plots.layer_error_map(dataclasses.replace(base, layer_error=error)).data[0].z)
    assert (z == 0).all() and not np.signbit(z).any()


# --- issue 14: shift coordinates on the axes, square maps, readable attention and polyphase figures -----
def _yaxes_of_heatmaps(fig):
    """(trace, its x axis, its y axis) for every heatmap in ``fig``."""
    out = []
    for d in fig.data:
        if d.type == "heatmap":
            xa, ya = fig.layout[d.xaxis.replace("x", "xaxis")], fig.layout[d.yaxis.replace("y", "yaxis")]
            out.append((d, xa, ya))
    return out


def _assert_square(fig):
    for d, _, ya in _yaxes_of_heatmaps(fig):
        assert ya.scaleanchor == d.xaxis, f"{d.yaxis} is not tied to {d.xaxis}"


def test_logit_curve_x_axis_is_the_shift_coordinate_of_the_path(pair):
    """Row path: x = dx; column: x = dy; diagonal: x = dy = dx; the current shift is marked at its own
    coordinate; any other path is drawn in order with (dy, dx) tick labels."""
    base, anch, _ = pair
    s = base.shifts
    k = base.index_of(1, 4)
    row = (s[:, 0] == 1).nonzero()[:, 0].flip(0)  # given backwards: drawn in dx order
    fig = plots.logit_curve(base, anch, path=row, current=k)
    line = [d for d in fig.data if d.mode == "lines+markers"][0]
    assert list(line.x) == list(range(-2, 6))
    np.testing.assert_allclose(line.y, base.probs[[base.index_of(1, dx) for dx in range(-2, 6)], int(line.legendgroup)],
                               rtol=1e-6)
    assert fig.layout.xaxis.title.text.startswith("dx") and "dy = 1" in fig.layout.xaxis.title.text
    marks = [m for m in fig.data if m.name == "current shift"]
    assert len(marks) == 2 and all(set(m.x) == {4} for m in marks)
    assert [sh.x0 for sh in fig.layout.shapes] == [4, 4]  # the dotted line, in each panel
    col = (s[:, 1] == 4).nonzero()[:, 0]
    fig = plots.logit_curve(base, None, path=col, current=k)
    assert fig.layout.xaxis.title.text.startswith("dy") and "dx = 4" in fig.layout.xaxis.title.text
    assert [set(m.x) for m in fig.data if m.name == "current shift"] == [{1}]
    assert "dy = dx" in plots.logit_curve(base, anch).layout.xaxis.title.text
    anti = [(t, -t) for t in range(-2, 3)]
    other = plots.logit_curve(base, None, path=anti, current=base.index_of(1, -1))
    assert list(other.data[0].x) == list(range(5)) and "(dy, dx)" in other.layout.xaxis.title.text
    assert list(other.layout.xaxis.ticktext) == ["(-2, 2)", "(-1, 1)", "(0, 0)", "(1, -1)", "(2, -2)"]
    assert [set(m.x) for m in other.data if m.name == "current shift"] == [{3}]


def test_layer_error_map_over_the_grid_is_one_square_dy_dx_map_per_layer(pair):
    base, anch, _ = pair
    k = base.index_of(3, -1)
    fig = plots.layer_error_map(base, anch, current=k)
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == len(base.layer_error) + len(anch.layer_error)
    for d, (res, layer) in zip(heat, [(r, l) for r in (base, anch) for l in r.layer_error]):
        ys, xs, z = res.to_grid(res.layer_error[layer])
        assert list(d.x) == xs == list(range(-2, 6)) and list(d.y) == ys
        np.testing.assert_allclose(np.asarray(d.z, dtype=float), z.numpy(), rtol=1e-6)
    _assert_square(fig)
    marks = [d for d in fig.data if d.name == "current shift"]
    assert len(marks) == len(heat) and all((list(m.x), list(m.y)) == ([-1], [3]) for m in marks)
    titles = [a.text for a in fig.layout.annotations if a.text in base.layer_error]
    assert titles == list(base.layer_error) + list(anch.layer_error)
    # in axis order (yaxis, yaxis2, …, yaxis10): plotly's own key order is not numeric
    ytitles = [t for _, t in sorted((int(a[5:] or 1), fig.layout[a].title.text) for a in fig.layout
                                    if a.startswith("yaxis") and fig.layout[a].title.text)]
    assert ytitles == ["<b>baseline</b><br>dy (px)", "<b>anchored (full)</b><br>dy (px)"]  # one row of maps each
    xtitles = {fig.layout[a].title.text for a in fig.layout if a.startswith("xaxis")} - {None}
    assert xtitles == {"dx (px)"}


def test_layer_error_strip_along_a_row_or_column_is_in_shift_coordinates(pair):
    base, anch, _ = pair
    k = base.index_of(2, 5)
    row = (base.shifts[:, 0] == 2).nonzero()[:, 0]
    fig = plots.layer_error_map(base, anch, path=row, current=k)
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert len(heat) == 2 and all(list(h.x) == list(range(-2, 6)) for h in heat)
    assert fig.layout.xaxis.title.text.startswith("dx") and fig.layout.xaxis2.title.text.startswith("dx")
    np.testing.assert_allclose(np.asarray(heat[0].z, dtype=float)[0], base.layer_error[base.layers[0]][row].numpy(),
                               rtol=1e-6)
    assert [sh.x0 for sh in fig.layout.shapes] == [5, 5]  # the current shift's dx, in both panels
    col = (base.shifts[:, 1] == 5).nonzero()[:, 0]
    fig = plots.layer_error_map(base, None, path=col, current=k)
    assert fig.layout.xaxis.title.text.startswith("dy") and [sh.x0 for sh in fig.layout.shapes] == [2]
    with pytest.raises(EquishiftError, match="layout"):
        plots.layer_error_map(base, layout="grid")


def test_orbit_heatmaps_are_square(pair):
    base, anch, _ = pair
    fig = plots.orbit_heatmap(base, anch, current=base.index_of(0, 0))
    assert len(_yaxes_of_heatmaps(fig)) == 2
    _assert_square(fig)


def test_attention_all_heads_side_by_side_square_without_empty_panels(pair):
    base, anch, _ = pair
    fig = plots.attention_grid(base, anch, current=base.index_of(1, 2), heads="all")
    heat = _yaxes_of_heatmaps(fig)
    n_heads = {l: base.attention[l].shape[1] for l in base.attention}
    assert len(heat) == 2 * sum(n_heads.values())  # the rollout: one map per model, no 'head 1'
    axes = {a for a in fig.layout if a.startswith("xaxis")}
    assert axes == {xa.plotly_name for _, xa, _ in heat}  # no subplot without a map
    _assert_square(fig)
    ours = [h for h in heat if "<extra>baseline " in h[0].hovertemplate]
    theirs = [h for h in heat if "<extra>anchored (full) " in h[0].hovertemplate]
    assert len(ours) == len(theirs) == len(heat) // 2
    left = max(xa.domain[1] for _, xa, _ in ours)
    right = min(xa.domain[0] for _, xa, _ in theirs)
    assert left < right  # baseline's maps all left of the anchored model's: side by side, not stacked
    for (d, xa, ya), (e, xb, yb) in zip(ours, theirs):
        assert ya.domain == yb.domain  # the same layer and head on the same row
    titles = [a.text for a in fig.layout.annotations]
    assert "rollout" in titles and not any("rollout · head" in t for t in titles)
    assert any("baseline" in t for t in titles) and any("anchored" in t for t in titles)
    rows = len({ya.domain for _, _, ya in heat})
    assert rows == len(base.attention) and fig.layout.height >= rows * 150  # room for square maps
    _assert_square(plots.attention_grid(base, anch, current=0))


def test_polyphase_colours_are_categorical_and_phase_ticks_integers(twins_pair):
    _, anch = twins_pair
    fig = plots.polyphase_panel(anch, current=5)
    strides = {n: int(anch.meta["anchor_stride"][n]) for n in anch.anchors}
    big = max(strides.values())
    scale = fig.layout.coloraxis.colorscale
    colours = [c for _, c in scale]
    assert len(scale) == 2 * big * big and len(set(colours)) == big * big  # one flat band per phase
    assert all(scale[2 * i][1] == scale[2 * i + 1][1] for i in range(big * big))
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (-0.5, big * big - 0.5)
    bar = fig.layout.coloraxis.colorbar
    assert list(bar.tickvals) == list(range(big * big)) and bar.ticktext[big + 1] == "(1, 1)"
    grids = [d for d in fig.data if d.type == "heatmap"][::2]  # the phase grids (top row)
    for g, (n, s) in zip(grids, strides.items()):
        xa, ya = fig.layout[g.xaxis.replace("x", "xaxis")], fig.layout[g.yaxis.replace("y", "yaxis")]
        assert list(xa.tickvals) == list(range(s)) == list(ya.tickvals)  # integer phases, no -0.5 … 3.5
        assert np.asarray(g.z)[1][1] == big + 1  # (1, 1) has one colour in every module, whatever its s
    maps = [d for d in fig.data if d.type == "heatmap"][1::2]
    for m, n in zip(maps, strides):
        _, _, z = anch.to_grid((anch.anchors[n] * torch.tensor([big, 1])).sum(1).float())
        np.testing.assert_array_equal(np.asarray(m.z, dtype=float), z.numpy())
    _assert_square(fig)


def test_shifted_image_axes_are_labelled_and_its_size_does_not_depend_on_the_grid():
    img = torch.rand(3, 32, 32)
    figs = [plots.shifted_image(img, (1, 2), patch=4, anchor=(1, 3)), plots.shifted_image(img, (1, 2), patch=8),
            plots.shifted_image(img, (1, 2))]
    for f in figs:
        assert "px" in f.layout.xaxis.title.text and "px" in f.layout.yaxis.title.text
        assert f.layout.yaxis.scaleanchor == "x"
        assert f.layout.xaxis.automargin is False and f.layout.yaxis.automargin is False
    assert len({(f.layout.margin.to_plotly_json().__repr__(), f.layout.height) for f in figs}) == 1


def test_map_grids_are_sized_for_the_page_width_they_are_given(pair):
    """Square maps fill a 1400-px page by default; a narrower page (a static export at 700 px) gets a
    shorter figure of that width, so its maps are not lost in white space."""
    base, anch, _ = pair
    for build in (lambda **kw: plots.layer_error_map(base, anch, **kw),
                  lambda **kw: plots.attention_grid(base, anch, heads="all", **kw)):
        wide, narrow = build(), build(width=700)
        assert wide.layout.width is None and narrow.layout.width == 700
        assert narrow.layout.height < wide.layout.height


def test_logit_curve_of_models_with_different_heads_plots_each_its_own_top1():
    """A 10-class baseline beside a 3-class anchored model: class indices of two heads mean different
    things, so each panel shows its own model's unshifted top-1 (and asked-for classes only where they
    exist) — never an index past a head (it raised IndexError in the dashboard)."""
    x = image(23)
    s = grid(range(3), range(3))
    ten, three = sweep(vit(num_classes=10), x, s), sweep(anchored(vit(seed=1, num_classes=3)), x, s)
    fig = plots.logit_curve(ten, three)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [(t.xaxis, t.name) for t in lines] == [("x", plots._class_name(ten, ten.ref_pred)),
                                                  ("x2", plots._class_name(three, three.ref_pred))]
    for t, res in zip(lines, (ten, three)):
        np.testing.assert_allclose(t.y, res.probs[plots.path_axis(res, plots._path(res, None)).idx, res.ref_pred],
                                   rtol=1e-6)
    asked = plots.logit_curve(ten, three, classes=[1, 7], value="logit")
    names = [(t.xaxis, t.name) for t in asked.data if t.mode == "lines+markers"]
    assert names == [("x", plots._class_name(ten, 1)), ("x", plots._class_name(ten, 7)),
                     ("x2", plots._class_name(three, 1))]
