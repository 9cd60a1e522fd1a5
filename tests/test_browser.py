"""The dashboard in a real browser: `streamlit run` as a subprocess, driven by Playwright with the Debian
chromium (never `playwright install`). Skips with a reason when no Chromium is found (the ``chromium``
marker and fixture of conftest.py).

Full-page screenshots go to artifacts/ (gitignored); ``test_readme_screenshot`` also refreshes
docs/screenshots/dashboard.png when EQUISHIFT_UPDATE_SCREENSHOTS=1.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_harness import PAGE_IDLE_JS, WS_COUNTER_JS, served  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
GRID = "r3"  # ±3 px: 49 shifts per model, so a cold server answers in seconds

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.chromium]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # started as `bash run.sh dashboard` starts it: warm (dashboard.serve), then Streamlit in that process
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with served(log) as (url, proc):
        assert "warm-up done" in log.read_text(), log.read_text()[-2000:]
        yield url
    if proc.returncode not in (0, -15, None):
        print(log.read_text()[-4000:])


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    ctx.add_init_script(WS_COUNTER_JS)
    pg = ctx.new_page()
    pg.set_default_timeout(300_000)  # generous: a busy shared CPU slows the first render a lot
    pg.goto(f"{server}/?grid={GRID}")
    pg.locator("canvas.es-canvas").first.wait_for()
    _settled(pg, (0, 0))
    yield pg
    ctx.close()


def _settled(pg, shift=None, timeout_ms: int = 300_000) -> None:
    """Wait until the page has finished a rerun: nothing on it left over from the previous run, no script
    running, and, when ``shift`` is given, proof that the page is the new state, not a stale one: both the
    dy/dx inputs and the live view show it. Each alone is not proof — typed values show in the inputs
    before any rerun, and a drag moves the live view before the server knows — but the other one only
    changes when the server's rerun draws it."""
    cond = PAGE_IDLE_JS
    if shift is not None:
        cond = ("() => { const v = Array.from(document.querySelectorAll('[data-testid=stNumberInput] input'))"
                f".map(e => Number(e.value)); const r = window.__esLive;"
                f" return v.length >= 2 && v[0] === {shift[0]} && v[1] === {shift[1]}"
                f" && !!r && Number(r.dataset.dy) === {shift[0]} && Number(r.dataset.dx) === {shift[1]}"
                f" && ({PAGE_IDLE_JS})(); }}")
    pg.wait_for_function(cond, timeout=timeout_ms)
    pg.wait_for_timeout(300)


def _shown_shift(pg) -> tuple:
    """The shift the live view shows (its readout, input views and top-5 tables)."""
    d = pg.evaluate("() => { const r = window.__esLive; return r ? [r.dataset.dy, r.dataset.dx] : null; }")
    return float(d[0]), float(d[1])


def _live_text(pg) -> str:
    return pg.evaluate("() => window.__esLive.innerText")


def _shot(pg, name: str) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so the viewport is
    grown to the content's height first (a plain full_page shot would stop at the window)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = pg.viewport_size
    height = size["height"]
    for _ in range(4):  # grow until the content fits (plotly re-lays out after each resize)
        need = pg.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight") + 40
        if need <= height:
            break
        height = int(need)
        pg.set_viewport_size({"width": size["width"], "height": height})
        pg.wait_for_timeout(800)
    pg.screenshot(path=str(path), full_page=True)
    pg.set_viewport_size(size)
    return path


def _open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()
    _settled(pg)


def test_loads(page):
    assert page.get_by_text("Summary over the swept shifts").is_visible()
    assert _shown_shift(page) == (0, 0)
    assert page.locator(".stException").count() == 0
    _shot(page, "dashboard-default")


def test_drag_moves_the_shift(page):
    """While the pointer drags, the readout, both input views, both predictions and top-5 tables follow in
    the browser, and nothing is sent to the server; on release the shift is sent once and the page
    (the server's controls and figures) arrives at it."""
    canvas = page.locator("canvas.es-canvas").first
    scale = page.evaluate("() => window.__esLive.__es.data.sides[0].scale")  # screen px per model px
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    want = (2, -3)  # model px: down 2, left 3
    before = _live_text(page)
    sent0 = page.evaluate("() => window.__ws.sent")
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 11):  # a real drag: many small moves
        page.mouse.move(x0 + want[1] * scale * k / 10, y0 + want[0] * scale * k / 10)
        page.wait_for_timeout(40)
    assert _shown_shift(page) == want  # followed in the browser, before any release
    during = _live_text(page)
    assert "shift (dy, dx) = 2, -3 px" in during and during != before
    assert page.evaluate("() => window.__ws.sent") == sent0, "the drag talked to the server"
    page.mouse.up()
    _settled(page, want)
    assert page.evaluate("() => window.__ws.sent") > sent0
    assert _shown_shift(page) == want
    assert _live_text(page) == during  # the server's rerun draws what the browser already showed
    _shot(page, "dashboard-dragged")


