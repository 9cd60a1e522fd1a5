"""Training: one seeded recipe for a baseline and its anchored twin; ``python -m equishift train``.

The recipe (the same for both members of a pair): AdamW, linear warm-up then cosine decay to zero, label
smoothing 0.1, gradient clipping at 1.0, random horizontal flips as the only augmentation. There is
deliberately no translation augmentation (random crops / shifts): it would teach the baseline some
robustness to small shifts without making it invariant, and blur what the product shows — that the
architecture, not the data, decides shift invariance. The data order and the flips come from a generator
seeded with ``(seed, epoch)``, so a run is a function of its arguments (on one device and thread count).

Several processes (``torchrun --nproc_per_node K -m equishift train ...``; NCCL on GPUs, gloo on CPU)
split every global batch into K equal slices and average gradients with DistributedDataParallel, so the
optimisation is the single-process one up to float summation order; rank 0 writes weights and card.
On CUDA the forward pass runs under bfloat16 autocast.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import DataError, ModelSpecError, shorten

__all__ = ["ARCHS", "TrainConfig", "build_model", "train", "save_model", "card_for", "attach_metrics",
           "add_arguments", "run"]

MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"

# Architectures sized for 32x32 inputs and a CPU budget of ~10 minutes per model (docs/training.md, "The recipe").
ARCHS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "vit": ("VisionTransformer", dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64,
                                      depth=4, num_heads=2, mlp_ratio=2.0)),
    "twins": ("Twins", dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dims=[32, 64],
                            num_heads=[1, 2], mlp_ratios=[2, 2], depths=[2, 2], wss=[4, 2],
                            sr_ratios=[2, 1])),
}


@dataclass
class TrainConfig:
    name: str = "model"
    arch: str = "vit"
    arch_config: Dict[str, Any] = field(default_factory=dict)  # overrides of ARCHS[arch]
    anchoring: str = "none"
    init: Optional[str] = None  # a zoo.load_model spec to start from (then anchorized if anchoring != none)
    dataset: str = "fashion-mnist"
    epochs: float = 15.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 300
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    flip: bool = True
    seed: int = 0
    limit: Optional[int] = None  # use only `limit` training images (quick runs, tests)
    eval_limit: Optional[int] = None  # test images for the end-of-training accuracy (None = all)
    device: Optional[str] = None
    threads: Optional[int] = None
    progress: bool = True


# --- data ------------------------------------------------------------------------------------------
def _datasets(cfg: TrainConfig, init_card: Optional[Dict[str, Any]] = None):
    """(train set, test set or None, card fields describing the data). With an ``--init`` model, image
    folders are prepared at its input size with its mean/std (timm models: ImageNet statistics)."""
    from . import data

    if cfg.dataset == "fashion-mnist":
        if init_card is not None and list(init_card["input_size"]) != [3, 32, 32]:
            raise DataError(f"Fashion-MNIST is prepared as 3x32x32 images, but --init {cfg.init} takes "
                            f"{init_card['input_size']}; build it for 32 px (e.g. timm:NAME?img_size=32@PATH)")
        train_idx = range(cfg.limit) if cfg.limit else None
        test_idx = range(cfg.eval_limit) if cfg.eval_limit else None
        tr = data.FashionMNIST("train", indices=train_idx)
        te = data.FashionMNIST("test", indices=test_idx)
        info = dict(classes=list(data.FMNIST_CLASSES), input_size=[3, 32, 32], mean=list(data.FMNIST_MEAN),
                    std=list(data.FMNIST_STD), pad=data.FMNIST_PAD, dataset="fashion-mnist")
        return tr, te, info
    root = Path(cfg.dataset)
    if not root.is_dir():
        raise DataError(f"--dataset must be 'fashion-mnist' or an image folder; {root} is neither")
    size = int(ARCHS[cfg.arch][1]["img_size"] if "img_size" not in cfg.arch_config else cfg.arch_config["img_size"])
    norm = {}
    if init_card is not None:
        size = int(init_card["input_size"][-1])
        norm = dict(mean=init_card["mean"], std=init_card["std"])
    # ROOT/train + ROOT/val (or test) when present, else ROOT itself with no held-out set.
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    tr = data.ImageFolder(train_root, size=size, **norm)
    te = data.ImageFolder(test_root, size=size, **norm) if test_root is not None and train_root != root else None
    if te is not None and te.classes != tr.classes:
        raise DataError(f"{test_root} has classes {te.classes}, but {train_root} has {tr.classes}")
    if cfg.limit and cfg.limit < len(tr.samples):  # a seeded subset: the samples are sorted by class
        keep = torch.randperm(len(tr.samples), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.limit]
        tr.samples = [tr.samples[i] for i in sorted(keep.tolist())]
    info = dict(classes=list(tr.classes), input_size=[3, size, size], mean=list(tr.mean), std=list(tr.std),
                pad=0, dataset=str(root))
    return tr, te, info


# --- model -----------------------------------------------------------------------------------------
def build_model(arch: str, arch_config: Optional[Dict[str, Any]] = None, anchoring: str = "none"
                ) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """A freshly initialised timm model (anchorized when ``anchoring`` != "none").

    Returns (model, timm class name, full constructor kwargs) — the card's ``timm_class``/``arch_config``.
    The anchored twin is built from the same freshly initialised baseline, as the card's rebuild does."""
    import timm.models

    if arch not in ARCHS:
        raise ModelSpecError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    timm_class, base = ARCHS[arch]
    kwargs = {**base, **(arch_config or {})}
    model = getattr(timm.models, timm_class)(**kwargs)
    if anchoring != "none":
        from .anchoring import anchorize

        model = anchorize(model, anchoring)
    return model, timm_class, kwargs


