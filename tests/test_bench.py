"""bench/anchor_overhead.py runs end to end on a tiny case, and its cost-floor models are what they claim.

Only the plumbing is checked here (timings are the bench's business, not a unit test's)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from equishift import anchorize
from equishift.polyphase import PolyphaseAnchor

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "anchor_overhead.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("anchor_overhead", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_models_replace_every_anchor_and_leave_the_anchored_model_alone(make_twins):
    bench = _load_bench()
    anch = anchorize(make_twins("svt"), "full").eval()
    n_anchors = sum(isinstance(m, PolyphaseAnchor) for m in anch.modules())
    assert n_anchors == 4  # image, stage-1 LSA and GSA, stage-2 LSA (the stride-2 embedding needs none)
    floor = bench._replace_anchors(anch, bench._ReadAndCopy)
    none = bench._replace_anchors(anch, torch.nn.Identity)
    assert not any(isinstance(m, PolyphaseAnchor) for m in floor.modules())
    assert sum(isinstance(m, bench._ReadAndCopy) for m in floor.modules()) == n_anchors
    assert sum(isinstance(m, PolyphaseAnchor) for m in anch.modules()) == n_anchors  # a copy was changed
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        # A clone changes no value: the floor computes exactly what the model without anchors does.
        assert floor(x).shape == none(x).shape == anch(x).shape
        torch.testing.assert_close(floor(x), none(x), rtol=0, atol=0)


def test_main_prints_a_row_with_floor_columns(capsys, monkeypatch):
    bench = _load_bench()
    tiny = lambda: VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=1,  # noqa: E731
                                     num_classes=3)
    monkeypatch.setattr(bench, "_models", lambda only: {"tiny ViT p4 @16": (tiny, 16)})
    threads = torch.get_num_threads()
    try:
        bench.main(["--reps", "2", "--batch", "2", "--threads", "1", "--clock", "cpu", "--floor"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("model"))
    assert header.split()[-2:] == ["floor", "no-anch"]
    row = next(line for line in out.splitlines() if line.startswith("tiny ViT p4 @16"))
    values = row[len("tiny ViT p4 @16"):].split()
    assert len(values) == 8  # base, anch, ratio, paired, min, anchors share, floor, no-anch
    assert all(float(v.rstrip("%")) > 0 for v in values)


def test_near_ties_bench_runs_and_the_default_rule_holds_on_this_cpus_kernels(tmp_path):
    """bench/near_ties.py end to end on a tiny case, under whatever kernels this process's CPU settings
    pick (CI runs the suite again under ATEN_CPU_CAPABILITY=avx2 and =default): the default rule moves no
    logits of untrained Twins, the case where plain argmax is decided by rounding."""
    import json
    import subprocess
    import sys

    out = tmp_path / "nt.json"
    bench = _BENCH.parent / "near_ties.py"
    proc = subprocess.run([sys.executable, str(bench), "--caps", "inherit", "--seeds", "2", "--images", "1",
                           "--dtypes", "float32", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| inherit | svt timm init | float32 | tolerant |" in proc.stdout
    rows = json.loads(out.read_text())["inherit"]
    for kind in ("svt timm init", "pcpvt timm init", "svt LN randomised"):
        row = rows[f"{kind} | float32 | tolerant"]
        assert row["pairs"] == 2 * 256 and row["moved"] == 0 and row["max"] <= 1e-4, (kind, row)
        assert row["decisions"] > 0


def test_big_maps_bench_runs_and_restores_the_thresholds(capsys):
    """bench/big_maps.py on a tiny batch: a row per model, and every threshold it switches is back after."""
    from equishift import polyphase
    from equishift.layers import anchored, circular

    path = _BENCH.parent / "big_maps.py"
    spec = importlib.util.spec_from_file_location("big_maps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = (polyphase._BLOCKS_MIN, polyphase._CHAIN_MIN, circular._BORDER_FIX_MIN, anchored._FUSE_MIN)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--models", "resnet18", "--batch", "1", "--reps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet18"))
    assert all(float(v) > 0 for v in row.split()[1:])
    assert (polyphase._BLOCKS_MIN, polyphase._CHAIN_MIN, circular._BORDER_FIX_MIN, anchored._FUSE_MIN) == before
