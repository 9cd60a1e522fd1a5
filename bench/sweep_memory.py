"""Peak memory of one sweep under several memory budgets (equishift.sweep's ``memory_budget_mb``).

Each budget runs in a fresh child process: the child builds the model, runs a one-shift sweep to warm
the allocator and lazy initialisation, reads its resident memory and resets the kernel's peak mark
(/proc/self/clear_refs), then sweeps K shifts under the budget and reports the peak resident memory
(VmHWM) above that baseline, the chunk sizes the sweep chose (from its progress callback) and
the time. ``unbounded`` runs every shift in one chunk (``batch_size=K``) for comparison.

    python bench/sweep_memory.py                       # vit_tiny_patch16_224 at 224 px, 48 shifts
    python bench/sweep_memory.py --budgets 64 256 1024 --shifts 96 --model vit_small_patch16_224
    python bench/sweep_memory.py --model "vit_tiny_patch16_224?img_size=96&patch_size=4&embed_dim=48&depth=3"

The growth is what the sweep adds on top of the loaded model; the budget bounds the chunk of shifts run
at once (estimated from the unshifted run), not the result, which grows with K (a few kB per shift here).

Each budget is measured twice: with glibc's default malloc, and with ``MALLOC_MMAP_THRESHOLD_=131072``.
By default glibc raises its mmap threshold after large frees, so later large buffers come from the heap,
which fragments and is not given back: peak RSS then grows with the NUMBER of chunks, not only their
size. A fixed threshold keeps every buffer above 128 KiB in its own mapping, returned on free, so the
peak RSS shows the live working set — what the budget is about.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rss import peak_mb, reset_peak, rss_mb  # noqa: E402


def child(model_name: str, shifts: int, budget: str, seed: int = 0) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    import timm
    import torch

    from equishift.sweep import sweep

    torch.manual_seed(seed)
    name, _, query = model_name.partition("?")          # "NAME?k=v&k=v": integer constructor arguments
    kwargs = {k: int(v) for k, v in (item.split("=") for item in query.split("&") if item)}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = model.patch_embed.img_size
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(seed))
    side = int(shifts ** 0.5 + 0.999)
    s = torch.tensor([(dy, dx) for dy in range(side) for dx in range(side)][:shifts])
    sweep(model, x, s[:1])                      # warm-up: allocator, lazy init, first-call costs
    base = rss_mb()
    reset_peak()                                # the peak from here on is the sweep's
    done = []
    kw = dict(batch_size=shifts) if budget == "unbounded" else dict(memory_budget_mb=float(budget))
    t0 = time.perf_counter()
    res = sweep(model, x, s, progress=lambda d, k: done.append(d), **kw)
    seconds = time.perf_counter() - t0
    chunks = [b - a for a, b in zip(done, done[1:])]
    return {"model": model_name, "shifts": shifts, "budget_mb": budget, "rss_before_mb": round(base, 1),
            "peak_mb": round(peak_mb(), 1), "growth_mb": round(peak_mb() - base, 1),
            "max_chunk": max(chunks), "chunks": len(chunks), "seconds": round(seconds, 2),
            "result_mb": round(res.nbytes / 2 ** 20, 2),
            "logits": res.logits.tolist()}


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(model_name: str, shifts: int, budget: str, fixed_mmap: bool = False, threads: int = 0) -> dict:
    """Run ``child`` in a fresh interpreter and return its result. ``threads`` > 0 sets OMP_NUM_THREADS:
    on a busy shared CPU, small chunks on 2 spinning OpenMP threads run ~10x slower than on one."""
    cmd = [sys.executable, __file__, "--child", "--model", model_name, "--shifts", str(shifts),
           "--budgets", str(budget)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(HF_HUB_OFFLINE="1", **(FIXED_MMAP if fixed_mmap else {}))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--shifts", type=int, default=48)
    ap.add_argument("--budgets", nargs="+", default=["64", "256", "1024", "unbounded"])
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the children (0: torch's default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.shifts, args.budgets[0])))
        return
    print(f"{args.model}, {args.shifts} shifts, one fresh process per budget and malloc setting")
    print(f"{'budget':>10} {'malloc':>14} {'chunk':>6} {'chunks':>6} {'RSS before':>11} {'peak':>8} "
          f"{'growth':>8} {'growth/budget':>13} {'result':>8} {'time':>7}")
    for b in args.budgets:
        for fixed in (False, True):
            r = measure(args.model, args.shifts, b, fixed_mmap=fixed, threads=args.threads)
            ratio = f"{r['growth_mb'] / float(b):.2f}" if b != "unbounded" else "-"
            label = f"{b} MB" if b != "unbounded" else b
            malloc = "mmap≥128KiB" if fixed else "glibc default"
            print(f"{label:>10} {malloc:>14} {r['max_chunk']:>6} {r['chunks']:>6} {r['rss_before_mb']:>9.0f}MB "
                  f"{r['peak_mb']:>6.0f}MB {r['growth_mb']:>6.0f}MB {ratio:>13} {r['result_mb']:>6.2f}MB "
                  f"{r['seconds']:>6.1f}s",
                  flush=True)


if __name__ == "__main__":
    main()