def arch_config_of(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """(timm class name, constructor kwargs) that rebuild ``model`` (un-anchored), checked by rebuilding it,
    loading its weights and comparing outputs; ModelSpecError when the model cannot be described so."""
    import timm.models

    from .archs import adapter_for

    name = type(model).__name__
    found = adapter_for(model)
    read = found.config if found is not None and found.name in ARCHS else None  # the families training builds
    if read is None or getattr(timm.models, name, None) is not type(model):
        raise ModelSpecError(f"--init needs a timm VisionTransformer or Twins (a card must be able to rebuild it);"
                             f" got {type(model).__module__}.{name}")
    try:
        import inspect

        accepted = inspect.signature(getattr(timm.models, name).__init__).parameters
        kwargs = {k: v for k, v in read(model).items() if k in accepted}  # options this timm version has
        twin = getattr(timm.models, name)(**kwargs).eval()
        twin.load_state_dict(model.state_dict())
        c, h, w = kwargs["in_chans"], *kwargs["img_size"]
        x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.allclose(twin(x), model.eval()(x), atol=1e-5, rtol=1e-4)
    except (AttributeError, TypeError, RuntimeError, AssertionError) as e:
        raise ModelSpecError(f"cannot describe this {name} by constructor arguments for its card ({e}); "
                             "start from a zoo model or a plain timm ViT/Twins") from None
    if not same:
        raise ModelSpecError(f"this {name} uses options the card cannot record (its rebuild differs); "
                             "start from a zoo model or a plain timm ViT/Twins")
    return name, kwargs


def _load_init(cfg: TrainConfig):
    """The ``--init`` model (any zoo.load_model spec) on the CPU, with its card."""
    from .zoo import load_model

    loaded = load_model(cfg.init, device="cpu")
    return loaded.model, dict(loaded.card)


def _from_init(cfg: TrainConfig, model: nn.Module, init_card: Dict[str, Any], num_classes: int):
    """The ``--init`` model with a head for ``num_classes``, anchorized when asked; returns like build_model."""
    from .anchoring import anchorize, anchoring_mode

    if anchoring_mode(model) != "none":
        raise ModelSpecError(f"--init {cfg.init} is already anchored ({anchoring_mode(model)}); "
                             "start from a baseline model")
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if "arch_config" in init_card:  # a zoo card already says how to rebuild it
        timm_class, kwargs = init_card["timm_class"], dict(init_card["arch_config"], num_classes=num_classes)
    else:
        timm_class, kwargs = arch_config_of(model)
    if cfg.anchoring != "none":
        model = anchorize(model, cfg.anchoring)
    return model, timm_class, kwargs


# --- distributed -----------------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> Tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


# --- the loop --------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _batches(n: int, batch_size: int, epoch: int, seed: int, flip: bool):
    """The epoch's batches as (indices, flip mask), from a generator seeded with (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    for i in range(n // batch_size):  # drop the last partial batch: every step has the same size
        sl = slice(i * batch_size, (i + 1) * batch_size)
        yield perm[sl], flips[sl]


def _get_batch(ds, idx: torch.Tensor):
    if hasattr(ds, "batch"):
        return ds.batch(idx)
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def accuracy(model: nn.Module, ds, device: torch.device, batch_size: int = 500) -> float:
    """Clean top-1 accuracy of ``model`` on ``ds`` (a quick check; the card's metrics come from evaluation)."""
    model.eval()
    correct = 0
    for start in range(0, len(ds), batch_size):
        x, y = _get_batch(ds, torch.arange(start, min(len(ds), start + batch_size)))
        with _autocast(device):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / max(1, len(ds))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train per ``cfg``. Returns {"model", "timm_class", "arch_config", "anchor_options", "data", "seconds", "steps",
    "test_accuracy", "rank", "world_size", "device"}; the model is the unwrapped module on CPU."""
    from .device import default_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = default_device(cfg.device)
    rank, world = _dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {world}")
    init_model, init_card = _load_init(cfg) if cfg.init else (None, None)
    tr, te, info = _datasets(cfg, init_card)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model, timm_class, kwargs = _from_init(cfg, init_model, init_card, len(info["classes"]))
    else:
        model, timm_class, kwargs = build_model(cfg.arch, {**cfg.arch_config,
                                                           "num_classes": len(info["classes"])}, cfg.anchoring)
    model.to(device)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(tr) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training set has {len(tr)} images, fewer than one batch of {cfg.batch_size}")
    total = max(0, round(cfg.epochs * steps_per_epoch))  # 0 steps: just re-save (e.g. anchorize --init)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    per_rank = cfg.batch_size // world
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=cfg.name, unit="step", mininterval=1 if sys.stderr.isatty() else 20)
    t0 = time.time()
    step, epoch, running = 0, 0, 0.0
    net.train()
    while step < total:
        for idx, flips in _batches(len(tr), cfg.batch_size, epoch, cfg.seed, cfg.flip):
            if step >= total:
                break
            idx, flips = idx[rank * per_rank:(rank + 1) * per_rank], flips[rank * per_rank:(rank + 1) * per_rank]
            x, y = _get_batch(tr, idx)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            with _autocast(device):
                loss = loss_fn(net(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            step += 1
            lv = float(loss.detach())
            running = 0.98 * running + 0.02 * lv if step > 1 else lv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", epoch=epoch, refresh=False)
        epoch += 1
    seconds = time.time() - t0
    if bar is not None:
        bar.close()
    test_acc = accuracy(model, te, device) if (te is not None and rank == 0) else None
    if world > 1:
        import torch.distributed as dist

        # Rank 0 is still scoring the test set; a rank that tore gloo down meanwhile aborted in C++
        # ("terminate called without an active exception"). Drop the DDP reducer first, then leave together.
        del net
        dist.barrier()
        dist.destroy_process_group()
    model.eval().to("cpu")
    from .anchoring import anchor_options

    return dict(model=model, timm_class=timm_class, arch_config=kwargs, anchor_options=anchor_options(model),
                data=info, seconds=round(seconds, 1),
                steps=step, test_accuracy=test_acc, rank=rank, world_size=world, device=device.type)


# --- outputs ---------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_model(model: nn.Module, path: Path) -> str:
    """Write the state dict as safetensors (fp32, contiguous, no shared storage); returns its sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates 0600 files; weights are meant to be shared
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_for(cfg: TrainConfig, result: Dict[str, Any], sha256: str, command: str) -> Dict[str, Any]:
    """The model card (keys are a contract with equishift.zoo)."""
    import timm

    arch = next(a for a, (cls, _) in ARCHS.items() if cls == result["timm_class"])
    return {
        "name": cfg.name, "arch": arch, "timm_class": result["timm_class"], "arch_config": result["arch_config"],
        "anchoring": cfg.anchoring, **({"anchor_options": result["anchor_options"]} if cfg.anchoring != "none" else {}),
        **result["data"], "untrained": False,
        "training": {
            "command": command, "seed": cfg.seed, "git_commit": _git_commit(), "seconds": result["seconds"],
            "epochs": cfg.epochs, "steps": result["steps"], "batch_size": cfg.batch_size, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
            "label_smoothing": cfg.label_smoothing, "clip_grad": cfg.clip_grad,
            "augmentation": "random horizontal flip" if cfg.flip else "none",
            "init": cfg.init, "limit": cfg.limit, "device": result["device"], "world_size": result["world_size"],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(),
            "test_accuracy_at_end": result["test_accuracy"],
        },
        "metrics": {},
        "weights_sha256": sha256,
    }


def attach_metrics(card_path: Path, limit: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Fill ``card["metrics"]`` with ``equishift.evaluation.evaluate(..., protocols="all")`` on the
    card's dataset (the full Fashion-MNIST test split unless ``limit``) and rewrite the card."""
    from . import evaluation
    from .zoo import load_model

    from .cards import read_card

    card_path = Path(card_path)
    card = read_card(card_path)  # the same checks as every card load (size, depth, schema)
    # The schema requires neither "name" nor "dataset": a zoo model is named by its file, and a card that
    # does not say what it was trained on cannot be evaluated on it.
    name = card.get("name") or card_path.stem
    spec = f"zoo:{card_path.stem}" if card_path.parent.resolve() == MODELS_DIR.resolve() else str(card_path)
    dataset = card.get("dataset")
    if not dataset:
        raise DataError(f"card {shorten(card_path.name, 80)} ({shorten(str(name), 60)}) does not say which dataset "
                        "the model was trained on (its \"dataset\" is missing or empty); add it (e.g. "
                        "\"fashion-mnist\" or an image folder) to fill its metrics")
    loaded = load_model(spec)
    result = evaluation.evaluate(loaded, dataset, "all", limit=limit, progress=progress)
    card["metrics"] = evaluation.card_metrics(result)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card


# --- CLI -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--name", required=True, help="output name: writes OUT/NAME.safetensors and OUT/NAME.json")
    p.add_argument("--arch", choices=sorted(ARCHS), default=d.arch)
    p.add_argument("--arch-config", default="{}", metavar="JSON",
                   help="constructor kwargs overriding the built-in size, e.g. '{\"depth\": 6}'")
    p.add_argument("--anchoring", choices=["none", "full", "pos-only", "patch-only"], default=d.anchoring)
    p.add_argument("--init", default=None, metavar="SPEC",
                   help="start from a baseline (zoo:NAME, timm:NAME@PATH, ...) and anchorize it per --anchoring")
    p.add_argument("--dataset", default=d.dataset,
                   help="'fashion-mnist' or an image folder ROOT/<class>/* (or ROOT/train + ROOT/val)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--eval-limit", type=int, default=None, help="test images for the end-of-run accuracy")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(MODELS_DIR), help="output directory (default: assets/models)")
    p.add_argument("--metrics", action="store_true",
                   help="after training, fill the card's metrics with `evaluate --protocol all`")
    p.add_argument("--metrics-only", action="store_true",
                   help="no training: fill the metrics of the existing card OUT/NAME.json")
    p.add_argument("--no-progress", action="store_true")


def _command(args: argparse.Namespace, world: int) -> str:
    """The command line that reproduces this run: the recipe's core options always (so that a later change
    of a default does not change what the card says), any other option that differs from its default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["train"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "no_progress", "out", "metrics", "metrics_only"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default and action.dest not in ("name", "arch", "anchoring", "dataset", "epochs", "seed"):
            continue
        flag = action.option_strings[0]
        words += [flag] if action.nargs == 0 else [flag, str(value)]
    launcher = f"torchrun --nproc_per_node {world} -m equishift" if world > 1 else "python -m equishift"
    return launcher + " " + " ".join(shlex.quote(w) for w in words)


def run(args: argparse.Namespace) -> int:
    if args.metrics_only:
        card_path = Path(args.out) / f"{args.name}.json"
        if not card_path.is_file():
            raise ModelSpecError(f"--metrics-only: no card {card_path}; train the model first")
        attach_metrics(card_path, progress=not args.no_progress)
        print(f"{args.name}: metrics written to {card_path}")
        return 0
    try:
        arch_config = json.loads(args.arch_config)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"--arch-config is not valid JSON: {e}")
    if not isinstance(arch_config, dict):
        raise ModelSpecError("--arch-config must be a JSON object of constructor kwargs")
    from .options import check_options

    # The card this run writes must load again: its arch_config is held to the same whitelist, so an
    # option outside it is refused now rather than after the training.
    check_options(arch_config, "--arch-config")
    cfg = TrainConfig(name=args.name, arch=args.arch, arch_config=arch_config, anchoring=args.anchoring,
                      init=args.init, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                      label_smoothing=args.label_smoothing, flip=not args.no_flip, seed=args.seed,
                      limit=args.limit, eval_limit=args.eval_limit, device=args.device, threads=args.threads,
                      progress=not args.no_progress)
    result = train(cfg)
    if result["rank"] != 0:
        return 0
    out = Path(args.out)
    sha = save_model(result["model"], out / f"{cfg.name}.safetensors")
    card = card_for(cfg, result, sha, _command(args, result["world_size"]))
    card_path = out / f"{cfg.name}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    acc = result["test_accuracy"]
    print(f"{cfg.name}: {result['steps']} steps in {result['seconds']:.0f} s, "
          f"test accuracy {'n/a' if acc is None else f'{100 * acc:.2f}%'} -> {card_path}")
    if args.metrics:
        attach_metrics(card_path)
    return 0


if __name__ == "__main__":  # `python -m equishift.training ...` works even when another command is broken
    _parser = argparse.ArgumentParser(prog="python -m equishift train")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
