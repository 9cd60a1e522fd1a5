"""Training: seeded reproducibility, the written weights + card (rebuildable as the card contract says),
image-folder training, fine-tuning an anchored model from a baseline, and the 2-process gloo (DDP) path."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from equishift import training
from equishift.errors import DataError, ModelSpecError
from test_data import fake_fmnist

ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 1}
TINY_TWINS = {"embed_dims": [8, 16], "num_heads": [1, 1], "depths": [1, 1]}
CARD_KEYS = {"name", "arch", "timm_class", "arch_config", "anchoring", "classes", "input_size", "mean", "std",
             "pad", "dataset", "untrained", "training", "metrics", "weights_sha256"}
TRAINING_KEYS = {"command", "seed", "git_commit", "seconds", "epochs", "device", "torch", "timm"}


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    """A 96-image fake Fashion-MNIST (train and test), so these tests never read the 60k files."""
    fake_fmnist(tmp_path / "fmnist", n=96)
    monkeypatch.setenv("EQUISHIFT_FMNIST_DIR", str(tmp_path / "fmnist"))
    return tmp_path / "fmnist"


def tiny(**kw) -> training.TrainConfig:
    base = dict(name="tiny", arch="vit", arch_config=dict(TINY_VIT), epochs=2, batch_size=16, warmup_steps=2,
                device="cpu", threads=1, progress=False)
    return training.TrainConfig(**{**base, **kw})


def cli(argv):
    p = argparse.ArgumentParser()
    training.add_arguments(p)
    return training.run(p.parse_args(argv))


def rebuild(card_path: Path) -> torch.nn.Module:
    """The model exactly as the card contract says zoo.py rebuilds it."""
    import timm.models
    from safetensors.torch import load_file

    from equishift import anchorize

    card = json.loads(card_path.read_text())
    m = getattr(timm.models, card["timm_class"])(**card["arch_config"])
    if card["anchoring"] != "none":
        m = anchorize(m, card["anchoring"])
    m.load_state_dict(load_file(str(card_path.with_suffix(".safetensors"))))
    return m.eval()


def test_two_seeded_runs_give_identical_weights(fmnist):
    a = training.train(tiny(seed=3))["model"].state_dict()
    b = training.train(tiny(seed=3))["model"].state_dict()
    c = training.train(tiny(seed=4))["model"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters, so the check above can fail


def test_training_learns(fmnist):
    # 96 random images with random labels: a model that learns at all fits its training set above
    # chance (10%) after a few epochs; the end-of-run test split is the same images here.
    r = training.train(tiny(epochs=30, lr=3e-3, flip=False, label_smoothing=0.0))
    assert r["test_accuracy"] > 0.3
    assert r["steps"] == 30 * (96 // 16)


@pytest.mark.parametrize("arch,anchoring,cfg", [("vit", "none", TINY_VIT), ("vit", "full", TINY_VIT),
                                                 ("twins", "full", TINY_TWINS)])
def test_cli_writes_weights_and_a_rebuildable_card(fmnist, tmp_path, arch, anchoring, cfg):
    out = tmp_path / "models"
    rc = cli(["--name", f"m-{arch}-{anchoring}", "--arch", arch, "--anchoring", anchoring, "--arch-config",
              json.dumps(cfg), "--epochs", "1", "--batch-size", "16", "--threads", "1", "--device", "cpu",
              "--seed", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    card_path = out / f"m-{arch}-{anchoring}.json"
    weights = card_path.with_suffix(".safetensors")
    card = json.loads(card_path.read_text())
    assert CARD_KEYS <= card.keys() and TRAINING_KEYS <= card["training"].keys()
    assert card["anchoring"] == anchoring and card["arch"] == arch and card["untrained"] is False
    assert card["dataset"] == "fashion-mnist" and card["pad"] == 2 and card["input_size"] == [3, 32, 32]
    assert len(card["classes"]) == 10 and card["training"]["seed"] == 5
    assert card["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    cmd = card["training"]["command"]
    assert cmd.startswith("python -m equishift train --name") and "--seed 5" in cmd and "--out" not in cmd
    m = rebuild(card_path)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    if anchoring == "full":  # the trained anchored model is shift-invariant (circular shifts)
        from equishift.testing import assert_shift_invariant

        assert_shift_invariant(m, x, shifts=[(1, 3), (5, -2)], atol=1e-4)


def _write_folder(root: Path, n_per_class: int = 12) -> None:
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            px = (torch.rand(24, 24, 3, generator=g) * 60 + 150 * k).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / name / f"{i}.png")


def test_image_folder_training(tmp_path):
    _write_folder(tmp_path / "data" / "train")
    _write_folder(tmp_path / "data" / "val", 4)
    out = tmp_path / "models"
    cli(["--name", "folder", "--dataset", str(tmp_path / "data"), "--arch-config", json.dumps(TINY_VIT),
         "--epochs", "3", "--batch-size", "8", "--warmup-steps", "1", "--threads", "1", "--device", "cpu",
         "--out", str(out), "--no-progress"])
    card = json.loads((out / "folder.json").read_text())
    assert card["classes"] == ["circle", "square"] and card["pad"] == 0
    assert card["dataset"] == str(tmp_path / "data") and card["arch_config"]["num_classes"] == 2
    assert card["training"]["test_accuracy_at_end"] is not None
    assert rebuild(out / "folder.json")(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_bad_inputs_raise_user_errors(tmp_path, fmnist):
    with pytest.raises(DataError, match="neither"):
        training.train(tiny(dataset=str(tmp_path / "no-such-folder")))
    with pytest.raises(ModelSpecError, match="unknown --arch"):
        training.train(tiny(arch="resnet"))
    with pytest.raises(ModelSpecError, match="JSON"):
        cli(["--name", "x", "--arch-config", "{depth: 2", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="fewer than one batch"):
        training.train(tiny(batch_size=128))


def test_init_from_a_baseline_then_anchorize(fmnist, tmp_path):
    out = tmp_path / "models"
    common = ["--arch-config", json.dumps(TINY_VIT), "--batch-size", "16", "--threads", "1", "--device", "cpu",
              "--out", str(out), "--no-progress"]
    cli(["--name", "base", "--epochs", "1"] + common)
    base = rebuild(out / "base.json")
    # Zero training steps: the fine-tuned model is the anchorized baseline itself.
    cli(["--name", "ft", "--init", f"zoo:{out / 'base.json'}", "--anchoring", "full", "--epochs", "0"] + common)
    ft_card = json.loads((out / "ft.json").read_text())
    assert ft_card["anchoring"] == "full" and ft_card["training"]["init"] == f"zoo:{out / 'base.json'}"
    ft = rebuild(out / "ft.json")
    from equishift import anchorize

    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ft(x), anchorize(base, "full").eval()(x), atol=1e-6, rtol=0)
    with pytest.raises(ModelSpecError, match="already anchored"):
        cli(["--name", "ft2", "--init", f"zoo:{out / 'ft.json'}", "--anchoring", "full"] + common)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(fmnist, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every global batch and DDP averages the
    gradients, so the weights equal the single-process run's up to float summation order."""
    args = ["--name", "ddp", "--arch-config", json.dumps(TINY_VIT), "--epochs", "2", "--batch-size", "16",
            "--warmup-steps", "2", "--threads", "1", "--device", "cpu", "--seed", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "equishift.training", *args, "--out", str(tmp_path / "ddp")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli(args[:1] + ["single"] + args[2:] + ["--out", str(tmp_path / "one")])
    card = json.loads((tmp_path / "ddp" / "ddp.json").read_text())
    assert card["training"]["world_size"] == 2
    assert card["training"]["command"].startswith("torchrun --nproc_per_node 2 -m equishift train")
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["ddp.json", "ddp.safetensors"]
    from safetensors.torch import load_file

    two = load_file(str(tmp_path / "ddp" / "ddp.safetensors"))
    one = load_file(str(tmp_path / "one" / "single.safetensors"))
    assert two.keys() == one.keys()
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    assert diff < 1e-4, diff
    moved = max((one[k] - rebuild_init(k, one)).abs().max().item() for k in ["head.weight"])
    assert moved > 1e-3  # training changed the weights, so the agreement above is not vacuous


def rebuild_init(key, like):
    """The seed-1 initial value of ``key`` (what the model started from)."""
    torch.manual_seed(1)
    model, _, _ = training.build_model("vit", {**TINY_VIT, "num_classes": 10})
    return model.state_dict()[key]


def test_init_from_a_timm_file(fmnist, tmp_path):
    """``--init timm:NAME?...@PATH``: the card records constructor kwargs that rebuild the model exactly."""
    import timm
    from safetensors.torch import save_file

    from equishift import anchorize

    kw = dict(img_size=32, patch_size=4, depth=1, num_classes=10)
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    spec = "timm:vit_tiny_patch16_224?" + "&".join(f"{k}={v}" for k, v in kw.items()) + f"@{tmp_path / 'w.safetensors'}"
    out = tmp_path / "models"
    cli(["--name", "from-timm", "--init", spec, "--anchoring", "patch-only", "--epochs", "0", "--threads", "1",
         "--device", "cpu", "--out", str(out), "--no-progress", "--batch-size", "16"])
    card = json.loads((out / "from-timm.json").read_text())
    assert card["timm_class"] == "VisionTransformer" and card["arch_config"]["embed_dim"] == 192
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuild(out / "from-timm.json")(x), anchorize(src, "patch-only").eval()(x),
                               atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="32 px"):
        cli(["--name", "big", "--init", "timm:vit_tiny_patch16_224?depth=1&num_classes=10", "--epochs", "0",
             "--out", str(out), "--no-progress"])


