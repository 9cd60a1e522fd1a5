"""How fast the dashboard answers, measured in one run on this machine (CPU unless CUDA is visible).

1. Rerun after a shift change, sweep cached: the default pair on its full 32×32 circular orbit; the page
   is run in-process with Streamlit's AppTest, warmed up (models loaded, sweeps cached), then the shift
   is moved to 20 new shifts. Reported: median of the script's own time (first to last line of the page,
   what the server spends per rerun; written by the app to session_state["_render_s"]) and of the whole
   AppTest run, and the script thread's CPU time (what the rerun costs on an idle core: wall time also
   counts waiting for a CPU other processes hold). Target: ≤ 150 ms. Also per tab (only the open tab
   is computed). Only the fragment that depends on the shift reruns (dashboard.session.shift_view).
2. What the user feels, in chromium (Playwright, the Debian chromium), same grid, one tab open:
   - a drag: pointer events dispatched on the baseline view, each timed from dispatch to the end of its
     handler (both input views, predictions, top-5 tables and the figures' current-shift markers
     redrawn in the browser) and to the next frame; and the websocket messages sent meanwhile (0: the
     drag never waits for the server). Target: ≤ 16 ms per move (60 frames/s).
   - release, then key presses one at a time: time until the page is complete at the new shift (the
     server's controls show it and nothing on the page is stale), and the bytes the websocket received
     for that rerun. Target: ≤ 300 ms.
3. Start to first full render, started as `bash run.sh dashboard` does (python -m dashboard.serve: warm)
   and as a bare `streamlit run dashboard/app.py` (cold), as a subprocess: Playwright + the Debian chromium load
   the page as soon as /_stcore/health answers; time from process start until the page is complete
   (summary, both model columns and the open tab's figure drawn, no script running). Skipped when
   /usr/bin/chromium is absent; the AppTest cold run (fresh process: imports, model load, sweeps,
   render) is reported in any case. The page opens on the grid it picks for this machine (the largest
   whose estimated sweep time is ≤ 10 s), unless --first-grid asks for one.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/interaction.py [--grid full] [--repeats 20] [--no-browser]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
sys.path.insert(0, str(ROOT / "tests"))
from app_harness import PAGE_IDLE_JS, WS_COUNTER_JS, free_port, wait_healthy  # noqa: E402

TARGET_MS = 150.0   # server script time per rerun
FRAME_MS = 16.0     # one frame at 60 frames/s: the budget of one drag step in the browser
RELEASE_MS = 300.0  # release / key press → page complete in the browser
FIRST_RENDER_S = 5.0  # server healthy → first full render
TABS = ("Logit curves", "Orbit heatmaps", "Attention", "Polyphase indices", "Layer × shift error", "Attribution")


def _shifts(n: int, lo: int, hi: int):
    """n distinct shifts spread over the grid (a fixed walk: no RNG, same every run)."""
    out, k = [], 0
    span = hi - lo + 1
    while len(out) < n:
        s = (lo + (7 * k + 3) % span, lo + (11 * k + 5) % span)
        if s not in out and s != (0, 0):
            out.append(s)
        k += 1
    return out


def rerun_times(grid: str, repeats: int) -> dict:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=600)
    at.query_params["grid"] = grid
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    if at.exception:
        raise SystemExit(f"the page failed: {at.exception}")
    lo, hi = at.number_input(key="shift_dy").min, at.number_input(key="shift_dy").max
    out = {"grid": grid, "shift_range": [lo, hi], "cold_apptest_run_s": cold, "tabs": {}}
    for tab in TABS:
        at.session_state["panel"] = tab
        at.run()
        script, cpu, wall = [], [], []
        for dy, dx in _shifts(repeats, int(lo), int(hi)):
            at.number_input(key="shift_dy").set_value(dy)
            at.number_input(key="shift_dx").set_value(dx)
            t = time.perf_counter()
            at.run()
            wall.append(time.perf_counter() - t)
            script.append(at.session_state["_render_s"])
            cpu.append(at.session_state["_render_cpu_s"])
            if at.exception:
                raise SystemExit(f"{tab}: {at.exception}")
        out["tabs"][tab] = {"script_ms_median": 1e3 * statistics.median(script),
                            "script_cpu_ms_median": 1e3 * statistics.median(cpu),
                            "apptest_ms_median": 1e3 * statistics.median(wall),
                            "script_ms_max": 1e3 * max(script), "n": len(script)}
    return out


def first_render(grid: str, warm: bool = True) -> dict:
    """``warm``: started as `bash run.sh dashboard` starts it (python -m dashboard.serve: the default page
    is computed before the server takes visitors); else a bare `streamlit run dashboard/app.py`."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launcher = ["-m", "dashboard.serve"] if warm else ["-m", "streamlit", "run", str(APP)]
    cmd = [sys.executable, *launcher, "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(url, proc, timeout=300, poll=0.05)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"the server did not come up: {e}") from None
        healthy = time.perf_counter() - t0
        args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(300_000)
            browser_ready = time.perf_counter() - t0  # a user's browser is usually running already
            page.goto(url + (f"/?grid={grid}" if grid else ""))
            # first full render: the summary, the live view (both models) and the open tab's figure drawn,
            # on whatever grid the page draws first (a coarse one while the chosen grid is swept)
            page.get_by_text("Summary over the swept shifts").wait_for()
            page.locator("canvas.es-canvas").first.wait_for()
            page.locator(".stPlotlyChart .main-svg").first.wait_for()
            page.wait_for_function("() => window.__esLive && window.__esLive.__es.imgs.baseline && "
                                   "window.__esLive.__es.imgs.anchored")
            rendered = time.perf_counter() - t0
            first = page.evaluate("() => window.__esLive.__es.data.grid.n") ** 2
            # then the chosen grid: drawn once its background sweep is done
            page.wait_for_function("() => !document.body.innerText.includes('swept in the background')"
                                   " && window.__esLive && window.__esLive.__es.imgs.baseline")
            page.wait_for_function(_server_shift_js(0, 0))
            chosen = time.perf_counter() - t0
            picked = page.locator("[data-testid='stCaptionContainer']", has_text="grid:").first.inner_text()
            picked = picked.split("grid:")[1].split(". Drag")[0].strip()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.seek(0)
        warm_up = [line.strip() for line in log if "warm-up" in line]
        log.close()
    return {"grid": grid or f"page default: {picked}", "server_healthy_s": healthy, "first_full_render_s": rendered,
            "first_grid_shifts": first, "chosen_grid_render_s": chosen, "warm_up": warm_up,
            "browser_started_s": browser_ready}


CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]

