"""What one anchor costs, kernel by kernel, on the maps the 32-px zoo Twins hands its anchors.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/anchor_kernels.py [--reps 200] [--threads 1,2]

Each row times one step alone (batch 64, inference mode), interleaved with the others (every repetition
runs every step once, in a rotating order), and prints the median in microseconds, next to a reference
kernel that reads the same map once (a plain sum) or writes one copy of it (a clone):
  energies      per-pixel sum_c x²                       vs  x.sum(1)
  phase sums    the (B, s²) float64 phase sums             (from the energies)
  select        the anchor choice, default near-tie rule   vs  tie_tol=0 (plain argmax)
  x⁴ key        the second key, paid only when a near-tie occurs in the batch
  roll          the anchor roll by the chosen phase       vs  x.clone()
  anchor        the whole PolyphaseAnchor forward (default rule; and with every image tied)
Maps: the image (64 × 3 × 32 × 32, s = 4) and a stage-1 token grid viewed channels-last
(64 × 32 × 8 × 8, s = 4), as in the zoo's Twins-SVT.

Then what the near-tie rule costs a whole model: the zoo's Twins-SVT configuration (random weights,
trained-like LayerNorm affine, so no near-ties occur and only the check is paid) anchored with the
default rule and with ``tie_tol=0``, forward passes interleaved with the untouched model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from anchor_overhead import trained_like  # bench/ is on sys.path: this script runs from there
from equishift.polyphase import (PolyphaseAnchor, _energy, _phase_sums, _quartic_sums, _roll_to_anchor,
                                 _select)


def _maps(batch: int):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    tokens = torch.randn(batch, 64, 32, generator=g)  # (B, N, C), as a Twins block sees it
    grid = tokens.transpose(1, 2).reshape(batch, 32, 8, 8)  # a channels-last view
    tied = torch.nn.functional.layer_norm(tokens.double(), (32,), eps=0.0).float().transpose(1, 2).reshape(
        batch, 32, 8, 8)  # every phase ties on the l2 key: the x⁴ key decides every image
    return {"image 64×3×32×32": image, "token grid 64×32×8×8": grid, "tied grid (LayerNorm, γ=1)": tied}


def _steps(x: torch.Tensor, s: int):
    flat, _ = _select(x, s)
    anchor, plain = PolyphaseAnchor(s), PolyphaseAnchor(s, tie_tol=0)
    return {
        "energies": lambda: _energy(x),
        "  ref: x.sum(1)": lambda: x.sum(1),
        "phase sums": lambda: _phase_sums(x, s),
        "select (default rule)": lambda: _select(x, s),
        "select (tie_tol=0)": lambda: _select(x, s, 0.0),
        "x⁴ key": lambda: _quartic_sums(x, s),
        "roll": lambda: _roll_to_anchor(x, flat, s),
        "  ref: x.clone()": lambda: x.clone(),
        "anchor (default rule)": lambda: anchor(x),
        "anchor (tie_tol=0)": lambda: plain(x),
    }


def run(reps: int, threads: int, batch: int) -> None:
    torch.set_num_threads(threads)
    print(f"\n{threads} thread(s), batch {batch}, median of {reps} interleaved repetitions, µs")
    for label, x in _maps(batch).items():
        steps = _steps(x, 4)
        names = list(steps)
        times = {n: [] for n in names}
        with torch.inference_mode():
            for n in names:  # warm up (caches, index tables)
                for _ in range(5):
                    steps[n]()
            for r in range(reps):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    steps[n]()
                    times[n].append(time.perf_counter() - t0)
        print(f"  {label}")
        for n in names:
            print(f"    {n:<24} {1e6 * statistics.median(times[n]):8.1f}")


def whole_model(reps: int, threads: int, batch: int) -> None:
    import copy

    from timm.models.twins import Twins

    from equishift import anchorize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = Twins(img_size=32, patch_size=4, embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2),
                 depths=(2, 2), wss=(4, 2), sr_ratios=(2, 1), num_classes=10).eval()
    trained_like(base)
    default = anchorize(base).eval()
    plain = copy.deepcopy(default)
    for m in plain.modules():
        if isinstance(m, PolyphaseAnchor):
            m.tie_tol = 0.0
    models = {"untouched": base, "anchored, default rule": default, "anchored, tie_tol=0": plain}
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    times = {n: [] for n in models}
    names = list(models)
    with torch.inference_mode():
        for n in names:
            for _ in range(5):
                models[n](x)
        for r in range(reps):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\nwhole model (zoo Twins-SVT config, batch {batch}, {threads} thread(s), median of {reps}):")
    for n in names:
        print(f"  {n:<24} {1e3 * med[n]:7.2f} ms")
    print(f"  default rule ÷ tie_tol=0: {med[names[1]] / med[names[2]]:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    for t in args.threads.split(","):
        run(args.reps, int(t), args.batch)
    for t in args.threads.split(","):
        whole_model(max(21, args.reps // 5), int(t), args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
