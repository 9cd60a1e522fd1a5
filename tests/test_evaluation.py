"""equishift.evaluation: every protocol against a direct re-implementation, intervals, determinism,
datasets and their errors, the CLI outputs, and torchrun with 2 gloo processes."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from equishift import cli
from equishift.errors import DataError, EquishiftError
from equishift.evaluation import PROTOCOLS, draw_shifts, evaluate, wilson_interval
from equishift.zoo import load_model
from zoo_helpers import write_tiny

N = 24  # images in the brute-force comparisons


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_tiny(root, "tiny-vit")
    write_tiny(root, "tiny-vit-anchored", anchoring="full", seed=1)
    return root


@pytest.fixture(scope="module")
def fmnist():
    from equishift.data import FashionMNIST

    return FashionMNIST("test")


@pytest.fixture(scope="module")
def baseline(zoo):
    return load_model("zoo:tiny-vit", device="cpu", root=zoo)


@pytest.fixture(scope="module")
def result(baseline, fmnist):
    return evaluate(baseline, fmnist, "all", limit=N, seed=3, batch_size=100)


def _pred(model, x):
    with torch.no_grad():
        return model(x).argmax(-1)


def test_every_protocol_matches_a_direct_computation(baseline, fmnist, result):
    """Re-derive each count with plain torch ops (roll, pad, slicing, flip) from the documented draws."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    m, seed = baseline.model, 3
    x, y = fmnist.batch(torch.arange(N))
    idx = torch.arange(N)
    black = baseline.black(x)
    clean = _pred(m, x)
    a = draw_shifts(seed, "a", idx, 0, 14)
    rolled = torch.stack([torch.roll(x[i], tuple(a[i].tolist()), dims=(-2, -1)) for i in range(N)])
    zero = []
    for i in range(N):  # content moves by (dy, dx); black comes in from the top/left
        dy, dx = a[i].tolist()
        z = black.expand(3, 32, 32).clone()
        z[:, dy:, dx:] = x[i][:, :32 - dy, :32 - dx]
        zero.append(z)
    b1, b2 = draw_shifts(seed, "b", idx, -32, 31, 0), draw_shifts(seed, "b", idx, -32, 31, 1)
    rb1 = torch.stack([torch.roll(x[i], tuple(b1[i].tolist()), dims=(-2, -1)) for i in range(N)])
    rb2 = torch.stack([torch.roll(x[i], tuple(b2[i].tolist()), dims=(-2, -1)) for i in range(N)])
    canvas = F.pad(x - black, [4] * 4) + black  # the 28x28 garment padded to 40x40
    o1, o2 = draw_shifts(seed, "crop", idx, 0, 8, 0), draw_shifts(seed, "crop", idx, 0, 8, 1)
    c1 = torch.stack([canvas[i, :, u:u + 32, v:v + 32] for i, (u, v) in enumerate(o1.tolist())])
    c2 = torch.stack([canvas[i, :, u:u + 32, v:v + 32] for i, (u, v) in enumerate(o2.tolist())])
    period = torch.stack([_pred(m, torch.roll(x, (dy, dx), dims=(-2, -1)))
                          for dy in range(4) for dx in range(4)])
    from equishift.evaluation import _uniform

    aff = []
    for i in range(N):
        angle = float(_uniform(seed, "affine", [i], 0, -10, 10)[0])
        t = [float(_uniform(seed, "affine", [i], k, -0.1, 0.1)[0]) * 32 for k in (1, 2)]
        scale = float(_uniform(seed, "affine", [i], 3, 0.9, 1.1)[0])
        aff.append(TF.affine(x[i] - black, angle=angle, translate=t, scale=scale, shear=[0.0, 0.0],
                             interpolation=InterpolationMode.BILINEAR) + black)
    want = {
        "clean": clean == y,
        "consistency-a": _pred(m, rolled) == clean,
        "consistency-b": _pred(m, rb1) == _pred(m, rb2),
        "period-orbit": (period == clean).all(0),
        "shifted-accuracy": _pred(m, rolled) == y,
        "zero-pad": _pred(m, torch.stack(zero)) == clean,
        "crop": _pred(m, c1) == _pred(m, c2),
        "crop-accuracy": _pred(m, c1) == y,
        "flip-accuracy": _pred(m, x.flip(-1)) == y,
        "affine-accuracy": _pred(m, torch.stack(aff)) == y,
    }
    assert set(result["protocols"]) == set(PROTOCOLS) == set(want)
    for name, ok in want.items():
        r = result["protocols"][name]
        assert (r["count"], r["n_images"], r["seed"]) == (int(ok.sum()), N, 3), name
        assert r["value"] == pytest.approx(int(ok.sum()) / N, abs=1e-12)
    r = result["protocols"]["shifted-accuracy"]
    assert r["clean_accuracy"] == pytest.approx(int(want["clean"].sum()) / N, abs=1e-12)
    assert r["drop"] == pytest.approx(r["clean_accuracy"] - r["value"], abs=1e-12)
    assert r["drop_ci95"][0] <= r["drop"] <= r["drop_ci95"][1]


