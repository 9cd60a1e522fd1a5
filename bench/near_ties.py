"""Near-ties: how often an anchored model's output moves under a circular shift, per CPU capability,
dtype and selection rule — and the two numbers that explain it (top-2 margins and rounding).

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python bench/near_ties.py [--quick] [--caps native,avx2,default]
        [--seeds 6] [--images 4] [--json out.json]

Each CPU capability runs in its own process (PyTorch picks its kernels when it loads):
  native   whatever this CPU offers (the three variables below removed from the environment)
  inherit  whatever this process's environment says (CI's second and third runs set them)
  avx2     ATEN_CPU_CAPABILITY=avx2    DNNL_MAX_CPU_ISA=AVX2   MKL_ENABLE_INSTRUCTIONS=AVX2
  default  ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41  MKL_ENABLE_INSTRUCTIONS=SSE4_2
Rules, applied to every anchor of the same anchored model:
  paper    l2 norm of each component computed in the map's own dtype, plain argmax (the paper's code)
  argmax   squared norms summed in float64, plain argmax (``tie_tol=0``)
  tolerant equishift's default: phases within ``TIE_TOL[dtype]`` of the largest are decided by sum x⁴
  tol:T    the same with tolerance T (``--rules paper,argmax,tolerant,tol:1e-3`` compares several)
Models: tiny Twins-SVT / PCPVT at timm's own init (LayerNorm γ = 1, β = 0: the degenerate case), the same
with trained-like random LayerNorm affine, a tiny ViT, and the shipped Fashion-MNIST zoo models on test
images (when the data set is installed). Shifts: every shift of one 16 × 16 period.

Printed per row: ``moved`` = share of (image, shift) pairs whose logits move by more than the dtype's
tolerance (float32 1e-4, bfloat16 5e-2, float16 1e-2), ``flips`` = share whose top-1 class changes,
``max|Δ|``; ``m<1e-6 … m<1e-2`` = share of anchor decisions (all anchors, unshifted inputs) whose
relative top-2 margin (S1 - S2) / S1 is below that bound; ``δ`` = the largest relative change of a
phase sum between the unshifted and a shifted run, over every anchor after the image-level one (ViTs
have none) and the pairs whose logits did not move. Phase sums are compared sorted, so no alignment is needed; that makes δ a lower bound,
exact when the phases are farther apart than δ. Margins are counted on the ``tolerant`` rule (the last
rule when it is not run).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

CAPS = {
    "native": {},
    "inherit": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
RULES = "paper,argmax,tolerant"
_CAP_VARS = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
MARGIN_BOUNDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def _worker(args) -> dict:
    import torch
    from torch import nn

    from equishift import anchorize
    from equishift.polyphase import PolyphaseAnchor, _phase_sums, record_anchors
    from equishift.shifts import period_grid, shift_batch
    from anchor_overhead import trained_like  # bench/ is on sys.path: this script runs from there

    torch.set_num_threads(1)
    atol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float64: 1e-9}

    class PaperAnchor(PolyphaseAnchor):
        """The paper's selection: l2 norm per component in the map's dtype, first maximum."""

        def forward(self, x):
            b, c, h, w = x.shape
            s = self.stride
            comps = x.reshape(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).reshape(b, s * s, -1)
            flat = torch.linalg.vector_norm(comps, dim=2).argmax(dim=1)
            from equishift.polyphase import _roll_to_anchor
            return _roll_to_anchor(x, flat, s)

    def with_rule(model: nn.Module, rule: str) -> nn.Module:
        m = copy.deepcopy(model)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, PolyphaseAnchor):
                if rule == "paper":
                    m.set_submodule(name, PaperAnchor(mod.stride))
                elif rule.startswith("tol:"):
                    mod.tie_tol = float(rule[4:])
                else:
                    mod.tie_tol = 0.0 if rule == "argmax" else None
        return m.eval()

    def cases():
        from timm.models.twins import Twins
        from timm.models.vision_transformer import VisionTransformer

        cfg = dict(img_size=32, patch_size=4, num_classes=10, embed_dims=(32, 64), num_heads=(1, 2),
                   mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1))
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            for kind in ("svt", "pcpvt"):
                torch.manual_seed(seed)
                base = Twins(**cfg, **({"wss": (4, 2)} if kind == "svt" else {})).eval()
                x = torch.randn(args.images, 3, 32, 32, generator=g)
                yield f"{kind} timm init", anchorize(base), x
                trained = trained_like(copy.deepcopy(base), seed)
                yield f"{kind} LN randomised", anchorize(trained), x
            torch.manual_seed(seed)
            vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
            yield "vit timm init", anchorize(vit.eval()), torch.randn(args.images, 3, 32, 32, generator=g)
        try:
            from equishift.data import FashionMNIST
            from equishift.zoo import load_model
            data = FashionMNIST("test", indices=range(args.seeds * args.images))
        except Exception as e:  # noqa: BLE001 - the data set is optional for this bench
            print(f"[near_ties] zoo models skipped: {e}", file=sys.stderr)
            return
        x = torch.stack([data[i][0] for i in range(len(data))])
        for name in ("fmnist-twins-svt-anchored", "fmnist-vit-anchored"):
            yield f"zoo {name}", load_model(f"zoo:{name}", device="cpu").model, x

    shifts = period_grid(16)
    rows = {}
    for label, model, x in cases():
        token_anchors = [n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)][1:]
        for dtype in args.dtypes:
            dt = getattr(torch, dtype)
            xd = x.to(dt)
            for rule in args.rules.split(","):
                m = with_rule(model, rule).to(dt)
                grabbed = {n: [] for n in token_anchors}
                hooks = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: grabbed[n].append(a[0]))
                         for n in token_anchors]
                with torch.inference_mode(), record_anchors(m) as rec:
                    ref = m(xd).float()
                b = xd.shape[0]
                xs = shift_batch(xd.repeat(len(shifts), 1, 1, 1), shifts.repeat_interleave(b, 0), "circular")
                with torch.inference_mode():
                    out = torch.cat([m(xs[i:i + 256]).float() for i in range(0, xs.shape[0], 256)])
                for h in hooks:
                    h.remove()
                out = out.reshape(len(shifts), b, -1)
                err = (out - ref[None]).abs().amax(dim=2)  # (K, B)
                flips = out.argmax(2) != ref.argmax(1)[None]
                row = rows.setdefault((label, dtype, rule), {"pairs": 0, "moved": 0, "flips": 0, "max": 0.0,
                                                             "decisions": 0, "margins": [0] * len(MARGIN_BOUNDS),
                                                             "delta": 0.0})
                row["pairs"] += err.numel()
                row["moved"] += int((err > atol[dt]).sum())
                row["flips"] += int(flips.sum())
                row["max"] = max(row["max"], float(err.max()))
                rules = args.rules.split(",")
                if rule == ("tolerant" if "tolerant" in rules else rules[-1]):
                    for margins in rec.margins.values():
                        row["decisions"] += margins.numel()
                        for j, bound in enumerate(MARGIN_BOUNDS):
                            row["margins"][j] += int((margins < bound).sum())
                for name, maps in grabbed.items():
                    if rule != "argmax" or len(maps) < 2:
                        continue
                    s = m.get_submodule(name).stride
                    sums_ref = _phase_sums(maps[0], s).flatten(1).sort(dim=1).values  # (B, s²)
                    sums = torch.cat([_phase_sums(t, s).flatten(1) for t in maps[1:]]).sort(dim=1).values
                    sums = sums.reshape(len(shifts), b, -1)
                    rel = ((sums - sums_ref[None]).abs().amax(2) / sums_ref[None].amax(2))
                    # a pair whose logits moved had an anchor that chose differently: its later maps are
                    # other maps entirely (a flip, not rounding)
                    ok = err <= atol[dt] if dt == torch.float32 else torch.ones_like(err, dtype=torch.bool)
                    if ok.any():
                        row["delta"] = max(row["delta"], float(rel[ok].max()))
    return {" | ".join(k): v for k, v in rows.items()}


def key_has_token(label: str) -> bool:
    return not label.startswith("vit") and "vit-anchored" not in label  # ViTs anchor only the image


def _table(results: dict) -> str:
    head = ("| capability | model | dtype | rule | moved | flips | max abs Δ | "
            + " | ".join(f"m<{b:g}" for b in MARGIN_BOUNDS) + " | δ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cap, rows in results.items():
        for key, r in rows.items():
            label, dtype, rule = key.split(" | ")
            pct = lambda n, d: f"{100 * n / d:.2f}%" if d else "—"  # noqa: E731
            margins = " | ".join(pct(n, r["decisions"]) for n in r["margins"]) if r["decisions"] else \
                " | ".join("" for _ in MARGIN_BOUNDS)
            lines.append(f"| {cap} | {label} | {dtype} | {rule} | {pct(r['moved'], r['pairs'])} | "
                         f"{pct(r['flips'], r['pairs'])} | {r['max']:.2g} | {margins} | "
                         f"{r['delta']:.1e} |" if rule == "argmax" and r["pairs"] and key_has_token(label) else
                         f"| {cap} | {label} | {dtype} | {rule} | {pct(r['moved'], r['pairs'])} | "
                         f"{pct(r['flips'], r['pairs'])} | {r['max']:.2g} | {margins} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caps", default="native,avx2,default")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--rules", default=RULES, help="comma list of paper, argmax, tolerant, tol:T "
                   "(margins are counted on the last)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 images, float32 only")
    p.add_argument("--json", help="also write the raw counts here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.images, args.dtypes = 2, 2, "float32"
    args.dtypes = args.dtypes.split(",")
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    results = {}
    for cap in args.caps.split(","):
        env = {k: v for k, v in os.environ.items() if cap == "inherit" or k not in _CAP_VARS}
        env.update(HF_HUB_OFFLINE="1", **CAPS[cap])
        cmd = [sys.executable, __file__, "--worker", "--seeds", str(args.seeds), "--images", str(args.images),
               "--dtypes", ",".join(args.dtypes), "--rules", args.rules]
        print(f"[near_ties] {cap} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
        results[cap] = json.loads(out.strip().splitlines()[-1])
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
