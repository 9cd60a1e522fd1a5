"""Throughput of the dataset view's sweep (equishift.dataset_sweep) against the bare batched forward pass
of the same models, and the wall time of the whole dataset view (sweeps + the leaderboard's protocols).

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/dataset_view.py [--images 500] [--reps 5]
        [--models zoo:fmnist-vit-baseline,zoo:fmnist-vit-anchored,zoo:fmnist-vit-pos-only,zoo:fmnist-twins-svt-anchored]

For each model: images·shifts/s of ``sweep_dataset`` (one patch period, circular: 16 shifts per image) and
of plain ``model(x)`` over the same number of rows in the same batch size, repetitions interleaved (sweep,
bare, sweep, ...) and the fastest of each is kept (on a machine shared with other jobs the fastest run
is the one least disturbed; a median mixes in their load); their ratio
(the sweep also prepares the images, builds the shifted copies, reduces the probabilities and records the
polyphase choices). Then the total: every model's sweep and ``analyse`` (with the leaderboard's protocols:
clean, shifted accuracy, consistency A and B), uncached, in seconds.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

DEFAULT_MODELS = ("zoo:fmnist-vit-baseline,zoo:fmnist-vit-anchored,zoo:fmnist-vit-pos-only,"
                  "zoo:fmnist-twins-svt-anchored")


def main() -> None:
    from equishift import dataset_sweep as ds
    from equishift.zoo import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--models", default=DEFAULT_MODELS)
    args = p.parse_args()
    data = ds.fashion_mnist_set(args.images)
    models = [load_model(s, device="cpu") for s in args.models.split(",")]
    print(f"{len(data)} images × one patch period (16 circular shifts), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    total_sweep, total_bare = 0.0, 0.0
    for lm in models:
        ds.sweep_dataset(lm, ds.fashion_mnist_set(16), "period", batch_size=args.batch_size)  # warm-up
        sweep_t, bare_t = [], []
        rows = 0
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sw = ds.sweep_dataset(lm, data, "period", batch_size=args.batch_size)
            sweep_t.append(time.perf_counter() - t0)
            rows = sw.meta["rows"]
            bare_t.append(ds.bare_forward_seconds(lm, rows, args.batch_size))
        s, b = min(sweep_t), min(bare_t)
        total_sweep += s
        total_bare += b
        print(f"  {lm.name:<28} sweep {rows / s:8.0f} images·shifts/s   bare forward {rows / b:8.0f}/s   "
              f"ratio {b / s:.3f}   (sweep {s:.2f} s)")
    print(f"  all models                   sweep {total_sweep:.2f} s, bare forward {total_bare:.2f} s, "
          f"ratio {total_bare / total_sweep:.3f}")
    t0 = time.perf_counter()
    res = ds.analyse(models, data, "period")
    wall = time.perf_counter() - t0
    print(f"whole dataset view (uncached: {len(models)} sweeps + leaderboard protocols "
          f"{', '.join(res.protocols[0]['protocols'])}): {wall:.1f} s; load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