def test_metrics_are_filled_by_the_evaluation_module(fmnist, tmp_path):
    out = tmp_path / "models"
    common = ["--name", "m", "--arch-config", json.dumps(TINY_VIT), "--batch-size", "16", "--threads", "1",
              "--device", "cpu", "--out", str(out), "--no-progress"]
    cli(common + ["--epochs", "1"])
    before = json.loads((out / "m.json").read_text())
    assert before["metrics"] == {}
    cli(common + ["--metrics-only"])
    card = json.loads((out / "m.json").read_text())
    from equishift.evaluation import PROTOCOLS

    assert set(card["metrics"]) == set(PROTOCOLS)
    assert card["metrics"]["clean"]["n_images"] == 96
    # The card's quick end-of-training accuracy and the evaluation module's clean accuracy agree.
    assert card["metrics"]["clean"]["value"] == pytest.approx(card["training"]["test_accuracy_at_end"], abs=1e-9)
    assert {k: v for k, v in card.items() if k != "metrics"} == {k: v for k, v in before.items() if k != "metrics"}


def test_attach_metrics_on_a_card_without_name_or_dataset(fmnist, tmp_path, monkeypatch):
    """The card schema requires neither "name" nor "dataset": a zoo card without a name is evaluated as the
    zoo model its file names, and one without a dataset is a named DataError, never a raw KeyError."""
    out = tmp_path / "models"
    cli(["--name", "m", "--arch-config", json.dumps(TINY_VIT), "--batch-size", "16", "--threads", "1",
         "--device", "cpu", "--out", str(out), "--no-progress", "--epochs", "1"])
    card_path = out / "m.json"
    card = json.loads(card_path.read_text())
    monkeypatch.setattr(training, "MODELS_DIR", out)          # the zoo folder, where zoo:NAME is used
    monkeypatch.setenv("EQUISHIFT_ZOO_DIR", str(out))
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "dataset"}))
    with pytest.raises(DataError, match=r"^card m\.json \(m\) does not say which dataset"):
        training.attach_metrics(card_path, limit=16)
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "name"}))
    filled = training.attach_metrics(card_path, limit=16)
    assert filled["metrics"]["clean"]["n_images"] == 16
    assert "name" not in filled and json.loads(card_path.read_text())["metrics"] == filled["metrics"]