def test_draws_are_uniform_and_depend_only_on_seed_and_index():
    idx = torch.arange(30000)
    d = draw_shifts(0, "a", idx, 0, 14)
    assert int(d.min()) == 0 and int(d.max()) == 14
    counts = torch.bincount(d[:, 0] * 15 + d[:, 1], minlength=225).float()
    expected = len(idx) / 225
    # Chi-square with 224 dof: mean 224, sd ~21; 330 is about 5 sd above the mean.
    assert float(((counts - expected) ** 2 / expected).sum()) < 330
    assert torch.equal(draw_shifts(0, "a", idx[5000:5010], 0, 14), d[5000:5010])
    assert not torch.equal(draw_shifts(1, "a", idx[:50], 0, 14), d[:50])
    b = draw_shifts(0, "b", idx, -32, 31)
    assert int(b.min()) == -32 and int(b.max()) == 31
    # Independent coordinates: the correlation of dy and dx is ~0 (|r| < 4/sqrt(n)).
    assert abs(float(np.corrcoef(b[:, 0].numpy(), b[:, 1].numpy())[0, 1])) < 4 / len(idx) ** 0.5


def test_results_do_not_depend_on_batch_size(baseline, fmnist, result):
    other = evaluate(baseline, fmnist, "all", limit=N, seed=3, batch_size=7)
    assert other["protocols"] == result["protocols"]


def test_anchored_model_is_exactly_consistent_under_circular_shifts(zoo, fmnist):
    """Up to near-ties of the top-2 logits (margin < 1e-4, counted in the test), an anchored model agrees
    with itself under every circular shift."""
    loaded = load_model("zoo:tiny-vit-anchored", device="cpu", root=zoo)
    n = 40
    res = evaluate(loaded, fmnist, ["consistency-a", "consistency-b", "period-orbit"], limit=n)
    x, _ = fmnist.batch(torch.arange(n))
    with torch.no_grad():
        top2 = loaded.model(x).topk(2, dim=-1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum())
    for name in ("consistency-a", "consistency-b", "period-orbit"):
        assert res["protocols"][name]["count"] >= n - near_ties, name


def test_wilson_interval_solves_the_score_equation():
    """The Wilson bounds are the roots p of (p̂ − p)² = z² p (1 − p) / n."""
    z = 1.959963984540054
    for k, n in [(0, 10), (3, 10), (10, 10), (517, 1000), (9990, 10000)]:
        ph = k / n
        # (1 + z²/n) p² − (2 p̂ + z²/n) p + p̂² = 0
        roots = np.sort(np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph]).real)
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(max(roots[0], 0.0), abs=1e-12)
        assert hi == pytest.approx(min(roots[1], 1.0), abs=1e-12)
        assert lo <= ph <= hi


def test_records_say_mode_range_and_interval(result):
    for name, r in result["protocols"].items():
        assert r["protocol"] == name and r["ci_method"] == "wilson"
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
        assert r["shift_mode"] and r["range"] and "{" not in r["range"].replace("{0..", "").replace("{-32..", "")
    assert result["protocols"]["period-orbit"]["range"] == "all 4×4 shifts in {0..3}² (s = patch size 4)"
    assert "{0..8}²" in result["protocols"]["crop"]["range"]
    assert result["seed"] == 3 and result["n_images"] == N and result["stride"] == 4


def test_unknown_protocol_and_empty_input(baseline, fmnist):
    with pytest.raises(EquishiftError, match="unknown protocol 'wobble'"):
        evaluate(baseline, fmnist, ["clean", "wobble"])
    with pytest.raises(DataError, match="no images"):
        evaluate(baseline, fmnist, "clean", limit=0)


def test_missing_dataset_directory(baseline, tmp_path):
    with pytest.raises(DataError, match="neither 'fashion-mnist' nor an existing directory"):
        evaluate(baseline, str(tmp_path / "nowhere"), "clean")


def test_corrupt_idx_is_a_data_error(baseline, tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + b"\x00" * 20)  # header promises more
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match="truncated or corrupt"):
        evaluate(baseline, str(tmp_path), "clean")


