"""What the safety checks cost: load_image vs a bare PIL decode, load_weights vs the bare loaders.

    nice -n 15 .venv/bin/python bench/safe_loading.py

Prints median seconds and the ratio (safe / bare) measured in this run; the images are synthetic (smooth
gradients plus noise), the weights those of a randomly initialised ViT-S/16 (22 M parameters, 88 MB).
"""
from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equishift.checkpoint import load_weights
from equishift.images import load_image


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(label: str, safe: float, bare: float) -> None:
    print(f"{label:38s} safe {safe * 1e3:8.2f} ms   bare {bare * 1e3:8.2f} ms   ratio {safe / bare:5.2f}")


def bench_images() -> None:
    rng = np.random.default_rng(0)
    for (w, h), fmt, kw in (((1024, 768), "JPEG", {"quality": 90}), ((2000, 1500), "PNG", {}),
                            ((1024, 768), "WEBP", {"quality": 90})):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=2)
        arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        data = buf.getvalue()

        def bare():
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")

        report(f"image {fmt} {w}x{h} ({len(data) // 1024} KiB)", median_seconds(lambda: load_image(data), 7),
               median_seconds(bare, 7))


def bench_weights() -> None:
    import timm
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in timm.create_model("vit_small_patch16_224").state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        st_path, pt_path = Path(d) / "w.safetensors", Path(d) / "w.pt"
        save_file(state, str(st_path))
        torch.save(state, pt_path)
        mb = st_path.stat().st_size / 2**20
        report(f"weights safetensors ({mb:.0f} MiB)", median_seconds(lambda: load_weights(st_path), 5),
               median_seconds(lambda: load_file(str(st_path)), 5))
        report(f"weights torch zip ({mb:.0f} MiB)", median_seconds(lambda: load_weights(pt_path), 5),
               median_seconds(lambda: torch.load(pt_path, map_location="cpu", weights_only=True), 5))
        # safetensors' load_file maps the file lazily; most of the difference is the NaN/Inf scan, which
        # reads every byte once (the model would read them anyway when the weights are applied).
        loaded = load_file(str(st_path))
        scan = median_seconds(lambda: [bool(torch.isfinite(v).all()) for v in loaded.values()], 5)
        print(f"{'  of which the NaN/Inf scan':38s}      {scan * 1e3:8.2f} ms")


if __name__ == "__main__":
    torch.set_num_threads(1)
    bench_images()
    bench_weights()
