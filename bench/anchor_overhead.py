"""Forward-time overhead of adaptive polyphase anchoring: anchored ÷ baseline, measured in one run.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/anchor_overhead.py [--reps 9] [--batch 64]
        [--threads N --clock wall|cpu]   (default: one table on 1 thread, CPU clock; one on all threads, wall)
        [--floor]   (two more columns: the same anchored model with each anchor replaced by the least work
                     any anchor that materialises its roll must do, and with no anchors at all)

For each model the untouched timm model and ``anchorize(model, "full")`` run the same batch under
``torch.inference_mode``; repetitions are interleaved (A B, B A, ...; with ``--floor``, A B C D,
B C D A, ...) so that load from other processes hits all alike, and the ratio of the medians is
printed (target ≤ 1.15), together with the median of the per-repetition ratios and the share of the
anchored forward spent in the anchors themselves.
Random weights, with trained-like LayerNorm affine (γ ~ U(0.5, 1.5), β ~ N(0, 0.2)): speed does not
depend on the weights, except through near-ties. With timm's own init (γ = 1, β = 0) every token after a
LayerNorm has the same norm, the block anchors' l2 scores tie, and the second key is paid on most images
(docs/anchoring.md, "Near-ties"); trained models almost never tie.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from equishift import anchorize
from equishift.polyphase import PolyphaseAnchor


def _models(only):
    import timm
    from timm.models.twins import Twins
    from timm.models.vision_transformer import VisionTransformer

    cases = {
        "tiny ViT p4 @32": (lambda: VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4,
                                                      num_heads=2, num_classes=10), 32),
        "tiny Twins-SVT @32": (lambda: Twins(img_size=32, patch_size=4, embed_dims=(32, 64), num_heads=(1, 2),
                                             mlp_ratios=(2, 2), depths=(2, 2), wss=(4, 2), sr_ratios=(2, 1),
                                             num_classes=10), 32),
        "tiny Twins-PCPVT @32": (lambda: Twins(img_size=32, patch_size=4, embed_dims=(32, 64), num_heads=(1, 2),
                                               mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1),
                                               num_classes=10), 32),
        "vit_small_patch16_224 @224": (lambda: timm.create_model("vit_small_patch16_224", pretrained=False), 224),
        # one model per further family (issue: every family at 224 px)
        "twins_svt_small @224": (lambda: timm.create_model("twins_svt_small", pretrained=False), 224),
        "swin_tiny_patch4_window7_224 @224": (lambda: timm.create_model("swin_tiny_patch4_window7_224",
                                                                        pretrained=False), 224),
        "pvt_v2_b0 @224": (lambda: timm.create_model("pvt_v2_b0", pretrained=False), 224),
        "resnet18 @224": (lambda: timm.create_model("resnet18", pretrained=False), 224),
        "convnext_atto @224": (lambda: timm.create_model("convnext_atto", pretrained=False), 224),
    }
    return {k: v for k, v in cases.items() if not only or any(o.lower() in k.lower() for o in only)}


@torch.no_grad()
def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """LayerNorm affine as training leaves it (γ ~ U(0.5, 1.5), β ~ N(0, 0.2)), seeded, in place: with
    timm's γ = 1, β = 0 the anchors after a LayerNorm near-tie (used by the other benches too)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(model, x, clock) -> float:
    t = clock()
    model(x)
    return clock() - t


def _anchor_time(model, x, reps: int, clock) -> float:
    """Median seconds the PolyphaseAnchor modules take inside one anchored forward (forward hooks)."""
    spent, starts = [], {}

    def pre(mod, args):
        starts[id(mod)] = clock()

    def post(mod, args, out):
        spent.append(clock() - starts.pop(id(mod)))

    hooks = []
    for m in model.modules():
        if isinstance(m, PolyphaseAnchor):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    per_forward = []
    try:
        for _ in range(reps):
            spent.clear()
            model(x)
            per_forward.append(sum(spent))
    finally:
        for h in hooks:
            h.remove()
    return statistics.median(per_forward)


