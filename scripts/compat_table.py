"""Which timm models `anchorize` supports, measured: for each model name of the families equishift knows
(and their relatives it refuses), at its default input size, random weights with trained-like norm
statistics (``equishift.testing.trained_like``) and the classifier scaled so that logits are of order one:

- supported, or the reason anchorize gives up front;
- max |Δlogit| under circular shifts, baseline and anchored (float32; two images, four shifts);
- anchored ÷ baseline forward time (batch 2, median of 3, this machine's threads).

    python scripts/compat_table.py                  # the default subset (<= 40 M parameters), writes
                                                    # docs/compatibility.md and the README summary
    python scripts/compat_table.py --families resnet --max-params 30 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from equishift import anchorize  # noqa: E402
from equishift.testing import check_shift_invariant, trained_like  # noqa: E402

FAMILIES = {
    "vit": ["vit_*", "deit_*"], "twins": ["twins_*"], "swin": ["swin_*", "swinv2_*"], "pvt_v2": ["pvt_v2_*"],
    "resnet": ["resnet*"], "convnext": ["convnext_*"],
}
DOC = ROOT / "docs" / "compatibility.md"
README = ROOT / "README.md"


def _forward_time(model, x, reps: int = 3) -> float:
    model(x)  # warm-up: first-call allocations and cached index tables
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, max_params: float, seed: int = 0) -> dict:
    import timm

    row = {"name": name}
    try:
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()) / 1e6
        row["params_m"] = params
        if params > max_params:
            return dict(row, status=f"skipped (> {max_params:g} M parameters)")
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:  # noqa: BLE001 - a name timm lists but cannot build here
        return dict(row, status=f"does not build ({type(e).__name__})")
    trained_like(model, seed)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    row["size"] = h
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        try:
            scale = float(model(x).abs().max())
        except Exception as e:  # noqa: BLE001
            return dict(row, status=f"baseline forward fails ({type(e).__name__})")
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, torch.nn.Linear) and scale > 0:
            head.weight.mul_(3.0 / scale)
        g = torch.Generator().manual_seed(seed + 2)
        shifts = torch.stack([torch.randint(0, h, (4,), generator=g), torch.randint(0, w, (4,), generator=g)], 1)
        row["base_err"] = check_shift_invariant(model, x, shifts).max_error
        try:
            anchored = anchorize(model).eval()
        except (TypeError, ValueError) as e:
            reason = str(e).split(": ", 1)[-1]
            return dict(row, status="refused", reason=reason)
        try:
            row["anch_err"] = check_shift_invariant(anchored, x, shifts).max_error
        except ValueError as e:
            if "divisible by the stride" not in str(e):
                return dict(row, status=f"CRASH after anchorize (ValueError: {str(e)[:80]})")
            # The default size is not a multiple of the network's total stride: invariance is impossible
            # there (the anchored forward says so); measure at the next size that is.
            info = getattr(model, "feature_info", None) or [{"reduction": 32}]
            red = int(info[-1].get("reduction", 32)) if isinstance(info, list) else 32
            size = -(-h // red) * red
            row["note"] = f"{h} px is not a multiple of the total stride {red} (ValueError): measured at {size} px"
            row["size"] = size
            x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed + 1))
            shifts = shifts % size
            row["base_err"] = check_shift_invariant(model, x, shifts).max_error
            row["anch_err"] = check_shift_invariant(anchored, x, shifts).max_error
        except Exception as e:  # noqa: BLE001 - accepted, then failed: a bug to report
            return dict(row, status=f"CRASH after anchorize ({type(e).__name__}: {str(e)[:80]})")
        row["ratio"] = _forward_time(anchored, x) / _forward_time(model, x)
    row["status"] = "exact" if row["anch_err"] <= 1e-4 else "NOT exact"
    return row


def _fmt(row: dict) -> str:
    def num(key, spec):
        return format(row[key], spec) if key in row else ""
    reason = row.get("reason", "")
    if reason.startswith("anchorize supports"):
        reason = f"{reason.rsplit('.', 1)[-1]} is not a supported family"
    status = row["status"] + (f": {reason}" if reason else "") + (f" ({row['note']})" if row.get("note") else "")
    status = status.replace("|", "/")
    return (f"| `{row['name']}` | {num('params_m', '.1f')} | {row.get('size', '')} | {num('base_err', '.2g')} | "
            f"{num('anch_err', '.2g')} | {num('ratio', '.2f')} | {status} |")


def main(argv=None) -> int:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--max-params", type=float, default=40.0, help="skip models above this many million parameters")
    p.add_argument("--match", default=None, help="only names matching this regular expression")
    p.add_argument("--no-write", action="store_true", help="print only; do not rewrite the docs")
    args = p.parse_args(argv)
    with torch.no_grad():  # not set_grad_enabled(False): main() may run inside another program (the tests)
        return _run(args, timm)


def _run(args, timm) -> int:
    sections = []
    summary = []
    for fam in args.families:
        names = sorted(set(timm.list_models(FAMILIES[fam])))
        if args.match:
            names = [n for n in names if re.search(args.match, n)]
        rows = []
        for name in names:
            row = measure(name, args.max_params)
            rows.append(row)
            print(_fmt(row), flush=True)
        measured = [r for r in rows if r["status"] in ("exact", "NOT exact", "refused") or r["status"].startswith("CRASH")]
        exact = [r for r in rows if r["status"] == "exact"]
        worst = max((r["anch_err"] for r in exact), default=float("nan"))
        ratios = [r["ratio"] for r in exact]
        summary.append(f"| {fam} | {len(names)} | {len(measured)} | {len(exact)} | "
                       f"{sum(r['status'] == 'refused' for r in rows)} | "
                       f"{sum(r['status'] == 'NOT exact' or r['status'].startswith('CRASH') for r in rows)} | "
                       f"{worst:.1g} | {statistics.median(ratios):.2f} |" if ratios else
                       f"| {fam} | {len(names)} | {len(measured)} | 0 | "
                       f"{sum(r['status'] == 'refused' for r in rows)} | "
                       f"{sum(r['status'] == 'NOT exact' or r['status'].startswith('CRASH') for r in rows)} | | |")
        sections.append((fam, rows))
    head = ("| family | timm names | measured | exact | refused | not exact / crash | worst anchored max abs Δlogit | "
            "median time ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    table = head + "\n" + "\n".join(summary)
    print(table)
    if args.no_write:
        return 0
    stamp = (f"Measured {datetime.date.today().isoformat()} with `python scripts/compat_table.py "
             f"--max-params {args.max_params:g}`: torch {torch.__version__}, timm {timm.__version__}, "
             f"{platform.machine()} CPU, {torch.get_num_threads()} threads.")
    body = ["# Compatibility: which timm models `anchorize` makes shift-invariant", "",
            "Generated by `scripts/compat_table.py`; do not edit by hand. " + stamp, "",
            "Every model name of each family at its default input size, random weights with trained-like norm "
            "statistics, logits scaled to order one; max |Δlogit| over two images and four random circular "
            "shifts in float32 (\"exact\": anchored ≤ 1e-4); time ratio: anchored ÷ baseline forward, batch 2. "
            "\"refused\": `anchorize` raises a TypeError up front with the reason shown.", "", "## Summary", "",
            table, ""]
    for fam, rows in sections:
        body += [f"## {fam}", "", "| model | params (M) | px | baseline max abs Δlogit | anchored max abs Δlogit | "
                 "time ratio | status |", "|---|---:|---:|---:|---:|---:|---|"]
        body += [_fmt(r) for r in rows] + [""]
    DOC.write_text("\n".join(body))
    text = README.read_text()
    start, end = "<!-- section:compat-table -->", "<!-- /section:compat-table -->"
    if start in text and end in text:
        a, b = text.index(start) + len(start), text.index(end)
        README.write_text(text[:a] + "\n" + table + "\n\n" + stamp + "\n" + text[b:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
