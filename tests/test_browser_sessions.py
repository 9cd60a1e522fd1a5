"""Eight browser sessions on one server, as a shared lab server sees them: each opens its own sample image
at its own shift, one session then uploads image after image (new sweeps that fill the shared store), and
every other session moves its shift and reloads its page. Checked after each page has provably settled (its server-side
controls show the new shift and nothing on it is stale): every page shows its own image and shift, and
no other session's sweep was computed again (what the live sessions show is pinned in the store, so the
uploads evict only values nobody shows). The server's resident memory before and after is printed.
"""
from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_harness import WS_COUNTER_JS, served  # noqa: E402
from test_browser import CHROME_ARGS, _settled, _shown_shift  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = [(-3, 3), (-2, 2), (-1, 1), (0, 0), (1, -1), (2, -2), (3, -3), (1, 2)]
UPLOADS = 6

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.chromium]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sweeps_logged(log: Path) -> list:
    return [line for line in log.read_text(errors="replace").splitlines() if "equishift: sweep " in line]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((28, 28), np.uint8)
    r, c = rng.integers(2, 14, size=2)
    img[r:r + 12, c:c + 10] = rng.integers(120, 255)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _image_shown(pg, name: str) -> bool:
    # the sidebar's image expander is titled by the server after decoding the image
    return pg.locator("[data-testid='stSidebar'] [data-testid='stExpander']", has_text=f"Image {name}").count() == 1


def _move(pg, shift) -> None:
    """Type a new shift into the server's dy / dx inputs (each Enter is one rerun) and wait until the page
    shows it."""
    inputs = pg.locator("[data-testid='stNumberInput'] input")
    for i, v in enumerate(shift):
        inputs.nth(i).fill(str(v))
        inputs.nth(i).press("Enter")
    _settled(pg, shift)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's memory from /proc")
def test_eight_sessions_keep_their_own_view_while_one_uploads(chromium, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    samples = sorted(p.name for p in (ROOT / "assets" / "images").glob("*.png"))[:len(SHIFTS)]
    assert len(samples) == len(SHIFTS)
    log = tmp_path / "server.log"
    with served(log, env={"EQUISHIFT_WARM_UP": "0"}) as (url, proc):
        rss_before = _rss_mb(proc.pid)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
            pages = []
            for name, (dy, dx) in zip(samples, SHIFTS):
                ctx = browser.new_context(viewport={"width": 1400, "height": 900})
                ctx.add_init_script(WS_COUNTER_JS)
                pg = ctx.new_page()
                pg.set_default_timeout(300_000)
                pg.goto(f"{url}/?grid=r3&image_sample={name}&shift={dy},{dx}")
                pages.append(pg)
            for pg, name, shift in zip(pages, samples, SHIFTS):
                pg.locator("canvas.es-canvas").first.wait_for()
                _settled(pg, shift)
                assert _shown_shift(pg) == shift and _image_shown(pg, name), name
            rss_open = _rss_mb(proc.pid)
            swept_before = len(_sweeps_logged(log))
            assert swept_before >= 2 * len(SHIFTS)  # each page's own pair of sweeps, logged by the server

            # session 0 uploads image after image: each is a new pair of sweeps in the shared store
            up = pages[0]
            up.get_by_text("Upload", exact=True).click()
            _settled(up)
            for k in range(UPLOADS):
                up.locator("[data-testid='stSidebar'] input[type=file]").set_input_files(
                    files=[{"name": f"churn-{k}.png", "mimeType": "image/png", "buffer": _png(k)}])
                up.locator("[data-testid='stSidebar'] [data-testid='stExpander']",
                           has_text=f"Image churn-{k}.png").wait_for()
                _settled(up)
            swept_uploads = len(_sweeps_logged(log))
            assert swept_uploads >= swept_before + 2 * UPLOADS

            # every other session moves its shift (a fragment rerun), then reloads the page (a whole run
            # from the URL, which now holds the new shift): both drawn from the cached sweeps
            times = []
            for pg, name, (dy, dx) in list(zip(pages, samples, SHIFTS))[1:]:
                new = (dx, dy) if (dx, dy) != (dy, dx) else (dy, -3 if dx != -3 else 3)
                t0 = time.perf_counter()
                _move(pg, new)
                times.append(time.perf_counter() - t0)
                assert _shown_shift(pg) == new and _image_shown(pg, name), name
                pg.wait_for_function(f"() => location.search.includes('shift={new[0]}%2C{new[1]}') || "
                                     f"location.search.includes('shift={new[0]},{new[1]}')")
                pg.reload()
                pg.locator("canvas.es-canvas").first.wait_for()
                _settled(pg, new)
                assert _shown_shift(pg) == new and _image_shown(pg, name), name
                assert pg.locator("[data-testid='stAlertContentError']").count() == 0
            again = _sweeps_logged(log)[swept_uploads:]
            assert again == [], again
            rss_after = _rss_mb(proc.pid)
            print(f"\n8 sessions: server RSS {rss_before:.0f} MB at start, {rss_open:.0f} MB with 8 pages open, "
                  f"{rss_after:.0f} MB after {UPLOADS} uploads and 7 shift moves and reloads; shift move → settled: "
                  f"median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s; sweeps computed "
                  f"{swept_uploads} (none again)")
            assert rss_after - rss_before < 2048, (rss_before, rss_after)
            browser.close()
    assert not re.search(r"Traceback", log.read_text(errors="replace")), log.read_text()[-3000:]
