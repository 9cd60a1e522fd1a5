"""equishift's paper models against the paper's models written out from their description
(tests/paper_reference.py), on the released layouts at 224 px with their full widths and random
weights (LayerNorm affines away from 1/0): max |logit difference| for the same weights, loaded through a
paper-format checkpoint file, and the invariance error of each under circular shifts.

    python bench/paper_exact.py [--layouts vit_small_patch16_224 twins_svt_small ...] [--images 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import paper_reference as ref  # noqa: E402
from equishift.paper import load_paper  # noqa: E402
from equishift.testing import check_shift_invariant  # noqa: E402

LAYOUTS = {
    "vit_small_patch16_224": "polyvit", "twins_pcpvt_small": "polytwins-pcpvt", "twins_svt_small": "polytwins-svt",
    "twins_svt_base": "polytwins-svt", "swin_tiny_patch4_window7_224": "polyswin",
}


def reference(name: str, arch: str, seed: int):
    import timm

    torch.manual_seed(seed)
    if arch == "polyvit":
        model = ref.PaperViT(timm.create_model(name, pretrained=False))
        config = {"MODEL": {"TYPE": "polyvit", "CARD": name}, "DATA": {"IMG_SIZE": 224}}
        run = model
    elif arch.startswith("polytwins"):
        model = ref.circular_pegs(timm.create_model(name, pretrained=False))
        config = {"MODEL": {"TYPE": "polytwins", "CARD": name}, "DATA": {"IMG_SIZE": 224}}
        run = lambda x: ref.twins_forward(model, x)  # noqa: E731
    else:
        model = ref.PaperSwin(224, 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 1000)
        config = {"MODEL": {"TYPE": "swin_poly", "NUM_CLASSES": 1000, "SWIN": {"EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2],
                                                                               "NUM_HEADS": [3, 6, 12, 24],
                                                                               "WINDOW_SIZE": 7}},
                  "DATA": {"IMG_SIZE": 224}}
        run = model
    with torch.no_grad():
        head = model.head
        head.weight.mul_(20)  # logits of order one
    return ref.trained_like(model, seed).eval(), run, config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    p.add_argument("--images", type=int, default=2)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    print(f"{'layout':30s} {'arch':16s} {'dtype':8s} {'max|Δ logit| vs reference':>26s} {'invariance err':>15s} "
          f"{'logit scale':>11s}")
    for name in args.layouts:
        arch = LAYOUTS[name]
        model, run, config = reference(name, arch, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ckpt_epoch_299.pth"
            ref.save_paper_checkpoint(path, model.state_dict(), config)
            ours, _ = load_paper(arch, name, path)
        for dtype in (torch.float32, torch.float64):
            t = time.perf_counter()
            model.to(dtype)
            ours.to(dtype).eval()
            x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            x = x.to(dtype)
            want, got = run(x), ours(x)
            diff = (want - got).abs().max().item()
            inv = check_shift_invariant(ours, x, torch.tensor([[3, 5], [101, 17], [0, 111]])).max_error
            print(f"{name:30s} {arch:16s} {str(dtype)[6:]:8s} {diff:26.2e} {inv:15.2e} {want.abs().max().item():11.2f}"
                  f"   ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
