"""Throughput of ``evaluate(..., "all")``: batched (many images × all their shifted copies per forward)
÷ one forward per image and view, measured in one run.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/evaluate_batching.py [--images 40] [--reps 3]

A tiny ViT (patch 4, 32×32, random weights: speed does not depend on them) on the first Fashion-MNIST
test images. Repetitions are interleaved (batched, unbatched, batched, ...) so that load from other
processes hits both alike; prints images/s of each (median) and their ratio. Both runs must give the same
counts (the draws do not depend on the batch size), which the script checks.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _loaded():
    from timm.models import VisionTransformer

    from equishift.data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
    from equishift.zoo import LoadedModel

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    card = dict(name="bench-vit", classes=list(FMNIST_CLASSES), input_size=[3, 32, 32], mean=list(FMNIST_MEAN),
                std=list(FMNIST_STD), pad=2, dataset="fashion-mnist", preprocess="padded", metrics={})
    return LoadedModel(model=model.eval(), card=card, spec="bench", device=torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from equishift.data import FashionMNIST
    from equishift.evaluation import evaluate

    loaded, ds = _loaded(), FashionMNIST("test")
    times = {256: [], 1: []}
    results = {}
    evaluate(loaded, ds, "all", limit=4)  # warm-up
    for _ in range(args.reps):
        for bs in (256, 1):
            t0 = time.perf_counter()
            results[bs] = evaluate(loaded, ds, "all", limit=args.images, batch_size=bs)
            times[bs].append(time.perf_counter() - t0)
    assert results[256]["protocols"] == results[1]["protocols"], "batch size changed the results"
    fast, slow = statistics.median(times[256]), statistics.median(times[1])
    print(f"evaluate 'all' (25 forwards per image), {args.images} images, {torch.get_num_threads()} threads")
    print(f"  batched (256 rows/forward): {args.images / fast:8.1f} images/s")
    print(f"  one row per forward:        {args.images / slow:8.1f} images/s")
    print(f"  speed-up batched / unbatched: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