def test_arrow_keys_move_the_shift_and_the_view_stays_mounted(page):
    canvas = page.locator("canvas.es-canvas").first
    canvas.evaluate("c => { c.__mounted = 'first'; }")   # gone if the component were re-mounted
    canvas.focus()
    # faster than the reruns they trigger: a rerun that started before a key press must not pull the
    # view back (it keeps its own shift until the server has seen its latest report)
    for key in ("ArrowRight", "ArrowRight", "ArrowDown", "ArrowDown", "ArrowRight"):
        page.keyboard.press(key)
        page.wait_for_timeout(100)
    _settled(page, (2, 3))
    assert _shown_shift(page) == (2, 3)
    assert canvas.evaluate("c => c.__mounted") == "first"


def test_a_shift_change_reruns_only_what_depends_on_the_shift(page):
    """A key press reruns the shift's fragment only: the models, image, summary and sidebar are not part
    of the rerun (Streamlit marks what a rerun will redraw as stale; none of them ever is)."""
    page.evaluate("""() => { window.__staleOutside = [];
        new MutationObserver(() => {
          for (const el of document.querySelectorAll('[data-stale="true"]'))
            if (el.closest('[data-testid="stSidebar"]') || /Summary over the swept shifts/.test(el.innerText || ''))
              window.__staleOutside.push(el.innerText.slice(0, 40));
        }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['data-stale'] }); }""")
    page.locator("canvas.es-canvas").first.focus()
    for i, key in enumerate(("ArrowRight", "ArrowDown", "ArrowRight")):
        page.keyboard.press(key)
        _settled(page, [(0, 1), (1, 1), (1, 2)][i])
    assert page.evaluate("() => window.__staleOutside") == []


def test_the_view_and_the_open_tab_fit_one_screen(browser, server):
    """At 1600×1200 the live view (both models) and the open tab's figure are on screen together."""
    pg = browser.new_page(viewport={"width": 1600, "height": 1200})
    try:
        pg.set_default_timeout(300_000)
        pg.goto(f"{server}/?grid={GRID}&panel=Orbit+heatmaps")
        pg.locator("canvas.es-canvas").first.wait_for()
        pg.locator(".stPlotlyChart .js-plotly-plot").first.wait_for()
        _settled(pg, (0, 0))
        views = [c.bounding_box() for c in pg.locator("canvas.es-canvas").all()]
        figure = pg.locator(".stPlotlyChart").first.bounding_box()
        assert len(views) == 2 and all(v["y"] + v["height"] <= 1200 for v in views), views
        assert figure["y"] + 250 <= 1200, figure  # at least 250 px of the figure above the fold
        _shot(pg, "dashboard-one-screen")
    finally:
        pg.close()


def test_live_tables_are_the_sweeps_numbers_for_any_number_of_classes(browser, server):
    """The tables the browser draws at each shift are the rows of the sweep's table (dashboard.live.top5_at)
    for that shift, also for a 3-class model (fewer rows than five) next to its anchorized copy; the
    models come from the link itself."""
    from urllib.parse import urlencode

    from dashboard import live

    opts = "img_size=32&patch_size=4&num_classes=3&depth=1&embed_dim=32&num_heads=2"
    query = urlencode({"grid": GRID, "baseline_source": "timm name", "baseline_timm": "vit_tiny_patch16_224",
                       "baseline_options": opts, "anchored_source": "Anchorize the baseline"})
    pg = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        pg.set_default_timeout(300_000)
        pg.goto(f"{server}/?{query}")
        pg.locator("canvas.es-canvas").first.wait_for()
        _settled(pg, (0, 0))
        canvas = pg.locator("canvas.es-canvas").first
        canvas.focus()
        for key in ("ArrowRight", "ArrowDown", "ArrowDown", "ArrowLeft", "ArrowLeft", "ArrowLeft"):
            pg.keyboard.press(key)
            shown = pg.evaluate("""() => { const r = window.__esLive, d = r.__es.data, t = window.__esTables.get(d.table_id);
                return { table: t, grid: d.grid, shift: r.__es.shift,
                         rows: Array.from(r.querySelectorAll('.es-side')).map(el => Array.from(el.querySelectorAll('tbody tr'))
                               .map(tr => Array.from(tr.cells).map(c => c.textContent))) }; }""")
            g = shown["grid"]
            k = round((shown["shift"][0] - g["lo"]) / g["step"]) * g["n"] + round((shown["shift"][1] - g["lo"]) / g["step"])
            for role, rows in zip(("baseline", "anchored"), shown["rows"]):
                want = live.top5_at(shown["table"], role, k)
                assert len(rows) == len(want) == 3, (role, rows)
                for (name, star, p, d), got in zip(want, rows):
                    assert got[0] == name + (" ★" if star else ""), (role, got, want)
                    assert float(got[1].rstrip("%")) == pytest.approx(p, abs=1e-9), (role, got, want)
                    assert float(got[2]) == pytest.approx(d, abs=1e-9), (role, got, want)
        _settled(pg, (2, -2))
    finally:
        pg.close()


