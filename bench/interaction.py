"""How fast the dashboard answers, measured in one run on this machine (CPU unless CUDA is visible).

1. Rerun after a shift change, sweep cached: the default pair on its full 32×32 circular orbit; the page
   is run in-process with Streamlit's AppTest, warmed up (models loaded, sweeps cached), then the shift
   is moved to 20 new shifts. Reported: median of the script's own time (first to last line of the page,
   what the server spends per rerun; written by the app to session_state["_render_s"]) and of the whole
   AppTest run, and the script thread's CPU time (what the rerun costs on an idle core: wall time also
   counts waiting for a CPU other processes hold). Target: ≤ 150 ms. Also per tab (only the open tab
   is computed).
2. Start to first full render: `streamlit run` as a subprocess, Playwright + the Debian chromium load
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
sys.path.insert(0, str(ROOT / "tests"))
from app_harness import free_port, wait_healthy  # noqa: E402

TARGET_MS = 150.0
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


def first_render(grid: str) -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
            page.goto(url + (f"/?grid={grid}" if grid else ""))
            page.get_by_text("Summary over the swept shifts").wait_for()
            page.locator(".stPlotlyChart .main-svg").nth(2).wait_for()  # 2 inputs + the open tab's figure
            page.wait_for_function("() => !document.body.innerText.includes('Running...')")
            rendered = time.perf_counter() - t0
            picked = page.get_by_text("Grid: ").first.inner_text().split(".")[0]
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"grid": grid or f"page default: {picked}", "server_healthy_s": healthy, "first_full_render_s": rendered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="full", help="?grid= of the page: full (32×32 orbit), period, rR")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--first-grid", default="", help="?grid= for the first-render timing (default: none, the "
                                                     "grid the page picks for this machine)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from dashboard.compute import device_label

    print(f"device: {device_label()}; torch threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
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
        print("\n2. first full render in a browser: skipped (no /usr/bin/chromium or --no-browser)")
        return
    fr = first_render(args.first_grid)
    print(f"\n2. `streamlit run` start → health {fr['server_healthy_s']:.1f} s → first full render in chromium "
          f"{fr['first_full_render_s']:.1f} s (grid {fr['grid']})")
    print("\n" + json.dumps({"rerun": res, "first_render": fr}))


if __name__ == "__main__":
    main()
