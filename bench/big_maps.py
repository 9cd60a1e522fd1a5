"""What the big-map paths of the anchored layers buy, measured in one run.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/big_maps.py [--models resnet18 pvt_v2_b0 convnext_atto]
        [--batch 32] [--reps 9] [--threads 2]

On a CPU, maps of millions of elements take other code paths (equishift.polyphase, equishift.layers):
the anchor's roll as block copies (channels-last out), the roll and the circular padding of the next
conv/pooling fused into one copy, the circular conv as a zero-padded conv whose border is recomputed from
wrapped strips, and the per-pixel energy as a chain over channels. Each avoids a fresh map-sized buffer,
whose page faults cost more than the copy. For each model three forwards are interleaved: the timm
baseline, the anchored model, and the same anchored model with those paths switched off (every threshold
set out of reach: the small-map code on every size). Prints the medians and the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from equishift import anchorize, polyphase
from equishift.layers import anchored, circular
from equishift.testing import trained_like

_SWITCHES = ((polyphase, "_BLOCKS_MIN"), (polyphase, "_CHAIN_MIN"), (circular, "_BORDER_FIX_MIN"),
             (anchored, "_FUSE_MIN"))


def _paths(on: bool, saved):
    for (mod, name), value in zip(_SWITCHES, saved):
        setattr(mod, name, value if on else 10 ** 15)


def main(argv=None) -> int:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["resnet18", "pvt_v2_b0", "convnext_atto"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = tuple(getattr(mod, name) for mod, name in _SWITCHES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.reps} interleaved "
          f"reps, wall clock, torch.inference_mode")
    print(f"{'model':16s} {'base ms':>8s} {'anchored/base':>14s} {'paths off/base':>15s} {'on/off':>7s}")
    try:
        for name in args.models:
            torch.manual_seed(0)
            base = trained_like(timm.create_model(name, pretrained=False), 0).eval()
            model = anchorize(base).eval()
            size = base.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            runs = {"base": (base, True), "on": (model, True), "off": (model, False)}
            times = {k: [] for k in runs}
            with torch.inference_mode():
                for k, (m, on) in runs.items():  # warm-up
                    _paths(on, saved)
                    m(x)
                for r in range(args.reps):
                    keys = list(runs)[r % 3:] + list(runs)[:r % 3]
                    for k in keys:
                        m, on = runs[k]
                        _paths(on, saved)
                        t0 = time.perf_counter()
                        m(x)
                        times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:16s} {med['base'] * 1e3:8.0f} {med['on'] / med['base']:14.3f} "
                  f"{med['off'] / med['base']:15.3f} {med['on'] / med['off']:7.3f}")
    finally:
        _paths(True, saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