# A drag inside the page: pointer events dispatched on the baseline view one after another, each timed
# from dispatch to the end of its handler (the view redrawn: both inputs, top-5 tables, figure markers)
# and to the next painted frame. Resolves to {handler_ms: [...], frame_ms: [...], sent: websocket messages}.
_DRAG_JS = """async ([moves, stepPx]) => {
  const canvas = window.__esLive.querySelector('canvas.es-canvas');
  const r = canvas.getBoundingClientRect(), x0 = r.left + r.width / 2, y0 = r.top + r.height / 2;
  const ev = (type, x, y) => new PointerEvent(type, { clientX: x, clientY: y, pointerId: 1, bubbles: true,
                                                      isPrimary: true, button: 0, buttons: 1 });
  canvas.setPointerCapture = () => {};  // synthetic pointers cannot be captured
  const sent0 = window.__ws.sent, handler = [], frame = [];
  canvas.dispatchEvent(ev('pointerdown', x0, y0));
  for (let i = 1; i <= moves; i++) {
    const k = i % 8, dx = (k < 4 ? k : 8 - k) * stepPx, dy = (i % 3) * stepPx;  // stays within ±4 px
    const t0 = performance.now();
    canvas.dispatchEvent(ev('pointermove', x0 + dx, y0 + dy));
    handler.push(performance.now() - t0);
    await new Promise(res => requestAnimationFrame(res));
    frame.push(performance.now() - t0);
  }
  const sent = window.__ws.sent - sent0;
  return { handler_ms: handler, frame_ms: frame, sent };
}"""