def test_figure_markers_follow_the_drag(page):
    """On the orbit heatmaps, the current-shift × is drawn by the live view at the dragged shift (plotly's
    own data→pixel map), during the drag and after the server's rerun."""
    _open_tab(page, "Orbit heatmaps")
    page.locator(".stPlotlyChart .js-plotly-plot").first.wait_for()
    canvas = page.locator("canvas.es-canvas").first
    scale = page.evaluate("() => window.__esLive.__es.data.sides[0].scale")
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 1 * scale, y0 - 2 * scale)
    page.wait_for_timeout(200)
    where = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => {
        const L = gd._fullLayout, out = [];
        for (const m of (L.meta || {}).es_maps || []) out.push([L[m.xaxis]._offset + L[m.xaxis].d2p(window.__esLive.__es.shift[1]),
                                                             L[m.yaxis]._offset + L[m.yaxis].d2p(window.__esLive.__es.shift[0])]);
        const marks = Array.from(gd.querySelectorAll('.es-overlay > div')).map(d => [parseFloat(d.style.left) + 7,
                                                                                     parseFloat(d.style.top) + 9]);
        return [out, marks]; })"""
    for state in ("dragging", "released"):
        figs = page.evaluate(where)
        assert _shown_shift(page) == (-2, 1), state
        assert figs and all(len(want) == 2 and len(got) == 2 for want, got in figs), (state, figs)
        for want, got in figs:
            np.testing.assert_allclose(got, want, atol=1.0)
        if state == "dragging":
            page.mouse.up()
            _settled(page, (-2, 1))
    _shot(page, "dashboard-markers")


def test_the_url_keeps_the_view(page, server, browser):
    """What the page shows is in its address: the open tab, the shift mode, the grid and the shift are
    written to the URL as they change, and the URL opened elsewhere shows the same view."""
    _open_tab(page, "Attention")
    box = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").filter(has_text="Shift mode")
    box.click()
    page.get_by_role("option", name="zero-pad").click()
    _settled(page, (0, 0))
    page.locator("canvas.es-canvas").first.focus()
    page.keyboard.press("ArrowRight")
    _settled(page, (0, 1))
    page.wait_for_function("() => location.search.includes('shift=0%2C1') || location.search.includes('shift=0,1')")
    url = page.url
    for part in ("panel=Attention", "shift_mode=zero-pad", f"grid={GRID}"):
        assert part in url, (part, url)
    other = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        other.set_default_timeout(300_000)
        other.goto(url)
        other.locator("canvas.es-canvas").first.wait_for()
        _settled(other, (0, 1))
        assert _shown_shift(other) == (0, 1)
        assert other.get_by_role("tab", name="Attention").get_attribute("aria-selected") == "true"
        assert other.locator("[data-testid='stCaptionContainer']", has_text="Mode zero").count() == 1
    finally:
        other.close()


def test_upload_image(page):
    page.get_by_text("Upload", exact=True).click()
    _settled(page)
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 10:18] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    page.locator("[data-testid='stSidebar'] input[type=file]").set_input_files(
        files=[{"name": "trouser-upload.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.get_by_text("trouser-upload.png").first.wait_for()
    _settled(page)
    assert page.locator("[data-testid='stAlertContentError']").count() == 0
    assert page.get_by_text("Summary over the swept shifts").is_visible()
    _shot(page, "dashboard-upload")


def _point_on_heatmap(page, title: str, dx: float, dy: float):
    """Viewport pixel of data point (dx, dy) in the first (baseline) panel of the heatmap titled
    ``title``, from plotly's own axis mapping, after scrolling it into view (a click outside the viewport
    is lost). Retried: a rerun may replace the chart while we look at it."""
    for attempt in range(5):
        try:
            chart = page.locator(".stPlotlyChart").filter(has_text=title).first.locator(".js-plotly-plot")
            chart.scroll_into_view_if_needed(timeout=20_000)
            page.wait_for_timeout(300)
            return chart.evaluate(
                """(gd, p) => { const L = gd._fullLayout, r = gd.getBoundingClientRect();
                     return [r.left + L.xaxis._offset + L.xaxis.d2p(p[0]),
                             r.top + L.yaxis._offset + L.yaxis.d2p(p[1])]; }""", [dx, dy])
        except Exception:  # noqa: BLE001 - detached by a rerun: look again
            if attempt == 4:
                raise
            _settled(page)


def test_heatmap_click_jumps_to_the_shift(page):
    _open_tab(page, "Orbit heatmaps")
    want = (-2, 2)
    x, y = _point_on_heatmap(page, "Probability of the unshifted top-1", dx=want[1], dy=want[0])
    page.mouse.move(x - 6, y)
    page.wait_for_timeout(200)
    page.mouse.move(x, y)   # plotly picks the clicked point from the hover
    page.wait_for_timeout(400)
    page.mouse.click(x, y)
    _settled(page, want)
    assert _shown_shift(page) == want
    _shot(page, "dashboard-heatmap-click")


def test_download_report(page):
    _open_tab(page, "Export")
    page.get_by_role("button", name="Build comparison report").click()
    button = page.get_by_role("button", name="Download comparison report")
    button.wait_for(timeout=600_000)  # renders every figure to PNG/SVG: slow on a busy CPU
    _settled(page)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download comparison report").click()
    download = info.value
    assert download.suggested_filename == "equishift-report.zip"
    path = ARTIFACTS / "equishift-report.zip"
    ARTIFACTS.mkdir(exist_ok=True)
    download.save_as(path)
    zf = zipfile.ZipFile(path)
    names = set(zf.namelist())
    for want in ("report.html", "metadata.json", "data/summary.json", "data/per_shift.csv",
                 "data/baseline.npz", "data/anchored.npz"):
        assert "equishift-report/" + want in names, want
    meta = json.loads(zf.read("equishift-report/metadata.json"))
    assert meta["num_shifts"] == 49 and meta["mode"] == "circular"  # the page's ?grid=r3
    pngs = [n for n in names if n.endswith(".png")]
    assert pngs, "chromium is here, so kaleido must have written PNGs"
    assert np.asarray(Image.open(io.BytesIO(zf.read(pngs[0]))).convert("L")).std() > 1


def test_screenshots_of_every_tab(page, server):
    """Full-page shots of each tab at a shift off the patch grid (artifacts/), for a person to look at;
    with EQUISHIFT_UPDATE_SCREENSHOTS=1 the orbit-heatmap view becomes the README's screenshot."""
    readme = os.environ.get("EQUISHIFT_UPDATE_SCREENSHOTS") == "1"
    page.goto(f"{server}/?grid={'full' if readme else GRID}&shift=1,2")  # the full orbit only for the README
    page.locator("canvas.es-canvas").first.wait_for()
    _settled(page, (1, 2))
    assert _shown_shift(page) == (1, 2)
    for tab in ("Logit curves", "Orbit heatmaps", "Attention", "Polyphase indices", "Layer × shift error",
                "Attribution", "Export"):
        _open_tab(page, tab)
        assert page.locator(".stException").count() == 0, tab
        path = _shot(page, "tab-" + re.sub(r"[^a-z]+", "-", tab.lower()).strip("-"))
        assert Image.open(path).size[1] > 1000
    if readme:
        _open_tab(page, "Orbit heatmaps")
        shot = Image.open(_shot(page, "readme"))
        w, h = shot.size
        small = shot.resize((1000, round(h * 1000 / w)), Image.LANCZOS).convert("RGB")
        small = small.quantize(colors=192, method=Image.Quantize.MEDIANCUT)  # a small PNG for the README
        out = ROOT / "docs" / "screenshots" / "dashboard.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        small.save(out, optimize=True)
        assert out.stat().st_size < 600_000