def test_image_folder_matches_the_tensor_dataset(baseline, fmnist, tmp_path):
    """Garments saved as PNG in class folders (named loosely) give the same predictions as the tensors."""
    from equishift.data import FMNIST_CLASSES, load_fashion_mnist

    raw, labels = load_fashion_mnist("test")
    n = 16
    for i in range(n):
        folder = tmp_path / FMNIST_CLASSES[int(labels[i])].replace("/", " ").lower()
        folder.mkdir(exist_ok=True)
        Image.fromarray(raw[i].numpy()).save(folder / f"{i:03d}.png")
    res = evaluate(baseline, str(tmp_path), ["clean", "flip-accuracy"])
    ref = evaluate(baseline, fmnist, ["clean", "flip-accuracy"], limit=n)
    assert res["n_images"] == n
    for p in ("clean", "flip-accuracy"):
        assert res["protocols"][p]["count"] == ref["protocols"][p]["count"]


def test_image_folder_with_foreign_classes_is_refused(baseline, tmp_path):
    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "a.png")
    with pytest.raises(DataError, match="'cats' is not one of the model's classes"):
        evaluate(baseline, str(tmp_path), "clean")


def test_a_model_of_another_size_gets_its_own_preprocessing(fmnist):
    """A 48-pixel timm model on Fashion-MNIST tensors: converted back to pixels, then preprocessed."""
    loaded = load_model("timm:vit_tiny_patch16_224?img_size=48&patch_size=8&depth=1&num_classes=10")
    res = evaluate(loaded, fmnist, ["clean", "crop"], limit=6)
    assert res["input_size"] == [3, 48, 48] and res["crop_margin"] == 6
    assert "{0..12}²" in res["protocols"]["crop"]["range"]


def test_cli_writes_json_and_csv(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EQUISHIFT_ZOO_DIR", str(zoo))
    rc = cli.main(["evaluate", "--model", "zoo:tiny-vit", "--protocol", "clean,consistency-a",
                   "--protocol", "crop", "--limit", "10", "--seed", "5", "--json", str(tmp_path / "r.json"),
                   "--csv", str(tmp_path / "r.csv"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["protocols"]) == ["clean", "consistency-a", "crop"] and data["seed"] == 5
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["protocol"] for r in rows] == ["clean", "consistency-a", "crop"]
    for r in rows:
        rec = data["protocols"][r["protocol"]]
        assert int(r["count"]) == rec["count"] and float(r["value"]) == pytest.approx(rec["value"])
        assert float(r["ci95_low"]) == pytest.approx(rec["ci95"][0]) and r["seed"] == "5"
        assert r["shift_mode"] == rec["shift_mode"] and int(r["n_images"]) == 10
    assert "consistency-a" in capsys.readouterr().out


def test_cli_reports_user_errors_without_a_traceback(zoo, monkeypatch, capsys):
    monkeypatch.setenv("EQUISHIFT_ZOO_DIR", str(zoo))
    assert cli.main(["evaluate", "--model", "zoo:nope", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo model 'nope'" in err and "zoo:tiny-vit" in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one(zoo, tmp_path):
    env = dict(os.environ, EQUISHIFT_ZOO_DIR=str(zoo), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    args = ["-m", "equishift", "evaluate", "--model", "zoo:tiny-vit", "--limit", "13", "--seed", "2",
            "--no-progress", "--protocol", "clean,consistency-a,consistency-b,crop,affine-accuracy"]
    one = subprocess.run([sys.executable, *args, "--json", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    for attempt in range(2):
        two = subprocess.run([*torchrun, *args, "--json", str(tmp_path / "two.json")], env=env,
                             capture_output=True, text=True, timeout=300)
        # Once in a few full-suite runs under load, a rank aborts in gloo's C++ teardown after the process
        # group was destroyed ("terminate called without an active exception", SIGABRT; a known upstream
        # race between gloo's worker threads and interpreter exit). Retried once for that signature only;
        # any other failure fails at once.
        if two.returncode == 0 or "terminate called without an active exception" not in two.stderr:
            break
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["protocols"] == b["protocols"]


def test_a_failing_rank_leaves_the_group_without_a_barrier(monkeypatch, tmp_path):
    """On an error a rank must not enter a barrier: the other ranks may be inside an all-reduce, which a
    barrier would not match (a hang until the timeout). On success every rank waits for the others."""
    import argparse

    import torch.distributed as dist

    from equishift import distributed, evaluation

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    monkeypatch.setattr(distributed, "init_from_env", lambda device: device)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    args = argparse.Namespace(model=str(tmp_path / "missing.json"), dataset="fashion-mnist", protocol=None,
                              json=None, csv=None, device="cpu", batch_size=8, limit=2, seed=0, no_progress=True)
    assert evaluation.run(args) == 2
    assert calls == ["destroy"]
    calls.clear()
    distributed.shutdown()
    assert calls == ["barrier", "destroy"]