def _server_shift_js(dy, dx) -> str:
    """True once the server has rerun at (dy, dx) and the page has finished drawing that rerun: the
    number inputs (set by the server) show it and nothing on the page is stale."""
    return (f"() => {{ const v = Array.from(document.querySelectorAll('[data-testid=stNumberInput] input'))"
            f".map(e => Number(e.value)); return v.length >= 2 && v[0] === {dy} && v[1] === {dx} && "
            f"({PAGE_IDLE_JS})(); }}")


def browser_latency(grid: str, tab: str, moves: int, presses: int) -> dict:
    """What the user feels in chromium: a drag frame, and key press → page complete, with the bytes the
    websocket carried per rerun."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc, timeout=300, poll=0.05)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROME_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(600_000)
            page.add_init_script(WS_COUNTER_JS)
            page.goto(f"{url}/?grid={grid}&panel={tab.replace(' ', '+')}")
            page.locator("canvas.es-canvas").first.wait_for()
            page.locator(".stPlotlyChart .main-svg").first.wait_for()
            page.wait_for_function(_server_shift_js(0, 0))
            page.wait_for_timeout(1000)
            scale = page.evaluate("() => window.__esLive.querySelector('canvas.es-canvas').width") / \
                page.evaluate("() => window.__esLive.__es.data.sides[0].width")
            drag = page.evaluate(_DRAG_JS, [moves, scale])
            # release: the shift goes to the server once; the page completes that rerun
            shift = page.evaluate("() => window.__esLive.__es.shift")
            recv0 = page.evaluate("() => window.__ws.recvBytes")
            t0 = time.perf_counter()
            page.evaluate("() => window.__esLive.querySelector('canvas.es-canvas')"
                          ".dispatchEvent(new PointerEvent('pointerup', {pointerId: 1, bubbles: true}))")
            page.wait_for_function(_server_shift_js(*shift), polling=5)
            release_ms = 1e3 * (time.perf_counter() - t0)
            release_bytes = page.evaluate("() => window.__ws.recvBytes") - recv0
            # key presses, one at a time, each waited for until the page is complete
            canvas = page.locator("canvas.es-canvas").first
            canvas.focus()
            press_ms, press_bytes = [], []
            for i in range(presses):
                key = ("ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp")[i % 4]
                shift = page.evaluate("() => window.__esLive.__es.shift")
                move = {"ArrowRight": (0, 1), "ArrowDown": (1, 0), "ArrowLeft": (0, -1), "ArrowUp": (-1, 0)}[key]
                want = (shift[0] + move[0], shift[1] + move[1])
                recv0 = page.evaluate("() => window.__ws.recvBytes")
                t0 = time.perf_counter()
                page.keyboard.press(key)
                page.wait_for_function(_server_shift_js(*want), polling=5)
                press_ms.append(1e3 * (time.perf_counter() - t0))
                press_bytes.append(page.evaluate("() => window.__ws.recvBytes") - recv0)
                page.wait_for_timeout(300)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"grid": grid, "tab": tab, "drag_handler_ms_median": statistics.median(drag["handler_ms"]),
            "drag_handler_ms_max": max(drag["handler_ms"]), "drag_frame_ms_median": statistics.median(drag["frame_ms"]),
            "drag_messages_sent": drag["sent"], "moves": moves, "release_ms": release_ms,
            "release_bytes": release_bytes, "press_ms_median": statistics.median(press_ms),
            "press_ms_max": max(press_ms), "press_bytes_median": statistics.median(press_bytes), "presses": presses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="full", help="?grid= of the page: full (32×32 orbit), period, rR")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--browser-tab", default="Orbit heatmaps", help="the tab open while dragging / pressing keys")
    ap.add_argument("--moves", type=int, default=60, help="pointer moves of the drag")
    ap.add_argument("--presses", type=int, default=10, help="key presses, each waited for")
    ap.add_argument("--first-grid", default="", help="?grid= for the first-render timing (default: none, the "
                                                     "grid the page picks for this machine)")
    ap.add_argument("--first-render-only", action="store_true", help="only section 3")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from dashboard.compute import device_label

    print(f"device: {device_label()}; torch threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.first_render_only:
        return _print_first_render(args, {}, {})
    res = rerun_times(args.grid, args.repeats)
    print(f"\n1. rerun after a shift change, sweep cached, grid '{res['grid']}' "
          f"(shifts {res['shift_range'][0]}..{res['shift_range'][1]} per axis), median of {args.repeats}:")
    for tab, r in res["tabs"].items():
        print(f"   tab {tab!r:24s} script wall {r['script_ms_median']:6.1f} ms (max {r['script_ms_max']:6.1f}), "
              f"script CPU {r['script_cpu_ms_median']:6.1f} ms, AppTest run {r['apptest_ms_median']:6.1f} ms  "
              f"→ wall {r['script_ms_median'] / TARGET_MS:.2f}×, CPU {r['script_cpu_ms_median'] / TARGET_MS:.2f}× "
              f"the {TARGET_MS:.0f} ms target")
    print(f"   cold AppTest run in this process (imports, 2 models, 2 sweeps, render): "
          f"{res['cold_apptest_run_s']:.1f} s")
    if args.no_browser or not Path("/usr/bin/chromium").exists():
        print("\n2./3. browser latency and first render: skipped (no /usr/bin/chromium or --no-browser)")
        return
    lat = browser_latency(args.grid, args.browser_tab, args.moves, args.presses)
    print(f"\n2. in chromium, grid '{lat['grid']}', tab {lat['tab']!r}:")
    print(f"   drag: {lat['moves']} pointer moves, handler (inputs, predictions, top-5 tables, figure markers "
          f"redrawn) median {lat['drag_handler_ms_median']:.1f} ms (max {lat['drag_handler_ms_max']:.1f}), "
          f"move → next frame {lat['drag_frame_ms_median']:.1f} ms; messages to the server during the drag: "
          f"{lat['drag_messages_sent']}  → {lat['drag_handler_ms_median'] / FRAME_MS:.2f}× the {FRAME_MS:.0f} ms frame")
    print(f"   release → page complete {lat['release_ms']:.0f} ms ({lat['release_bytes'] / 1e3:.1f} kB received)")
    print(f"   key press → page complete: median {lat['press_ms_median']:.0f} ms (max {lat['press_ms_max']:.0f}) "
          f"over {lat['presses']}, {lat['press_bytes_median'] / 1e3:.1f} kB received per rerun  → "
          f"{lat['press_ms_median'] / RELEASE_MS:.2f}× the {RELEASE_MS:.0f} ms target")
    _print_first_render(args, res, lat)


def _print_first_render(args, res: dict, lat: dict) -> None:
    first = {}
    for warm, how in ((True, "`bash run.sh dashboard` (python -m dashboard.serve, warm)"),
                      (False, "`streamlit run dashboard/app.py` (cold)")):
        fr = first[how] = first_render(args.first_grid, warm=warm)
        after = fr['first_full_render_s'] - fr['server_healthy_s']
        print(f"\n3. {how}: start → health {fr['server_healthy_s']:.1f} s → first full render in chromium "
              f"{fr['first_full_render_s']:.1f} s (on {fr['first_grid_shifts']} shifts; {after:.1f} s after "
              f"healthy → {after / FIRST_RENDER_S:.2f}× the {FIRST_RENDER_S:.0f} s target) → the chosen grid "
              f"{fr['grid']} drawn at {fr['chosen_grid_render_s']:.1f} s; of that, starting chromium took "
              f"{fr['browser_started_s'] - fr['server_healthy_s']:.1f} s (page load → render "
              f"{fr['first_full_render_s'] - fr['browser_started_s']:.1f} s)")
        for line in fr["warm_up"]:
            print(f"   server: {line}")
    print("\n" + json.dumps({"rerun": res, "browser": lat, "first_render": first}))


if __name__ == "__main__":
    main()
