"""The Dataset page in a real browser (`streamlit run` + Playwright with the Debian chromium): run it on 32
Fashion-MNIST images with the shipped pair, look at every view (full-page shots in artifacts/), and click a
fragility-gallery card: the single-image page must open on that image at that card's worst shift.

With EQUISHIFT_UPDATE_SCREENSHOTS=1 the gallery shot also becomes docs/screenshots/dataset.png."""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_harness import served  # noqa: E402
from test_browser import CHROME_ARGS, _settled, _shot, _shown_shift  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 32

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.chromium]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    cache = tempfile.mkdtemp(prefix="equishift-dataset-browser-")
    with served(log, env={"EQUISHIFT_CACHE_DIR": cache}, warm=False) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
        yield b
        b.close()


def _idle(pg) -> None:
    _settled(pg)


def test_gallery_click_opens_the_single_image_page_at_the_worst_shift(browser, server):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1100})
    pg = ctx.new_page()
    pg.set_default_timeout(300_000)
    try:
        pg.goto(f"{server}/dataset")
        pg.get_by_role("button", name="Run").wait_for()
        _idle(pg)
        more = pg.locator("textarea[aria-label^='More models']")
        more.fill("zoo:fmnist-vit-pos-only")
        more.press("Control+Enter")
        _idle(pg)
        n = pg.locator("input[aria-label='first N images']")
        n.fill(str(N))
        n.press("Enter")
        _idle(pg)
        pg.get_by_role("button", name="Run").click()
        pg.get_by_role("tab", name="Fragility gallery").wait_for()
        _idle(pg)
        assert pg.locator(".stException").count() == 0
        for tab in ("Consistency vs shift", "Mean orbit maps", "Per class", "Leaderboard", "Polyphase", "Export",
                    "Fragility gallery"):
            pg.get_by_role("tab", name=tab).click()
            _idle(pg)
            assert pg.locator(".stException").count() == 0, tab
            path = _shot(pg, "dataset-" + re.sub(r"[^a-z]+", "-", tab.lower()).strip("-"))
            assert Image.open(path).size[1] > 900
        if os.environ.get("EQUISHIFT_UPDATE_SCREENSHOTS") == "1":
            shot = Image.open(ROOT / "artifacts" / "dataset-fragility-gallery.png")
            w, h = shot.size
            small = shot.resize((1000, round(h * 1000 / w)), Image.LANCZOS).convert("RGB")
            small.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(
                ROOT / "docs" / "screenshots" / "dataset.png", optimize=True)
        card = pg.locator("a.es-open-single").first
        index = card.get_attribute("data-index")
        dy, dx = (int(v) for v in card.get_attribute("data-shift").split(","))
        card.click()
        pg.locator("canvas.es-canvas").first.wait_for()
        _settled(pg, (dy, dx))
        assert _shown_shift(pg) == (dy, dx)
        assert f"shift={dy}%2C{dx}" in pg.url or f"shift={dy},{dx}" in pg.url
        assert pg.get_by_text(f"fmnist:{index}").first.is_visible()
        assert pg.locator(".stException").count() == 0
        _shot(pg, "dataset-opened-in-single-image")
    finally:
        ctx.close()