class _ReadAndCopy(nn.Module):
    """A cost floor, not an anchor: scoring needs every value read once and the roll writes one copy;
    this does exactly that much (a sum and a clone) and nothing else (no choice, no index arithmetic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sum()
        return x.clone()


def _replace_anchors(model: nn.Module, make) -> nn.Module:
    """A copy of ``model`` whose PolyphaseAnchor modules are replaced by ``make()``."""
    model = copy.deepcopy(model)
    for name in [n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)]:
        model.set_submodule(name, make())
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions per model (interleaved)")
    ap.add_argument("--only", nargs="*", help="substrings of the model names to run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads; default: two tables, 1 thread (CPU clock) and torch's default (wall)")
    ap.add_argument("--clock", choices=sorted(_CLOCKS), default=None,
                    help="wall: elapsed time; cpu: this process's CPU time — with --threads 1 it does not count "
                         "time the scheduler gives to other processes, so it is the steadier figure on a busy host")
    ap.add_argument("--floor", action="store_true",
                    help="also time the anchored model with each anchor replaced by a sum + clone of its map "
                         "(floor) and by nothing (no anchors: circular PEGs and wrappers only), interleaved")
    args = ap.parse_args(argv)
    if args.threads is None and args.clock is None:
        # One thread measures the work the anchors add; all threads shows how it parallelises (the anchors'
        # kernels on 8x8 maps are too small to gain from a second thread, the baseline's matmuls are not).
        configs = [(1, "cpu"), (torch.get_num_threads(), "wall")]
    else:
        configs = [(args.threads or torch.get_num_threads(), args.clock or "wall")]
    for threads, clock in configs:
        torch.set_num_threads(threads)
        _table(args, clock)
    print("ratio = median(anchored) / median(baseline) (the figure to quote; target ≤ 1.15); paired = median of "
          "per-rep ratios; min = fastest anchored / fastest baseline (least disturbed by other load); anchors = "
          "share of the median anchored forward spent inside PolyphaseAnchor modules."
          + (" floor = anchors replaced by one read and one copy of their map; no-anch = anchors removed "
             "(both ÷ baseline, median; neither model is shift-invariant, they only bound the cost)."
             if args.floor else ""))


def _table(args, clock_name: str) -> None:
    clock = _CLOCKS[clock_name]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.reps} interleaved reps, {clock_name} clock, CPU, torch.inference_mode")
    print(f"{'model':28s} {'base ms':>9s} {'anch ms':>9s} {'ratio':>6s} {'paired':>7s} {'min':>6s} {'anchors':>8s}"
          + (f" {'floor':>6s} {'no-anch':>7s}" if args.floor else ""))
    for name, (build, size) in _models(args.only).items():
        base = trained_like(build()).eval()
        anch = anchorize(base, "full").eval()
        models = [base, anch]
        if args.floor:
            models += [_replace_anchors(anch, _ReadAndCopy), _replace_anchors(anch, nn.Identity)]
        x = torch.randn(args.batch, 3, size, size)
        with torch.inference_mode():
            for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
                for m in models:
                    m(x)
            times = [[] for _ in models]
            for r in range(args.reps):
                # rotate the order (A B C D, B C D A, ...): load from other processes hits all alike
                for k in range(len(models)):
                    i = (r + k) % len(models)
                    times[i].append(_time(models[i], x, clock))
            share = _anchor_time(anch, x, max(3, args.reps // 3), clock)
        tb, ta = times[0], times[1]
        mb, ma = statistics.median(tb), statistics.median(ta)
        paired = statistics.median(a / b for a, b in zip(ta, tb))
        extra = "".join(f" {statistics.median(t) / mb:{w}.3f}" for t, w in zip(times[2:], (6, 7)))
        print(f"{name:28s} {mb * 1e3:9.1f} {ma * 1e3:9.1f} {ma / mb:6.3f} {paired:7.3f} {min(ta) / min(tb):6.3f} "
              f"{share / ma:7.1%}{extra}", flush=True)


if __name__ == "__main__":
    main()
