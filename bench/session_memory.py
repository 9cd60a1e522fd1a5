"""Memory of one dashboard session over many shift changes (AppTest, in-process, no browser).

Opens the real page (dashboard/app.py) on the shipped zoo models when they are there, else on two tiny
random ones, on the ±3 px grid; warms up with a few changes; then moves the shift N times (200 by
default) along a fixed walk over the grid, one rerun per change, exactly as the number inputs do. Prints
the resident memory at the start, every 50 changes and at the end, the peak (VmHWM), the growth,
the growth over the second half (a leak shows as a steady slope there; allocator noise does not), the
number of session-state keys and of entries in the process-wide result store, and the time per change.

    python bench/session_memory.py [--changes 200] [--panel "Attention"] [--tiny]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rss import peak_mb, reset_peak, rss_mb  # noqa: E402


def walk(n: int, r: int = 3):
    """n shifts on the (2r+1)² grid, each different from the last: a stride coprime to the grid size
    visits every cell before repeating."""
    side = 2 * r + 1
    for i in range(n):
        k = (i * 17 + 5) % (side * side)
        yield k // side - r, k % side - r


def session_sizes(at):
    from dashboard.compute import store

    return len(at.session_state), len(store()._data)


def move(at, dy: int, dx: int) -> None:
    at.number_input(key="shift_dy").set_value(dy)
    at.number_input(key="shift_dx").set_value(dx)
    at.run()
    if at.exception:
        raise RuntimeError(at.exception[0].value)


def run(changes: int, panel: str, tiny: bool, warmup: int = 10) -> dict:
    from app_harness import errors, open_page, tiny_zoo
    from dashboard.sources import DEFAULT_ANCHORED, DEFAULT_BASELINE
    from equishift.zoo import list_models

    shipped = not tiny and {DEFAULT_BASELINE, DEFAULT_ANCHORED} <= set(list_models())
    zoo = contextlib.nullcontext((DEFAULT_BASELINE, DEFAULT_ANCHORED)) if shipped else tiny_zoo()
    with zoo as (baseline, anchored):
        at = open_page(baseline, anchored)
        if panel:
            at.session_state["panel"] = panel
            at.run()
        assert not at.exception and not errors(at), (at.exception, errors(at))
        steps = list(walk(warmup + changes))
        for dy, dx in steps[:warmup]:
            move(at, dy, dx)
        gc.collect()
        start, keys0, store0 = rss_mb(), *session_sizes(at)
        reset_peak()  # the peak reported is the one during the N changes
        marks, t0 = [], time.perf_counter()
        for i, (dy, dx) in enumerate(steps[warmup:], 1):
            move(at, dy, dx)
            if i % 50 == 0 or i == changes:
                marks.append((i, rss_mb()))
        seconds = time.perf_counter() - t0
        gc.collect()
        keys1, store1 = session_sizes(at)
        half = dict(marks).get(changes // 2 // 50 * 50, start)
        return {"models": (baseline, anchored), "panel": panel or "(default)", "changes": changes,
                "start_mb": start, "end_mb": rss_mb(), "peak_mb": peak_mb(), "marks": marks,
                "second_half_growth_mb": rss_mb() - half, "keys": (keys0, keys1), "store": (store0, store1),
                "ms_per_change": 1000 * seconds / changes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--panel", default="", help="tab to keep open (default: the page's first)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random models even if the zoo exists")
    args = ap.parse_args()
    r = run(args.changes, args.panel, args.tiny)
    print(f"models: {r['models'][0]} | {r['models'][1]}; panel: {r['panel']}; {r['changes']} shift changes")
    print(f"RSS at start (after warm-up): {r['start_mb']:.0f} MB")
    for i, mb in r["marks"]:
        print(f"  after {i:>4} changes: {mb:.0f} MB ({mb - r['start_mb']:+.1f} MB)")
    print(f"peak RSS during the changes (VmHWM): {r['peak_mb']:.0f} MB ({r['peak_mb'] - r['start_mb']:+.1f} MB)")
    print(f"growth: {r['end_mb'] - r['start_mb']:+.1f} MB over {r['changes']} changes; "
          f"second half: {r['second_half_growth_mb']:+.1f} MB")
    print(f"session-state keys: {r['keys'][0]} -> {r['keys'][1]}; result-store entries: "
          f"{r['store'][0]} -> {r['store'][1]}")
    print(f"time per change (one rerun): {r['ms_per_change']:.0f} ms")


if __name__ == "__main__":
    main()
